"""Mean compensation keeps the output mean, EC the output energy, least squares rebuilds the output best;
checkpoints reload."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from adaptprune.arch import ATTENTION, MLP, get_adapter, hf_compat
from adaptprune.calibration.activations import ChannelStats, calibrate
from adaptprune.checkpoint import save_checkpoint
from adaptprune.pruning.compensation import (
    MODES,
    apply_compensated_plan,
    compensate,
    energy_scale,
    least_squares_delta,
    mean_shift,
)

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
        compensate(torch.ones(3, 2), stats, torch.tensor([True, False]), "mean+energy")
    assert compensate(torch.ones(3, 2), stats, torch.tensor([True, True]), "energy").scale == 1.0


# ---- on a model --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [MLP, ATTENTION])
def test_mean_compensation_keeps_the_output_mean(kind):
    model, seqs = tiny_llama(num_heads=6, num_kv_heads=3), _sequences()
    dense = _outputs(model, seqs, kind)
    calib = calibrate(model, seqs, progress=False)
    plain = tiny_llama(num_heads=6, num_kv_heads=3)
    apply_compensated_plan(plain, _plan(plain, kind), None, "none")
    apply_compensated_plan(model, _plan(model, kind), calib, "mean")
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
    apply_compensated_plan(model, _plan(model, kind), calib, "mean+energy" if with_mean else "energy")
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
    records = apply_compensated_plan(model, plan, calib, "mean+energy")
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
    apply_compensated_plan(model, {0: {MLP: list(range(50))}}, calib, "mean")
    with pytest.raises(ValueError, match="recalibrate"):
        apply_compensated_plan(model, {0: {MLP: list(range(10))}}, calib, "mean")


# ---- least squares -------------------------------------------------------------------------------
def _stats_of(x: torch.Tensor) -> ChannelStats:
    """Exact statistics of rows x (n, C), float64, as calibration collects them."""
    x = x.double()
    mean = x.mean(0)
    var = (x - mean).square().mean(0)
    return ChannelStats(x.shape[0], mean, var, var + mean.square(), x.T @ x / x.shape[0])


def _rebuilt(weight, bias, stats, kept, mode, ridge=0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of one projection after ``compensate``, the removed columns dropped."""
    comp = compensate(weight, stats, kept, mode, ridge)
    w = weight.double()[:, kept] * comp.scale
    w = w + comp.weight_delta if comp.weight_delta is not None else w
    b = bias.double() + (comp.bias_delta if comp.bias_delta is not None else 0)
    return w, b


def test_least_squares_is_exact_when_removed_inputs_are_combinations_of_kept_ones():
    torch.manual_seed(0)
    x_kept = torch.randn(200, 5, dtype=torch.float64) + 0.3
    x = torch.cat([x_kept, x_kept @ torch.randn(5, 3, dtype=torch.float64) + 1.5], dim=1)  # (200, 8)
    weight, bias = torch.randn(4, 8), torch.randn(4)
    kept = torch.tensor([True] * 5 + [False] * 3)
    w, b = _rebuilt(weight, bias, _stats_of(x), kept, "least_squares", ridge=0.0)
    dense = x @ weight.double().T + bias.double()
    torch.testing.assert_close(x_kept @ w.T + b, dense, rtol=0, atol=1e-9)
    w_mean, b_mean = _rebuilt(weight, bias, _stats_of(x), kept, "mean")
    assert _rel(x_kept @ w_mean.T + b_mean, dense) > 1e-2  # the test can fail


