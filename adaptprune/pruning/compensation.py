"""Closed-form compensation applied together with unit removal (no training).

For one output-side projection y = W x + b (down for MLP neurons, o for attention groups) with
calibration statistics of x — mean μ, raw second moment Σ = E[x xᵀ] and C = Σ − μμᵀ — and the
input channels split into kept K and removed R:

- **Mean compensation** (FLAP, arXiv 2312.11983; STADE, arXiv 2503.22451):
  b ← b + W[:, R] μ_R, so E[y] on the calibration data is unchanged by the removal.
- **Energy compensation, EC** (arXiv 2602.07375): the kept columns are rescaled,
  W[:, K] ← γ W[:, K], so the output's energy matches the dense layer's. Energy is that of the
  weight term W x (a bias is a constant and is left out):
    * EC alone: the raw energy E‖W x‖² = tr(W Σ Wᵀ) is matched,
      γ = sqrt(tr(W Σ Wᵀ) / tr(W_K Σ_KK W_Kᵀ)).
    * EC with mean compensation: the bias carries the mean, γ matches the *centred* energy
      tr(W C Wᵀ) (the output's total variance), γ = sqrt(tr(W C Wᵀ) / tr(W_K C_KK W_Kᵀ)),
      and the bias becomes b + W μ − γ W_K μ_K. Mean and raw energy then both equal the dense
      layer's, because E‖y‖² = ‖E y‖² + tr Cov(y).
  γ = 1 when nothing is removed, nothing is kept or the kept part has no energy.
- **Least squares** (the structured OBS rebuild of SlimGPT, arXiv 2412.18110, and ZipLM,
  arXiv 2302.04089): the kept columns are rebuilt from the inputs that stay,
    W_K ← W_K + Δ,  Δ = W_R C_RK (C_KK + λ I)⁻¹,  b ← b + W_R μ_R − Δ μ_K,
  the minimiser of E‖(W x + b) − (W_K' x_K + b')‖² + λ‖W_K' − W_K‖² over the calibration data
  (centred C: the bias carries the mean, so b' is free). λ = ``ridge`` × mean(diag C_KK): a small
  or rank-poor calibration set cannot blow the weights up, and λ → ∞ is mean compensation (Δ → 0).
  With λ = 0 and removed inputs that are linear functions of kept ones, the layer's output on the
  calibration data is reproduced exactly. C_KK + λI is solved by Cholesky in float64, a singular
  one (λ = 0, rank-poor data) by the pseudo-inverse. GQA needs nothing special: the channels of a
  removed KV group leave together, and K and R are channel sets.

The pure math (``mean_shift``, ``energy_scale``, ``compensate``) works on tensors; the model
walking (``apply_compensated_plan``) computes every compensation from the dense weights, lets
``surgery.apply_plan`` remove the units, then writes γ and the bias into the rebuilt output
projections. Statistics must come from the model as it is now (same units).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..allocation.records import KeptRecord, Plan
from ..arch import UNIT_KINDS, ArchAdapter, get_adapter
from ..calibration.activations import CalibrationResult, ChannelStats
from .surgery import apply_plan, ensure_output_biases


@dataclass(frozen=True)
class Compensation:
    """What to do to one output-side linear: scale kept columns, add to the bias."""

    scale: float  # γ applied to the kept columns (1.0 without EC)
    bias_delta: Tensor | None  # (out,) float64 added to the bias; None without mean compensation
    weight_delta: Tensor | None = None  # (out, |K|) float64 added to the kept columns (least squares)
    fallback: str | None = None  # why a weaker compensation was applied instead (one line for the log)


MODES = ("none", "mean", "energy", "mean+energy", "least_squares", "least_squares_no_bias")  # prune.compensation
LEAST_SQUARES = ("least_squares", "least_squares_no_bias")
BIAS_MODES = ("mean", "mean+energy", "least_squares")  # the modes that write an o/down bias


# ---- pure tensor math ----------------------------------------------------------------------
def mean_shift(weight: Tensor, mean: Tensor, removed: Tensor) -> Tensor:
    """W[:, R] μ_R, float64 (out,): the removed channels' mean contribution."""
    w = weight.detach().double()
    return w[:, removed] @ mean.double().to(w.device)[removed]


def output_energy(weight: Tensor, moment: Tensor) -> float:
    """tr(W M Wᵀ) for an (out, C) weight and a (C, C) moment matrix M, in float64."""
    w = weight.detach().double()
    return float(((w @ moment.double().to(w.device)) * w).sum())


