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

import math
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


MODES = ("none", "mean", "energy", "mean+energy", "least_squares")  # prune.compensation


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
) -> Tensor:
    """Δ = W_R C_RK (C_KK + λ I)⁻¹, (out, |K|) float64, λ = ``ridge`` × mean(diag C_KK).

    ``moment`` is Σ = E[x xᵀ]; with ``mean`` the blocks are centred (C = Σ − μμᵀ) one block at a time.
    Memory: the K×K block, factored in place, and the K×R block while it is used: about one layer's Σ.
    """
    w = weight.detach().double()
    kept, removed = kept.to(moment.device), removed.to(moment.device)
    c_kk = moment[kept[:, None], kept].double()  # (K, K), a copy
    c_kr = moment[kept[:, None], removed].double()  # (K, R)
    if mean is not None:
        mu = mean.double().to(moment.device)
        c_kk.addr_(mu[kept], mu[kept], alpha=-1.0)
        c_kr.addr_(mu[kept], mu[removed], alpha=-1.0)
    rhs = c_kr.to(w.device) @ w[:, removed].T  # C_KR W_Rᵀ: (K, out)
    del c_kr
    c_kk = c_kk.to(w.device)
    c_kk.diagonal().add_(ridge * float(c_kk.diagonal().mean()))
    _, info = torch.linalg.cholesky_ex(c_kk, out=(c_kk, torch.empty((), dtype=torch.int32, device=c_kk.device)))
    if int(info) == 0:
        x = torch.cholesky_solve(rhs, c_kk)
    else:  # singular (λ = 0, rank-poor data): the minimum-norm solution of the rebuilt A
        x = torch.linalg.pinv(_rebuilt_block(moment, mean, kept, ridge, w.device), hermitian=True) @ rhs
    return x.T if bool(torch.isfinite(x).all()) else torch.zeros_like(w[:, kept])


def _rebuilt_block(moment: Tensor, mean: Tensor | None, kept: Tensor, ridge: float, device) -> Tensor:
    """C_KK + λI again (the in-place factorisation overwrote it); only for the rare singular case."""
    a = moment[kept[:, None], kept].double()
    if mean is not None:
        mu = mean.double().to(moment.device)
        a.addr_(mu[kept], mu[kept], alpha=-1.0)
    a = a.to(device)
    a.diagonal().add_(ridge * float(a.diagonal().mean()))
    return a


def compensate(
    weight: Tensor, stats: ChannelStats, kept_channels: Tensor, mode: str = "mean", ridge: float = 0.0
) -> Compensation:
    """The compensation (``mode`` in ``MODES``) of one (out, C) output-side weight keeping ``kept_channels``."""
    if mode not in MODES:
        raise ValueError(f"compensation must be one of {MODES}, got {mode!r}")
    mean = mode in ("mean", "mean+energy", "least_squares")
    kept = kept_channels.nonzero().flatten()
    removed = (~kept_channels).nonzero().flatten()
    if mode in ("energy", "mean+energy", "least_squares") and removed.numel() and stats.cov is None:
        raise ValueError(f"{mode} compensation needs Σ = E[x xᵀ]: calibrate with collect_cov=True")
    mu = stats.mean.double()
    if mode == "least_squares" and removed.numel() and kept.numel():
        delta = least_squares_delta(weight, stats.cov, kept, removed, ridge, mean=stats.mean)  # centred blocks
        shift = mean_shift(weight, stats.mean, removed) - delta @ mu.to(delta.device)[kept]
        return Compensation(scale=1.0, bias_delta=shift, weight_delta=delta)
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


# ---- model walking --------------------------------------------------------------------------
def _plan_compensations(
    model: nn.Module, plan: Plan, calib: CalibrationResult, mode: str, ridge: float, adapter: ArchAdapter
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
            stats = calib.layers[layer_idx].channels(kind)
            if stats.mean.numel() != kept_channels.numel():
                raise ValueError(
                    f"layer {layer_idx} {kind}: statistics cover {stats.mean.numel()} channels, the layer has "
                    f"{kept_channels.numel()}; recalibrate after surgery"
                )
            comp = compensate(weight, stats, kept_channels, mode, ridge)
            if comp.weight_delta is not None:  # into the dense kept columns now: no (out, |K|) matrix is held
                with torch.no_grad():  # for later layers, and the surgery slices the columns out as they are
                    columns = kept_channels.nonzero().flatten().to(weight.device)
                    weight.index_add_(1, columns, comp.weight_delta.to(weight.dtype))
                comp = Compensation(scale=comp.scale, bias_delta=comp.bias_delta)
            out.append((layer_idx, coupling.path, comp))
    return out


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
    calib: CalibrationResult | None,
    mode: str = "mean",
    ridge: float = 0.0,
    adapter: ArchAdapter | None = None,
) -> list[KeptRecord]:
    """Compute every (layer, kind)'s compensation from the dense weights, remove the units with
    ``surgery.apply_plan``, then write the compensation into the rebuilt output projections.

    ``mode`` is one of ``MODES``; ``ridge`` is least squares' λ relative to mean(diag C_KK). A mode
    with a bias (mean, mean+energy, least_squares) gives every layer's o/down projection one
    (``surgery.ensure_output_biases``; the config flag makes saved checkpoints rebuild it). With
    ``none`` this is exactly ``surgery.apply_plan``.
    """
    adapter = adapter or get_adapter(model)
    if mode == "none":
        return apply_plan(model, plan, adapter)
    if calib is None:
        raise ValueError("compensation needs calibration statistics (calib=None)")
    compensations = _plan_compensations(model, plan, calib, mode, ridge, adapter)
    if mode != "energy" and compensations:
        ensure_output_biases(model, adapter)
    records = apply_plan(model, plan, adapter)
    layers = adapter.decoder_layers(model)
    for layer_idx, path, comp in compensations:
        _apply_to_linear(layers[layer_idx].get_submodule(path), comp)
    return records
