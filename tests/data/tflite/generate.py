"""Regenerates the TFLite fixtures of tests/test_tflite_target.py (run by hand, not by the tests).

The files are real converter output: a small CNN (conv, depthwise conv, conv,
max pool, two fully connected layers) converted from PyTorch by litert-torch,
then quantized to int8 weights with per-channel scales (dynamic range, weights
int8, activations float) by ai-edge-quantizer. litert-torch pulls in jax,
transformers and torchao, too heavy for ``make test``: run this from a venv of
its own, once:

    python3.11 -m venv /work/venv-litert
    /work/venv-litert/bin/pip install torch==2.13.0 litert-torch
    /work/venv-litert/bin/python tests/data/tflite/generate.py

Pairs (the base is ``cnn`` / ``cnn-int8``; each target differs by one change):

- ``channels``: a short fine-tune of 10 % of every weight tensor's output
  channels (and their bias entries); the rest bit-identical;
- ``moved``: the same fine-tune of every weight;
- ``bias``: the second conv, without a bias in the base (the converter writes
  zeros), gets one;
- ``stripped``: names stripped (``flatbuffer_utils.strip_strings``, what
  ``strip_strings`` does), base and ``channels`` target (int8).

Seeds are fixed, but converter versions change bytes: the tests take the files
as they are committed. The buffer-offset storage mode (models past 2 GB) is
written from these by tests/tflite_files.py.
"""

from __future__ import annotations

import argparse
import os

import torch

torch.set_num_threads(1)

import litert_torch  # noqa: E402
from ai_edge_litert.tools import flatbuffer_utils  # noqa: E402
from ai_edge_quantizer import quantizer, recipe  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
INPUT = (1, 3, 12, 12)
#: Adam's learning rate for the fine-tunes: BERT-style fine-tuning rates are 1e-5 to 5e-5.
LR = 2e-5


class Cnn(torch.nn.Module):
    """``width`` 1 is the committed fixtures' size (43k weights); the benchmark also converts wider ones."""

    def __init__(self, bias: bool = False, width: int = 1) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16 * width, 3, padding=1)
        self.dw = torch.nn.Conv2d(16 * width, 16 * width, 3, padding=1, groups=16 * width)
        self.c2 = torch.nn.Conv2d(16 * width, 32 * width, 3, padding=1, bias=bias)
        self.fc = torch.nn.Linear(32 * width * 6 * 6, 32 * width)
        self.out = torch.nn.Linear(32 * width, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.dw(x))
        x = torch.relu(self.c2(x))
        x = torch.nn.functional.max_pool2d(x, 2).flatten(1)
        return self.out(torch.relu(self.fc(x)))


def base(width: int) -> Cnn:
    torch.manual_seed(0)
    return Cnn(width=width).eval()


def _train(m: Cnn, seed: int, rows: float | None) -> Cnn:
    """A short fine-tune (Adam at ``LR``, 20 steps on fixed random data): a real training update.
    With ``rows``, only that share of each weight's output channels (dimension 0 in PyTorch, and
    the same channels' bias entries) may move."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((64, *INPUT[1:]), generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    masks = {}
    if rows is not None:
        for layer in (m.c1, m.dw, m.c2, m.fc, m.out):
            n = layer.weight.shape[0]
            keep = torch.zeros(n, dtype=torch.bool)
            keep[torch.randperm(n, generator=g)[:max(1, round(n * rows))]] = True
            masks[layer.weight] = keep.view(-1, *[1] * (layer.weight.dim() - 1))
            if layer.bias is not None:
                masks[layer.bias] = keep
    frozen = {p: p.detach().clone() for p in masks}
    opt = torch.optim.Adam(m.parameters(), lr=LR)
    m.train()
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        with torch.no_grad():  # Adam's moments would move masked weights: put them back every step
            for p, keep in masks.items():
                p.copy_(torch.where(keep, p, frozen[p]))
    return m.eval()


def channels(m: Cnn) -> Cnn:
    return _train(m, 1, 0.1)


def moved(m: Cnn) -> Cnn:
    return _train(m, 2, None)


def bias(m: Cnn) -> Cnn:
    out = Cnn(bias=True, width=m.c1.out_channels // 16).eval()
    out.load_state_dict(m.state_dict(), strict=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        out.c2.bias.copy_(0.05 * torch.randn(out.c2.bias.shape, generator=g))
    return out


def convert(m: Cnn, name: str, out: str) -> str:
    path = os.path.join(out, f"{name}.tflite")
    litert_torch.convert(m, (torch.zeros(INPUT),)).export(path)
    return path


def quantize(src: str, name: str, out: str) -> str:
    q = quantizer.Quantizer(src)
    q.load_quantization_recipe(recipe.dynamic_wi8_afp32())  # int8 weights, per-channel scales
    path = os.path.join(out, f"{name}.tflite")
    q.quantize().export_model(path, overwrite=True)
    return path


def strip(src: str, name: str, out: str) -> None:
    with open(src, "rb") as f:
        model = flatbuffer_utils.read_model_from_bytearray(bytearray(f.read()))
    flatbuffer_utils.strip_strings(model)
    flatbuffer_utils.write_model(model, os.path.join(out, f"{name}.tflite"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=HERE, help="folder to write to (default: beside this script)")
    ap.add_argument("--width", type=int, default=1, help="channel multiplier (1: the committed fixtures)")
    args = ap.parse_args()
    out, w = args.out, args.width
    os.makedirs(out, exist_ok=True)
    made = {"cnn": convert(base(w), "cnn", out)}
    for change in (channels, moved, bias):
        made[f"cnn-{change.__name__}"] = convert(change(base(w)), f"cnn-{change.__name__}", out)
    for name, path in list(made.items()):
        made[name.replace("cnn", "cnn-int8")] = quantize(path, name.replace("cnn", "cnn-int8"), out)
    strip(made["cnn-int8"], "cnn-stripped", out)
    strip(made["cnn-int8-channels"], "cnn-stripped-channels", out)
    for path in os.listdir(out):
        if path.endswith(".tflite"):
            os.chmod(os.path.join(out, path), 0o644)  # the quantizer writes its files executable


if __name__ == "__main__":
    main()