def energy_scale(weight: Tensor, moment: Tensor, kept: Tensor) -> float:
    """γ = sqrt(tr(W M Wᵀ) / tr(W_K M_KK W_Kᵀ)) (EC); 1.0 when the ratio is undefined."""
    if kept.numel() == 0:
        return 1.0
    kept_energy = output_energy(weight[:, kept], moment[kept][:, kept])
    if not kept_energy > 0:
        return 1.0
    ratio = output_energy(weight, moment) / kept_energy
    return math.sqrt(ratio) if math.isfinite(ratio) and ratio > 0 else 1.0


def least_squares_delta(
    weight: Tensor, moment: Tensor, kept: Tensor, removed: Tensor, ridge: float, mean: Tensor | None = None
) -> Tensor | None:
    """Δ = W_R C_RK (C_KK + λ I)⁻¹, (out, |K|) float64, λ = ``ridge`` × mean(diag C_KK); None if not finite.

    ``moment`` is Σ = E[x xᵀ]; with ``mean`` the blocks are centred (C = Σ − μμᵀ) one block at a time.
    Memory: the K×K block, factored in place, and the K×R block while it is used: about one layer's Σ.
    """
    w = weight.detach().double()
    kept, removed = kept.to(moment.device), removed.to(moment.device)
    c_kr = _centred_block(moment, mean, mean, kept, removed)  # (K, R)
    rhs = c_kr.to(w.device) @ w[:, removed].T  # C_KR W_Rᵀ: (K, out)
    del c_kr
    x = _ridge_solve(lambda: _centred_block(moment, mean, mean, kept, kept).to(w.device), rhs, ridge)
    return x.T if bool(torch.isfinite(x).all()) else None


def transfer_delta(
    weight: Tensor, stats: ChannelStats, kept: Tensor, ridge: float, centred: bool = True
) -> Tensor | None:
    """Δ = (W C_xK − W_K C̃_KK)(C̃_KK + λ I)⁻¹ towards the layer before the step; None if not finite.

    x are the inputs before the step (``stats.cross`` rows, ``stats.before_mean``), x̃ the inputs now
    (``stats.cov``, ``stats.mean``); C_xK = E[x x̃_Kᵀ] − μ μ̃_Kᵀ (C, K) and C̃_KK the centred K×K block of x̃.
    """
    w = weight.detach().double()
    kept = kept.to(stats.cov.device)
    all_rows = torch.arange(stats.cross.shape[0], device=stats.cov.device)
    before, now = (stats.before_mean, stats.mean) if centred else (None, None)  # raw moments without a bias
    c_xk = _centred_block(stats.cross, before, now, all_rows, kept)  # (C, K)
    rhs = c_xk.to(w.device).T @ w.T  # C_xKᵀ Wᵀ: (K, out)
    del c_xk
    c_kk = _centred_block(stats.cov, now, now, kept, kept).to(w.device)
    rhs -= c_kk @ w[:, kept].T  # − C̃_KK W_Kᵀ
    del c_kk
    x = _ridge_solve(lambda: _centred_block(stats.cov, now, now, kept, kept).to(w.device), rhs, ridge)
    return x.T if bool(torch.isfinite(x).all()) else None


def _centred_block(moment: Tensor, row_mean: Tensor | None, col_mean: Tensor | None, rows: Tensor, cols: Tensor):
    """M[rows, cols] − μ_rows μ_colsᵀ in float64 (a copy; uncentred without means)."""
    block = moment[rows[:, None], cols].double()
    if row_mean is not None:
        block.addr_(row_mean.double().to(moment.device)[rows], col_mean.double().to(moment.device)[cols], alpha=-1.0)
    return block


def _ridge_solve(block: Callable[[], Tensor], rhs: Tensor, ridge: float) -> Tensor:
    """(A + λ I)⁻¹ rhs with A = ``block()``, λ = ``ridge`` × mean(diag A).

    A is factored by Cholesky in place (one K×K float64 block held); a singular one (λ = 0, rank-poor
    data) is built again for the minimum-norm solution by the pseudo-inverse.
    """
    a = block()
    a.diagonal().add_(ridge * float(a.diagonal().mean()))
    _, info = torch.linalg.cholesky_ex(a, out=(a, torch.empty((), dtype=torch.int32, device=a.device)))
    if int(info) == 0:
        return torch.cholesky_solve(rhs, a)
    a = block()
    a.diagonal().add_(ridge * float(a.diagonal().mean()))
    return torch.linalg.pinv(a, hermitian=True) @ rhs


