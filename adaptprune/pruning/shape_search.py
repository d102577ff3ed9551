"""Width and depth inside one pruning step: which layers and hidden channels go, chosen by loss.

With ``hidden`` or ``layers`` in ``prune.dims`` a step removing R parameters (GitHub issue #14):

1. calibrates once with the residual stream (``prune_step`` does, ``collect_residual=True``);
2. scores layers: block influence I_l = 1 − cos(h_in, h_out) (free) or the calibration-loss
   increase with layer l bypassed (``prune.layer_score``), lowest first;
3. builds the candidates of the grid ``prune.layer_grid × prune.hidden_grid``
   (``allocation.shape``: layers take ≤ f_L·R, hidden channels ≤ f_H·R of what layers left, units
   the rest), each distinct (layers, channel count) once;
4. tries every candidate on a deep copy: the layers go (their mean contribution folded into the
   down bias of the kept layer before them, ``prune.layer_compensation``), then the channels with
   the lowest Minitron scores over the kept stream points (norm gains rescaled with
   ``prune.norm_compensation``), then the units for the rest of R, scored from the same statistics
   re-indexed to the kept layers; the copy's mean LM loss on the calibration text is its loss;
5. keeps the lowest loss (ties: grid order, so the first candidate, (0, 0) in the default grids,
   wins a tie); under several processes rank 0's choice is broadcast;
6. removes the winner's layers and channels from the model itself. ``prune_step`` then calibrates
   the reshaped model afresh and removes the units down to the exact target, so the step keeps
   the allocators' guarantee: target ≤ params removed < target + one unit chunk.

Layers go before channels because a channel removed afterwards owns no entries in the removed
layers (its cost is known exactly), and both before units because the units are the fine chunks
that land the count exactly. Unit statistics of the copies are stale (taken before the reshape):
the search ranks candidates with them; the final units use fresh ones.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..allocation.shape import HIDDEN, LAYERS, ShapeCandidate, ShapeCosts, grid_candidates
from ..arch import ArchAdapter
from ..config import PruneConfig
from ..importance.residual import (
    calibration_loss,
    hidden_channel_scores,
    influence_scores,
    layer_drop_losses,
    loss_increase,
    stream_gains,
    top_indices,
)
from .calibration import CalibrationResult
from .records import DepthRecord, HiddenRecord
from .reshape import (
    channel_shares,
    compensate_layer_removal,
    compensate_norm_gains,
    layer_mean_shifts,
    remove_hidden_channels,
    remove_layers,
)
from .surgery import count_parameters

UnitEstimate = Callable[[nn.Module, CalibrationResult], None]  # prunes a trial copy's units to the step target


@dataclass
class ShapeStep:
    """What the search tried and removed (``records``: a DepthRecord, then a HiddenRecord, if any)."""

    chosen: ShapeCandidate
    candidates: list[ShapeCandidate]
    losses: list[float | None]  # calibration loss per candidate (None: not measured, one candidate only)
    remove_params: int  # R, the whole step's removal
    layers: tuple[int, int]  # (before, after)
    hidden: tuple[int, int]  # (before, after)
    records: list[DepthRecord | HiddenRecord] = field(default_factory=list)
    calibration: CalibrationResult | None = None  # still valid for the units when nothing was reshaped

    def as_dict(self) -> dict:
        """JSON for metrics and reports (losses of infeasible candidates are null)."""

        def row(c: ShapeCandidate, loss: float | None) -> dict:
            return {
                "fractions": [c.layer_fraction, c.hidden_fraction],
                "removed_layers": list(c.removed_layers),
                "removed_channels": c.removed_channels,
                "reshape_params": c.cost,
                "loss": loss if loss is not None and math.isfinite(loss) else None,
            }

        return {
            "layers": list(self.layers),
            "hidden": list(self.hidden),
            "remove_params": self.remove_params,
            **row(self.chosen, self.losses[self.candidates.index(self.chosen)]),
            "candidates": [row(c, loss) for c, loss in zip(self.candidates, self.losses, strict=True)],
        }

    def summary(self, label: str = "") -> str:
        """One log line: '(k/N) shape: 30 -> 29 layers, hidden 576 -> 568, ...'."""
        loss = self.losses[self.candidates.index(self.chosen)]
        measured = f"; calibration loss {loss:.4f}, best of {len(self.candidates)}" if loss is not None else ""
        removed = f" (removed {', '.join(map(str, self.chosen.removed_layers))})" if self.chosen.removed_layers else ""
        return (
            f"{label} shape: {self.layers[0]} -> {self.layers[1]} layers{removed}, hidden {self.hidden[0]} -> "
            f"{self.hidden[1]}; layers and channels {self.chosen.cost:,} of {self.remove_params:,} parameters, "
            f"units the rest{measured}"
        ).strip()


# ---- measuring the model ---------------------------------------------------------------------------
def shape_costs(model: nn.Module, adapter: ArchAdapter) -> ShapeCosts:
    """The counts ``allocation.shape`` needs, read from the model (works on the meta device too)."""
    outside, per_layer = channel_shares(model, adapter)
    return ShapeCosts(
        total=count_parameters(model),
        hidden=int(model.config.hidden_size),
        layer_params=tuple(sum(p.numel() for p in layer.parameters()) for layer in adapter.decoder_layers(model)),
        channel_outside=outside,
        channel_per_layer=tuple(per_layer),
    )


def layer_compensation_applies(cfg: PruneConfig, adapter: ArchAdapter, config) -> bool:
    """Whether removed layers' means go into a stream bias (which must then exist, and count)."""
    return LAYERS in cfg.dims and cfg.layer_compensation and adapter.stream_bias_path(config) is not None


