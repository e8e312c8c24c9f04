"""train-sparse --budget counts the whole patch: the estimate against the written bytes, the fit, exactness."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from nnpatch.cli import cli  # noqa: E402
from nnpatch.hashing import hash_file  # noqa: E402
from nnpatch.trainer.channels import group_channels  # noqa: E402
from nnpatch.trainer.fit import reset_channels  # noqa: E402
from nnpatch.trainer.patch_cost import PatchCost  # noqa: E402
from nnpatch.trainer.probes import _noisy, measure  # noqa: E402
from nnpatch.trainer.quant import exact_update  # noqa: E402
from nnpatch.trainer.recipes import DigitsCNN  # noqa: E402
from nnpatch.trainer.run import save_weights  # noqa: E402

pytestmark = pytest.mark.torch


def _written(tmp_path, base_state, target, deltas=None) -> int:
    import nnpatch

    save_weights(base_state, tmp_path / "b.safetensors")
    save_weights(target, tmp_path / "t.safetensors")
    return nnpatch.diff(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"),
                        str(tmp_path / "p.nnpatch"), quantized=deltas).patch_size


@pytest.mark.parametrize("bits", [None, 4])
def test_the_estimate_of_a_channel_set_is_the_written_patch_within_a_few_percent(tmp_path, bits):
    """The probes price the fixed part, each tensor's op and the values; a patch of another channel set,
    with other values, comes out within 5 % of the estimate (digits-sized model, untrained)."""
    torch.manual_seed(0)
    model = DigitsCNN(10)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    groups = group_channels(model)
    cost = measure(groups, base, free=set(), delta_bits=bits, seed=0)
    n = sum(g.size for g in groups)
    assert cost.fixed < cost.cheapest() < cost.total() and len(cost.values) == n
    gen = torch.Generator().manual_seed(5)
    for share in (0.1, 0.3):
        chosen = torch.rand(n, generator=gen) < share
        # values of the probes' kind, from another seed: this checks the estimate's sums (fixed part, each
        # tensor's op, each channel) on another channel set; how trained values compare with the probes'
        # is the digits runs' test below
        moved = _noisy(base, groups, 5 + int(share * 10), quantized=bits is not None)
        target = {k: v.clone() for k, v in base.items()}
        reset_channels(target, moved, groups, chosen, set(), None)  # the chosen channels take the moved values
        deltas = None
        if bits is not None:
            exact, deltas = exact_update({k: target[k] for k in target if target[k].dim() >= 2}, base, bits)
            target.update(exact)
        written = _written(tmp_path, base, target, deltas)
        assert abs(cost.estimate(chosen) - written) <= 0.05 * written, (share, cost.estimate(chosen), written)


def _digits(tmp_path, name, *args):
    res = CliRunner().invoke(cli, ["train-sparse", "--recipe", "digits", "-o", str(tmp_path / f"{name}.safetensors"),
                                   "--patch", str(tmp_path / f"{name}.nnpatch"), "--json", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("budget, bits", [("8000", None), ("11400", "off"), ("20000", "8")])
def test_a_digits_run_stays_within_its_budget_and_its_patch_rebuilds_the_output(tmp_path, budget, bits):
    """The bar's shape on the recipe: within the budget, the estimate within a few % of the written patch,
    and the patch applied to the base gives the output's BLAKE3 (about 10 s a run on one core)."""
    import nnpatch

    rep = _digits(tmp_path, "n", "--budget", budget, *(["--delta-bits", bits] if bits else []))
    written = (tmp_path / "n.nnpatch").stat().st_size
    assert rep["budget_met"] is True and rep["patch_bytes"] == written <= int(budget)
    assert abs(rep["estimated_update_bytes"] - written) <= 0.06 * written
    if bits is None:  # the width chosen for the budget
        assert rep["delta_bits"] == 4 and rep["chosen_by_budget"] == ["delta_bits"]
    nnpatch.apply(str(tmp_path / "n.base.safetensors"), str(tmp_path / "n.nnpatch"), str(tmp_path / "a.safetensors"))
    assert hash_file(tmp_path / "a.safetensors") == hash_file(tmp_path / "n.safetensors")


def test_the_budget_takes_4_bit_codes_unless_the_whole_full_precision_update_fits():
    from nnpatch.trainer.run import choose_bits

    def cost(value: float) -> PatchCost:  # 10 channels in 2 groups, 100 bytes of overhead each, 500 fixed
        return PatchCost(fixed=500, values=torch.full((10,), value, dtype=torch.float64),
                         overhead=torch.tensor([100.0, 100.0], dtype=torch.float64),
                         group_of=torch.tensor([0] * 5 + [1] * 5))
    measured = {None: cost(40.0), 4: cost(5.0)}
    assert measured[None].total() == 1100 and measured[4].total() == 750
    assert choose_bits(1100, measured) is None  # everything fits as it is: nothing to quantize
    assert choose_bits(1099, measured) == 4
    assert measured[None].share_that_fits(900) == pytest.approx(0.5) and measured[4].share_that_fits(900) == 1.0