def compensate(
    weight: Tensor, stats: ChannelStats, kept_channels: Tensor, mode: str = "mean", ridge: float = 0.0
) -> Compensation:
    """The compensation (``mode`` in ``MODES``) of one (out, C) output-side weight keeping ``kept_channels``.

    Least squares fits the layer as it is (``least_squares_delta``) or, when ``stats`` carries the
    inputs before the step (``stats.cross``), the layer as it was on them (``transfer_delta``). A solve
    that is not finite falls back to mean compensation and says so in ``Compensation.fallback``.
    """
    if mode not in MODES:
        raise ValueError(f"compensation must be one of {MODES}, got {mode!r}")
    mean = mode in BIAS_MODES
    kept = kept_channels.nonzero().flatten()
    removed = (~kept_channels).nonzero().flatten()
    if mode in ("energy", "mean+energy", *LEAST_SQUARES) and removed.numel() and stats.cov is None:
        raise ValueError(f"{mode} compensation needs Σ = E[x xᵀ]: calibrate with collect_cov=True")
    mu = stats.mean.double()
    if mode in LEAST_SQUARES and kept.numel() and (removed.numel() or stats.cross is not None):
        return _least_squares(weight, stats, kept, removed, ridge, centred=mean)
    scale = 1.0
    if mode in ("energy", "mean+energy") and removed.numel():
        moment = stats.cov - torch.outer(mu, mu) if mean else stats.cov  # centred when the bias carries the mean
        scale = energy_scale(weight, moment, kept)
    bias_delta = None
    if mean:
        bias_delta = mean_shift(weight, stats.mean, removed)
        if scale != 1.0:  # the rescaled kept columns shift the mean by (γ − 1) W_K μ_K; undo that
            bias_delta = bias_delta - (scale - 1.0) * mean_shift(weight, stats.mean, kept)
    return Compensation(scale=scale, bias_delta=bias_delta)


def _least_squares(
    weight: Tensor, stats: ChannelStats, kept: Tensor, removed: Tensor, ridge: float, centred: bool
) -> Compensation:
    """Least squares with the mean in the bias (``centred``) or without a bias: the same solve on raw moments,
    Δ = W_R Σ_RK (Σ_KK + λI)⁻¹, the best rebuild when the projection has nowhere to put a constant."""
    if stats.cross is not None:
        delta = transfer_delta(weight, stats, kept, ridge, centred)
    else:
        delta = least_squares_delta(weight, stats.cov, kept, removed, ridge, mean=stats.mean if centred else None)
    if delta is None:
        shift = _mean_bias_shift(weight, stats, kept, removed) if centred else None
        return Compensation(1.0, shift, fallback="least squares not finite")
    shift = _rebuilt_bias_shift(weight, stats, kept, delta) if centred else None
    return Compensation(scale=1.0, bias_delta=shift, weight_delta=delta)


def _rebuilt_bias_shift(weight: Tensor, stats: ChannelStats, kept: Tensor, delta: Tensor) -> Tensor:
    """b' − b = W μ_before − (W_K + Δ) μ̃_K: the mean the rebuilt columns miss goes into the bias.

    Without a before-the-step stream μ_before = μ̃, and this is W_R μ_R − Δ μ_K."""
    w = weight.detach().double()
    mu_now = stats.mean.double().to(w.device)
    mu_before = stats.before_mean.double().to(w.device) if stats.before_mean is not None else mu_now
    return w @ mu_before - (w[:, kept] + delta.to(w.device)) @ mu_now[kept]


def _mean_bias_shift(weight: Tensor, stats: ChannelStats, kept: Tensor, removed: Tensor) -> Tensor:
    """Mean compensation, towards the layer before the step when its inputs are known."""
    if stats.before_mean is None:
        return mean_shift(weight, stats.mean, removed)
    w = weight.detach().double()
    return w @ stats.before_mean.double().to(w.device) - w[:, kept] @ stats.mean.double().to(w.device)[kept]


# ---- model walking --------------------------------------------------------------------------
Statistics = CalibrationResult | Mapping[tuple[int, str], ChannelStats]  # a whole pass, or (layer, kind) -> stats
log = logging.getLogger(__name__)


def _stats_of(calib: Statistics, layer_idx: int, kind: str) -> ChannelStats:
    if isinstance(calib, CalibrationResult):
        return calib.layers[layer_idx].channels(kind)
    return calib[(layer_idx, kind)]


