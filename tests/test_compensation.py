"""Mean compensation keeps the output mean, EC keeps the output energy, checkpoints reload."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from adaptprune.arch import ATTENTION, MLP, get_adapter, hf_compat
from adaptprune.calibration import ChannelStats, calibrate
from adaptprune.checkpoint import save_checkpoint
from adaptprune.compensation import apply_compensated_plan, compensate, energy_scale, mean_shift

from .conftest import tiny_llama

LAYER = 1


def _sequences() -> torch.Tensor:
    torch.manual_seed(11)
    return torch.randint(0, 128, (6, 16))


def _outputs(model, seqs, kind) -> torch.Tensor:
    """(tokens, hidden) float64 outputs of layer LAYER's output-side projection of ``kind``."""
    adapter = get_adapter(model)
    path = adapter.mlp_output if kind == MLP else adapter.attention_output
    seen = []
    handle = (
        adapter.decoder_layers(model)[LAYER]
        .get_submodule(path)
        .register_forward_hook(lambda _m, _a, out: seen.append(out.detach().reshape(-1, out.shape[-1]).double()))
    )
    with torch.no_grad():
        model(input_ids=seqs, use_cache=False)
    handle.remove()
    return torch.cat(seen)


def _plan(model, kind):
    """Remove a third of the neurons, or the first KV group, of layer LAYER only (the projection's
    inputs on kept channels are then the dense ones, so its outputs compare token by token)."""
    units = get_adapter(model).count_units(model, LAYER, kind)
    keep = [u for u in range(units) if u % 3] if kind == MLP else list(range(1, units))
    return {LAYER: {kind: keep}}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---- pure math -------------------------------------------------------------------------------
def test_mean_shift_and_energy_scale_by_hand():
    w = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]])
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    assert mean_shift(w, mu, torch.tensor([1, 2])).tolist() == [-2.0, -1.0 + 6.0]
    sigma = torch.diag(torch.tensor([1.0, 4.0, 1.0], dtype=torch.float64))
    # tr(WΣWᵀ) = (1 + 16) + (4 + 9) = 30; keeping column 1: 4·(4 + 1) = 20 -> γ = sqrt(1.5)
    assert energy_scale(w, sigma, torch.tensor([1])) == pytest.approx(math.sqrt(1.5))
    assert energy_scale(w, sigma, torch.tensor([], dtype=torch.long)) == 1.0


def test_compensate_needs_cov_for_energy():
    stats = ChannelStats(
        4, torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="collect_cov=True"):
        compensate(torch.ones(3, 2), stats, torch.tensor([True, False]), mean=True, energy=True)
    assert compensate(torch.ones(3, 2), stats, torch.tensor([True, True]), mean=False, energy=True).scale == 1.0


# ---- on a model --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [MLP, ATTENTION])
def test_mean_compensation_keeps_the_output_mean(kind):
    model, seqs = tiny_llama(num_heads=6, num_kv_heads=3), _sequences()
    dense = _outputs(model, seqs, kind)
    calib = calibrate(model, seqs, progress=False)
    plain = tiny_llama(num_heads=6, num_kv_heads=3)
    apply_compensated_plan(plain, _plan(plain, kind), None, mean=False, energy=False)
    apply_compensated_plan(model, _plan(model, kind), calib, mean=True, energy=False)
    assert getattr(model.config, hf_compat.OUTPUT_BIAS_KEY)
    pruned, uncompensated = _outputs(model, seqs, kind), _outputs(plain, seqs, kind)
    assert _rel(pruned.mean(0), dense.mean(0)) <= 1e-5
    assert _rel(uncompensated.mean(0), dense.mean(0)) > 1e-2  # the test can fail
    # the bias only shifts: the centred outputs are the uncompensated ones
    torch.testing.assert_close(pruned - pruned.mean(0), uncompensated - uncompensated.mean(0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_mean", [False, True], ids=["ec", "ec+mean"])
@pytest.mark.parametrize("kind", [MLP, ATTENTION])
def test_energy_compensation_keeps_the_output_energy(kind, with_mean):
    model, seqs = tiny_llama(num_heads=6, num_kv_heads=3), _sequences()
    dense = _outputs(model, seqs, kind)
    calib = calibrate(model, seqs, collect_cov=True, progress=False)
    apply_compensated_plan(model, _plan(model, kind), calib, mean=with_mean, energy=True)
    pruned = _outputs(model, seqs, kind)
    energy = lambda y: y.square().sum(1).mean().item()  # noqa: E731  E‖y‖² over calibration tokens
    assert energy(pruned) == pytest.approx(energy(dense), rel=1e-4)
    if with_mean:  # mean and centred energy match too
        assert _rel(pruned.mean(0), dense.mean(0)) <= 1e-5
        assert energy(pruned - pruned.mean(0)) == pytest.approx(energy(dense - dense.mean(0)), rel=1e-4)


def test_compensated_checkpoint_reloads_with_identical_logits(tmp_path):
    model, seqs = tiny_llama(num_heads=6, num_kv_heads=2), _sequences()
    calib = calibrate(model, seqs, collect_cov=True, progress=False)
    plan = {0: {MLP: list(range(0, 96, 2)), ATTENTION: [1]}, 2: {MLP: list(range(40))}}
    records = apply_compensated_plan(model, plan, calib, mean=True, energy=True)
    assert [(r.layer, r.kind, len(r.kept)) for r in records] == [(0, MLP, 48), (0, ATTENTION, 1), (2, MLP, 40)]
    o_bias = get_adapter(model).decoder_layers(model)[0].get_submodule("self_attn.o_proj").bias
    assert o_bias is not None and o_bias.abs().max() > 0
    with torch.no_grad():
        before = model(input_ids=seqs).logits
    reloaded = AutoModelForCausalLM.from_pretrained(save_checkpoint(model, tmp_path / "ckpt")).eval()
    with torch.no_grad():
        after = reloaded(input_ids=seqs).logits
    assert torch.equal(before, after)


def test_stale_statistics_are_rejected():
    model, seqs = tiny_llama(), _sequences()
    calib = calibrate(model, seqs, progress=False)
    apply_compensated_plan(model, {0: {MLP: list(range(50))}}, calib, mean=True, energy=False)
    with pytest.raises(ValueError, match="recalibrate"):
        apply_compensated_plan(model, {0: {MLP: list(range(10))}}, calib, mean=True, energy=False)
