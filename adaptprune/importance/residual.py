"""Scores for width and depth pruning: residual-stream channels and whole decoder layers.

**Hidden channels** (Minitron, arXiv 2407.14679, §2.2: an embedding channel's importance is the
activation of the LayerNorm output in that channel, aggregated over tokens and summed over the
layers). From the streamed moments of the residual stream h at its L+1 sampled points p (each
layer's input, then the final norm's input; ``calibrate(..., collect_residual=True)``):

    s_k = Σ_p |g_{p,k}| · sqrt(E[h_{p,k}²] / mean_j E[h_{p,j}²])

g_p is the gain of the norm reading point p (RMSNorm weight; Gemma's 1 + w), and the ratio is
channel k's RMS in units of the stream's RMS at that point, i.e. approximately the RMS of the
norm's output in channel k (exact when the per-token RMS is constant). Dividing by the point's
RMS weights every point alike although the stream grows with depth, as the normalised LN output
Minitron sums does. Higher = keep.

**Norm gain after removal** (see ``reshape``): a norm over the kept channels K divides by
sqrt(Σ_K h²/|K|) where the dense one divided by sqrt(Σ_all h²/D). Multiplying its gain by

    c = sqrt(mean_{k∈K} E[h_k²] / mean_{j<D} E[h_j²])

restores the dense normaliser in expectation (ratio of expectations, not expectation of the
ratio, so it is exact only when the ratio is the same for every token; c = sqrt(D/|K|) when the
removed channels carry no energy, 1 when they carry average energy).

**Layers**: block influence I_l = 1 − mean cos(h_in, h_out) (ShortGPT, arXiv 2403.03853), already
in ``LayerStats.influence``, or the increase of the calibration LM loss when layer l is bypassed
(h_out = h_in), ``layer_drop_losses``. Higher = keep.

The pure tensor maths comes first; the functions that walk a model come last.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..arch import ArchAdapter, get_adapter
from ..calibration.activations import CalibrationResult


# ---- pure tensor maths ---------------------------------------------------------------------------
def relative_rms(sq_mean: Tensor) -> Tensor:
    """sqrt(E[h_k²] / mean_j E[h_j²]) per channel (float64): RMS in units of the stream's RMS."""
    sq = sq_mean.double()
    return (sq / sq.mean().clamp_min(torch.finfo(torch.float64).tiny)).sqrt()


def hidden_channel_scores(sq_means: Sequence[Tensor], gains: Sequence[Tensor | None] | None = None) -> Tensor:
    """s_k = Σ_p |g_{p,k}| · relative_rms(E[h_p²])_k over the stream points p, float64 (D,).

    ``gains[p]`` None (or no ``gains``) means the point has no norm gain (factor 1).
    """
    if not sq_means:
        raise ValueError("need the residual statistics of at least one stream point")
    gains = list(gains) if gains is not None else [None] * len(sq_means)
    if len(gains) != len(sq_means):
        raise ValueError(f"{len(sq_means)} stream points but {len(gains)} norm gains")
    scores = torch.zeros(sq_means[0].shape[0], dtype=torch.float64)
    for sq, gain in zip(sq_means, gains, strict=True):
        term = relative_rms(sq).cpu()
        if gain is not None:
            term = term * gain.detach().double().abs().cpu()
        scores += term
    return scores


def norm_gain_factor(sq_mean: Tensor, kept: Tensor) -> float:
    """c = sqrt(mean_K E[h²] / mean_D E[h²]): the gain factor that restores a norm's dense
    normaliser in expectation once only channels ``kept`` remain."""
    sq = sq_mean.double()
    dense = sq.mean()
    return float((sq[kept.to(sq.device)].mean() / dense).sqrt()) if dense > 0 else 1.0


def loss_increase(base_loss: float, dropped_losses: Sequence[float]) -> Tensor:
    """Layer scores from bypass losses: L(without layer l) − L(full), float64 (layers,)."""
    return torch.tensor(list(dropped_losses), dtype=torch.float64) - base_loss


def influence_scores(influences: Sequence[float]) -> Tensor:
    """Block influence I_l = 1 − mean cos(h_in, h_out) as layer scores, float64 (layers,)."""
    return torch.tensor(list(influences), dtype=torch.float64)


def top_indices(scores: Tensor, keep: int) -> list[int]:
    """The ``keep`` highest-scoring indices, ascending (ties: the lower index wins)."""
    if not 0 < keep <= scores.numel():
        raise ValueError(f"keep must lie in [1, {scores.numel()}], got {keep}")
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:keep])


# ---- model walking -----------------------------------------------------------------------------
def stream_gains(model: nn.Module, adapter: ArchAdapter | None = None) -> list[Tensor | None]:
    """The gain of the norm reading each stream point (L+1 entries; None where there is none)."""
    adapter = adapter or get_adapter(model)
    paths = adapter.stream_norm_paths(model)
    return [adapter.norm_gain(model.get_submodule(p)) if p is not None else None for p in paths]


def hidden_scores(model: nn.Module, calib: CalibrationResult, adapter: ArchAdapter | None = None) -> Tensor:
    """Minitron-style hidden-channel scores of ``model`` from ``calibrate(..., collect_residual=True)``."""
    if calib.residual is None:
        raise ValueError("hidden-channel scores need calibrate(..., collect_residual=True)")
    return hidden_channel_scores([s.sq_mean for s in calib.residual], stream_gains(model, adapter))


class Bypass:
    """A forward hook that makes a decoder layer return its input (h_out = h_in)."""

    def __call__(self, _module, args, kwargs, output):
        h_in = args[0] if args else kwargs["hidden_states"]
        return h_in if not isinstance(output, tuple) else (h_in, *output[1:])


@torch.no_grad()
def _mean_loss(model: nn.Module, batches: Sequence[Tensor]) -> float:
    device = next(model.parameters()).device
    losses = [model(input_ids=b.to(device), labels=b.to(device), use_cache=False).loss.item() for b in batches]
    return sum(losses) / len(losses)


def calibration_loss(model: nn.Module, sequences: Tensor, batch_size: int = 4) -> float:
    """Mean next-token LM loss over ``sequences`` (N, T) in batches of ``batch_size``, eval mode
    (the model's train/eval mode is restored): how the shape search ranks its candidates."""
    was_training = model.training
    model.eval()
    try:
        return _mean_loss(model, list(torch.split(sequences, batch_size)))
    finally:
        model.train(was_training)


def layer_drop_losses(
    model: nn.Module, sequences: Tensor, batch_size: int = 4, adapter: ArchAdapter | None = None
) -> tuple[float, list[float]]:
    """(full loss, [loss with layer l bypassed for each l]) on ``sequences`` (N, T), eval mode.

    Costs L + 1 passes over the sequences; the model and its train/eval mode are left as they were.
    """
    adapter = adapter or get_adapter(model)
    batches = list(torch.split(sequences, batch_size))
    was_training = model.training
    model.eval()
    try:
        base = _mean_loss(model, batches)
        dropped = []
        for layer in adapter.decoder_layers(model):
            handle = layer.register_forward_hook(Bypass(), with_kwargs=True)
            try:
                dropped.append(_mean_loss(model, batches))
            finally:
                handle.remove()
    finally:
        model.train(was_training)
    return base, dropped