def _plan_compensations(
    model: nn.Module, plan: Plan, calib: Statistics, mode: str, ridge: float, adapter: ArchAdapter
) -> list[tuple[int, str, Compensation]]:
    """(layer, output path, compensation) for every (layer, kind) of the plan, from dense weights.

    One (layer, kind) at a time: a least-squares solve's float64 temporaries are one layer's, and its
    Δ goes into the kept columns at once, so what stays held is a bias vector per projection."""
    layers = adapter.decoder_layers(model)
    out = []
    for layer_idx in sorted(plan):
        for kind, keep in plan[layer_idx].items():
            if kind not in UNIT_KINDS:
                continue  # apply_plan raises the clear error
            coupling = adapter.output_coupling(model, layer_idx, kind)
            weight = layers[layer_idx].get_submodule(coupling.path).weight
            kept_channels = torch.isin(coupling.unit_ids, torch.as_tensor(list(keep), dtype=torch.long))
            stats = _stats_of(calib, layer_idx, kind)
            if stats.mean.numel() != kept_channels.numel():
                raise ValueError(
                    f"layer {layer_idx} {kind}: statistics cover {stats.mean.numel()} channels, the layer has "
                    f"{kept_channels.numel()}; recalibrate after surgery"
                )
            comp = _finite_compensation(weight, stats, kept_channels, mode, ridge, f"layer {layer_idx} {kind}")
            if comp.weight_delta is not None:  # into the dense kept columns now: no (out, |K|) matrix is held
                with torch.no_grad():  # for later layers, and the surgery slices the columns out as they are
                    columns = kept_channels.nonzero().flatten().to(weight.device)
                    weight.index_add_(1, columns, comp.weight_delta.to(weight.dtype))
                comp = Compensation(scale=comp.scale, bias_delta=comp.bias_delta)
            out.append((layer_idx, coupling.path, comp))
    return out


def _finite_compensation(
    weight: Tensor, stats: ChannelStats, kept_channels: Tensor, mode: str, ridge: float, where: str
) -> Compensation:
    """``compensate``, or none at all when the statistics themselves are not finite (bad calibration text);
    either fallback is said in one line that names the layer."""
    moments = [t for t in (stats.mean, stats.cov, stats.cross, stats.before_mean) if t is not None]
    if not all(bool(torch.isfinite(t).all()) for t in moments):
        log.warning("%s: calibration statistics are not finite; units removed without compensation", where)
        return Compensation(scale=1.0, bias_delta=None)
    comp = compensate(weight, stats, kept_channels, mode, ridge)
    if comp.fallback:
        log.warning("%s: %s; mean compensation instead", where, comp.fallback)
    return comp


def _apply_to_linear(linear: nn.Linear, comp: Compensation) -> None:
    """Scale the (already sliced, all kept) weight by γ, add Δ and add to the bias, in place."""
    with torch.no_grad():
        if comp.scale != 1.0:
            linear.weight.mul_(comp.scale)
        if comp.weight_delta is not None:
            linear.weight.add_(comp.weight_delta.to(device=linear.weight.device, dtype=linear.weight.dtype))
        if comp.bias_delta is not None:
            linear.bias.add_(comp.bias_delta.to(device=linear.bias.device, dtype=linear.bias.dtype))


def apply_compensated_plan(
    model: nn.Module,
    plan: Plan,
    calib: Statistics | None,
    mode: str = "mean",
    ridge: float = 0.0,
    adapter: ArchAdapter | None = None,
    check: bool = True,
) -> list[KeptRecord]:
    """Compute every (layer, kind)'s compensation from the dense weights, remove the units with
    ``surgery.apply_plan``, then write the compensation into the rebuilt output projections.

    ``mode`` is one of ``MODES``; ``ridge`` is least squares' λ relative to mean(diag C_KK). A mode
    with a bias (mean, mean+energy, least_squares) gives every layer's o/down projection one
    (``surgery.ensure_output_biases``; the config flag makes saved checkpoints rebuild it). With
    ``none`` this is exactly ``surgery.apply_plan`` (``check``: its invariants, see there).
    """
    adapter = adapter or get_adapter(model)
    if mode == "none":
        return apply_plan(model, plan, adapter, check=check)
    if calib is None:
        raise ValueError("compensation needs calibration statistics (calib=None)")
    compensations = _plan_compensations(model, plan, calib, mode, ridge, adapter)
    if mode in BIAS_MODES and compensations:
        ensure_output_biases(model, adapter)
    records = apply_plan(model, plan, adapter, check=check)
    layers = adapter.decoder_layers(model)
    for layer_idx, path, comp in compensations:
        _apply_to_linear(layers[layer_idx].get_submodule(path), comp)
    return records