def test_least_squares_ridge_to_infinity_is_mean_compensation():
    torch.manual_seed(1)
    x = torch.randn(100, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    weight, bias, kept = torch.randn(3, 6), torch.randn(3), torch.tensor([True, False, True, True, False, True])
    w_mean, b_mean = _rebuilt(weight, bias, _stats_of(x), kept, "mean")
    changes = []
    for ridge in (1e-2, 1.0, 1e2, 1e4):
        w, _ = _rebuilt(weight, bias, _stats_of(x), kept, "least_squares", ridge)
        changes.append((w - w_mean).norm().item())
    assert changes == sorted(changes, reverse=True) and changes[0] > 1e-2
    w, b = _rebuilt(weight, bias, _stats_of(x), kept, "least_squares", 1e12)
    torch.testing.assert_close(w, w_mean, rtol=0, atol=1e-8)
    torch.testing.assert_close(b, b_mean, rtol=0, atol=1e-8)


def test_least_squares_on_a_singular_covariance_stays_finite_and_exact():
    x = torch.zeros(50, 6, dtype=torch.float64)
    x[:, 0] = torch.linspace(-1, 1, 50)
    x[:, 1] = x[:, 0]  # kept channels 0 and 1 are one channel twice, 2 and 3 never fire: C_KK is singular
    x[:, 4] = 2 * x[:, 0]
    kept = torch.tensor([True, True, True, True, False, False])
    stats = _stats_of(x)
    delta = least_squares_delta(torch.randn(3, 6), stats.cov, torch.arange(4), torch.tensor([4, 5]), 0.0, stats.mean)
    assert torch.isfinite(delta).all()
    weight, bias = torch.randn(3, 6), torch.randn(3)
    w, b = _rebuilt(weight, bias, stats, kept, "least_squares", ridge=0.0)
    torch.testing.assert_close(x[:, :4] @ w.T + b, x @ weight.double().T + bias.double(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", [MLP, ATTENTION])
def test_least_squares_rebuilds_the_layer_output_best(kind):
    """On the calibration text itself, least squares' output error is no larger than any other mode's."""
    seqs = _sequences()
    errors = {}
    for mode in MODES:
        model = tiny_llama(num_heads=6, num_kv_heads=3)
        dense = _outputs(model, seqs, kind)
        calib = calibrate(model, seqs, collect_cov=True, progress=False)
        apply_compensated_plan(model, _plan(model, kind), calib, mode, ridge=1e-6)
        errors[mode] = _rel(_outputs(model, seqs, kind), dense)
    assert errors["least_squares"] <= min(errors.values()) + 1e-9, errors
    assert errors["least_squares"] < 0.9 * errors["mean"], errors  # it does more than the bias


def test_least_squares_checkpoint_reloads_with_identical_logits(tmp_path):
    model, seqs = tiny_llama(num_heads=6, num_kv_heads=2), _sequences()
    calib = calibrate(model, seqs, collect_cov=True, progress=False)
    apply_compensated_plan(model, {0: {MLP: list(range(0, 96, 2)), ATTENTION: [1]}}, calib, "least_squares", 1e-2)
    with torch.no_grad():
        before = model(input_ids=seqs).logits
    reloaded = AutoModelForCausalLM.from_pretrained(save_checkpoint(model, tmp_path / "ckpt")).eval()
    with torch.no_grad():
        assert torch.equal(before, reloaded(input_ids=seqs).logits)


def test_unknown_compensation_is_refused():
    stats = _stats_of(torch.randn(10, 2))
    with pytest.raises(ValueError, match="compensation must be one of"):
        compensate(torch.ones(3, 2), stats, torch.tensor([True, False]), "lstsq")


def test_least_squares_holds_a_bias_vector_per_projection_not_a_weight_matrix():
    """Memory: each layer's Δ goes into its kept columns at once, so the step holds O(out) per projection
    beyond the statistics (peak: one layer's solve), not one (out, |K|) float64 matrix per layer."""
    from adaptprune.pruning import compensation

    model, seqs = tiny_llama(num_heads=6, num_kv_heads=3), _sequences()
    calib = calibrate(model, seqs, collect_cov=True, progress=False)
    plan = {i: {MLP: list(range(0, 96, 2)), ATTENTION: [0, 2]} for i in range(3)}
    held = compensation._plan_compensations(model, plan, calib, "least_squares", 1e-2, get_adapter(model))
    assert len(held) == 6
    assert all(c.weight_delta is None and c.bias_delta.shape == (model.config.hidden_size,) for _, _, c in held)
