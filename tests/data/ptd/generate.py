"""Regenerates the ExecuTorch ``.ptd`` fixtures of tests/test_ptd_target.py (by hand, not by the tests).

A small conv + linear model exported by ExecuTorch with its weights in a named-data file
(``ExecutorchBackendConfig(external_constants=True)``), twice: ``v1`` and ``v2``, where v2 changes
one of the conv's 8 output channels and the linear bias. ExecuTorch (and the torch it needs) is too
heavy for ``make test``: run this from a venv of its own, once:

    python3.11 -m venv /work/venv-et
    /work/venv-et/bin/pip install executorch torch==2.13.0
    /work/venv-et/bin/python tests/data/ptd/generate.py

The two programs (``.pte``) come out byte-identical, which the script checks: only the ``.ptd``
changes, and only it is committed.
"""

from __future__ import annotations

import os
import tempfile

import torch

torch.set_num_threads(1)

from executorch.exir import ExecutorchBackendConfig, to_edge  # noqa: E402
from torch.export import export  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = torch.nn.Conv2d(3, 8, 3)
        self.l = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.l(self.c(x).mean((2, 3)))


def export_to(m: Model, name: str) -> bytes:
    et = to_edge(export(m, (torch.zeros(1, 3, 8, 8),))).to_executorch(
        ExecutorchBackendConfig(external_constants=True))
    with tempfile.TemporaryDirectory() as d:
        et.write_tensor_data_to_file(d)
        (ptd,) = [f for f in os.listdir(d) if f.endswith(".ptd")]
        os.replace(os.path.join(d, ptd), os.path.join(HERE, f"{name}.ptd"))
    return et.buffer


def main() -> None:
    torch.manual_seed(0)
    m = Model().eval()
    pte1 = export_to(m, "v1")
    with torch.no_grad():
        m.c.weight[3] += 0.01
        m.l.bias += 0.01
    pte2 = export_to(m, "v2")
    assert pte1 == pte2, "the program changed with the weights"


if __name__ == "__main__":
    main()