def layer_scores(
    model: nn.Module, calib: CalibrationResult, sequences: Tensor, cfg: PruneConfig, adapter: ArchAdapter
) -> Tensor:
    """Per-layer scores, lower = removed first: block influence, or the bypass-loss increase."""
    if cfg.layer_score == "loss":
        return loss_increase(*layer_drop_losses(model, sequences, adapter=adapter))
    return influence_scores([s.influence for s in calib.layers])


def sub_calibration(calib: CalibrationResult, kept_layers: Sequence[int]) -> CalibrationResult:
    """The statistics of the kept layers only, re-indexed 0..L'-1 (stream points: their inputs, the output)."""

    def pick(items):
        return [items[i] for i in kept_layers] if items is not None else None

    residual = pick(calib.residual) + [calib.residual[-1]] if calib.residual is not None else None
    return CalibrationResult(
        layers=pick(calib.layers),
        taylor=pick(calib.taylor),
        taylor_abs=pick(calib.taylor_abs),
        tokens=calib.tokens,
        taylor_tokens=calib.taylor_tokens,
        residual=residual,
    )


# ---- surgery ----------------------------------------------------------------------------------------
def apply_shape(
    model: nn.Module, chosen: ShapeCandidate, calib: CalibrationResult, cfg: PruneConfig, adapter: ArchAdapter
) -> list[DepthRecord | HiddenRecord]:
    """Remove ``chosen``'s layers (mean-compensated if configured), then its channels (lowest scores
    over the kept stream points; norm gains rescaled if configured). ``calib`` is of ``model`` now."""
    records: list[DepthRecord | HiddenRecord] = []
    depth = len(adapter.decoder_layers(model))
    kept = [i for i in range(depth) if i not in set(chosen.removed_layers)]
    if chosen.removed_layers:
        if layer_compensation_applies(cfg, adapter, model.config):
            compensate_layer_removal(model, kept, layer_mean_shifts([s.mean for s in calib.residual]), adapter)
        records.append(remove_layers(model, kept, adapter))
    if chosen.removed_channels:
        sq_means = [s.sq_mean for s in sub_calibration(calib, kept).residual]  # the stream points still read
        scores = hidden_channel_scores(sq_means, stream_gains(model, adapter))
        keep = top_indices(scores, int(model.config.hidden_size) - chosen.removed_channels)
        records.append(remove_hidden_channels(model, keep, adapter))
        if cfg.norm_compensation:
            compensate_norm_gains(model, sq_means, keep, adapter)
    return records


def candidate_loss(
    model: nn.Module,
    chosen: ShapeCandidate,
    calib: CalibrationResult,
    sequences: Tensor,
    cfg: PruneConfig,
    adapter: ArchAdapter,
    estimate_units: UnitEstimate,
) -> float:
    """Calibration loss of a copy with ``chosen`` applied and the units estimated; inf if infeasible."""
    trial = copy.deepcopy(model)
    try:
        apply_shape(trial, chosen, calib, cfg, adapter)
        kept = [i for i in range(len(calib.layers)) if i not in set(chosen.removed_layers)]
        estimate_units(trial, sub_calibration(calib, kept))
    except ValueError:  # the units cannot remove the rest (floors)
        return math.inf
    return calibration_loss(trial, sequences)


# ---- the search ---------------------------------------------------------------------------------------
def search_shape(
    model: nn.Module,
    calib: CalibrationResult,
    sequences: Tensor,
    target_params: int,
    cfg: PruneConfig,
    adapter: ArchAdapter,
    estimate_units: UnitEstimate,
    progress: bool = True,
    label: str = "",
) -> ShapeStep:
    """Choose (layers, hidden channels) for a step to ``target_params`` and remove them (module docstring).

    ``calib`` must come from ``sequences`` on ``model`` now, with ``collect_residual=True``.
    """
    costs = shape_costs(model, adapter)
    remove = costs.total - target_params
    scores = layer_scores(model, calib, sequences, cfg, adapter) if LAYERS in cfg.dims else None
    floors = (cfg.min_layers, cfg.min_hidden, cfg.hidden_multiple)
    candidates = grid_candidates(costs, scores, remove, cfg.layer_fractions, cfg.hidden_fractions, floors)
    losses: list[float | None] = [None]
    if len(candidates) > 1:
        bar = tqdm(candidates, desc=f"{label} shape candidates".strip(), disable=not progress, unit="shape")
        losses = [candidate_loss(model, c, calib, sequences, cfg, adapter, estimate_units) for c in bar]
        if all(math.isinf(loss) for loss in losses):
            raise ValueError(f"no (layers, hidden) candidate leaves units that can remove the rest of {remove:,}")
    best = min(range(len(candidates)), key=lambda i: (losses[i] if losses[i] is not None else 0.0, i))
    chosen = candidates[_same_choice_on_every_rank(best)]
    before = (costs.layers, costs.hidden)
    records = apply_shape(model, chosen, calib, cfg, adapter)
    step = ShapeStep(
        chosen=chosen,
        candidates=candidates,
        losses=losses,
        remove_params=remove,
        layers=(before[0], len(adapter.decoder_layers(model))),
        hidden=(before[1], int(model.config.hidden_size)),
        records=records,
        calibration=None if records else calib,
    )
    if progress:
        tqdm.write(f"[adaptprune] {step.summary(label)}")
    return step


def _same_choice_on_every_rank(index: int) -> int:
    """Rank 0's candidate everywhere: losses equal to the last ulp on every rank are not guaranteed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return index
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([index], from_process=0)[0]


__all__ = [
    "HIDDEN",
    "LAYERS",
    "ShapeStep",
    "apply_shape",
    "candidate_loss",
    "layer_compensation_applies",
    "layer_scores",
    "search_shape",
    "shape_costs",
    "sub_calibration",
]
