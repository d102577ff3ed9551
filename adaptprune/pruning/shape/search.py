"""Width and depth inside one pruning step: which layers and hidden channels go, chosen by loss.

With ``hidden`` or ``layers`` in ``prune.dims`` a step removing R parameters (GitHub issue #14):

1. calibrates once with the residual stream (``prune_step`` does, ``collect_residual=True``);
2. scores layers: block influence I_l = 1 − cos(h_in, h_out) (free) or the calibration-loss
   increase with layer l bypassed (``prune.layer_score``), lowest first;
3. builds the candidates of the grid ``prune.layer_grid × prune.hidden_grid``
   (``allocation.shape``: layers take ≤ f_L·R, hidden channels ≤ f_H·R of what layers left, units
   the rest), each distinct (layers, channel count) once;
4. measures every candidate on the model itself (``shape_trial``: forward hooks, no copy of the
   weights): the layers go (their mean contribution folded into the down bias of the kept layer
   before them, ``prune.layer_compensation``), then the channels with the lowest Minitron scores
   over the kept stream points (norm gains rescaled with ``prune.norm_compensation``), then the
   units for the rest of R, allocated from the same statistics re-indexed to the kept layers and
   the candidate's sizes; the mean LM loss on the calibration text is its loss;
5. keeps the lowest loss (ties: grid order, so the first candidate, (0, 0) in the default grids,
   wins a tie); under several processes rank 0's choice is broadcast;
6. removes the winner's layers and channels from the model itself. ``prune_step`` then calibrates
   the reshaped model afresh and removes the units down to the exact target, so the step keeps
   the allocators' guarantee: target ≤ params removed < target + one unit chunk.

Layers go before channels because a channel removed afterwards owns no entries in the removed
layers (its cost is known exactly), and both before units because the units are the fine chunks
that land the count exactly. A candidate's unit statistics and scores are stale (taken before the
reshape, on the full-width weights): the search ranks candidates with them; the final units use
fresh ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...allocation import InfeasibleTargetError
from ...allocation.records import DepthRecord, HiddenRecord, Plan
from ...allocation.shape import HIDDEN, LAYERS, ShapeCandidate, ShapeCosts, grid_candidates
from ...arch import ArchAdapter
from ...calibration.activations import CalibrationResult
from ...config import PruneConfig
from ...importance.residual import (
    calibration_loss,
    hidden_channel_scores,
    influence_scores,
    layer_drop_losses,
    loss_increase,
    stream_gains,
    top_indices,
)
from ..surgery import count_parameters
from .reshape import (
    channel_shares,
    compensate_layer_removal,
    compensate_norm_gains,
    layer_mean_shifts,
    remove_hidden_channels,
    remove_layers,
)
from .trial import hooked_trial, layer_compensation_applies, meta_copy

# (model, kept layers, calibration of model, the candidate's sizes on the meta device) -> the units the
# candidate removes to reach the step's target, as a plan over its layers 0..L'-1 (ValueError: infeasible)
UnitPlanner = Callable[[nn.Module, Sequence[int], CalibrationResult, nn.Module], Plan]


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
def channel_keep(
    model: nn.Module, chosen: ShapeCandidate, calib: CalibrationResult, adapter: ArchAdapter
) -> list[int] | None:
    """The hidden channels ``chosen`` keeps (None: all): the highest Minitron scores over the stream
    points its kept layers still read. ``calib`` and the norm gains are of ``model`` now."""
    if not chosen.removed_channels:
        return None
    kept = [i for i in range(len(calib.layers)) if i not in set(chosen.removed_layers)]
    sq_means = [s.sq_mean for s in sub_calibration(calib, kept).residual]
    gains = stream_gains(model, adapter)
    scores = hidden_channel_scores(sq_means, [gains[i] for i in kept] + [gains[-1]])
    return top_indices(scores, int(model.config.hidden_size) - chosen.removed_channels)


def apply_shape(
    model: nn.Module,
    chosen: ShapeCandidate,
    calib: CalibrationResult,
    cfg: PruneConfig,
    adapter: ArchAdapter,
    keep: list[int] | None = None,
) -> list[DepthRecord | HiddenRecord]:
    """Remove ``chosen``'s layers (mean-compensated if configured), then its channels (``keep``, or
    ``channel_keep``'s; norm gains rescaled if configured). ``calib`` is of ``model`` now."""
    keep = keep if keep is not None else channel_keep(model, chosen, calib, adapter)
    records: list[DepthRecord | HiddenRecord] = []
    depth = len(adapter.decoder_layers(model))
    kept = [i for i in range(depth) if i not in set(chosen.removed_layers)]
    if chosen.removed_layers:
        if layer_compensation_applies(cfg, adapter, model.config):
            compensate_layer_removal(model, kept, layer_mean_shifts([s.mean for s in calib.residual]), adapter)
        records.append(remove_layers(model, kept, adapter))
    if keep is not None:
        records.append(remove_hidden_channels(model, keep, adapter))
        if cfg.norm_compensation:
            compensate_norm_gains(model, [s.sq_mean for s in sub_calibration(calib, kept).residual], keep, adapter)
    return records


def candidate_loss(
    model: nn.Module,
    chosen: ShapeCandidate,
    calib: CalibrationResult,
    sequences: Tensor,
    cfg: PruneConfig,
    adapter: ArchAdapter,
    plan_units: UnitPlanner,
) -> float:
    """Calibration loss of ``model`` computing as ``chosen`` with its units would (``shape_trial``: hooks,
    no copy of the weights); inf if the units cannot remove the rest."""
    keep = channel_keep(model, chosen, calib, adapter)
    kept = [i for i in range(len(calib.layers)) if i not in set(chosen.removed_layers)]
    sizes = meta_copy(model)  # the candidate's sizes, for the allocator
    apply_shape(sizes, chosen, calib, cfg, adapter, keep)
    try:
        units = plan_units(model, kept, calib, sizes)
    except ValueError:  # the units cannot remove the rest (floors)
        return math.inf
    with hooked_trial(model, adapter, calib, kept, keep, units, cfg):
        return calibration_loss(model, sequences)


# ---- the search ---------------------------------------------------------------------------------------
def search_candidates(
    model: nn.Module,
    calib: CalibrationResult,
    sequences: Tensor,
    target_params: int,
    cfg: PruneConfig,
    adapter: ArchAdapter,
) -> list[ShapeCandidate]:
    """The grid's distinct (layers, hidden channels) candidates for a step to ``target_params``."""
    costs = shape_costs(model, adapter)
    scores = layer_scores(model, calib, sequences, cfg, adapter) if LAYERS in cfg.dims else None
    floors = (cfg.min_layers, cfg.min_hidden, cfg.hidden_multiple)
    remove = costs.total - target_params
    return grid_candidates(costs, scores, remove, cfg.layer_fractions, cfg.hidden_fractions, floors)


def search_shape(
    model: nn.Module,
    calib: CalibrationResult,
    sequences: Tensor,
    target_params: int,
    cfg: PruneConfig,
    adapter: ArchAdapter,
    plan_units: UnitPlanner,
    progress: bool = True,
    label: str = "",
) -> ShapeStep:
    """Choose (layers, hidden channels) for a step to ``target_params`` and remove them (module docstring).

    ``calib`` must come from ``sequences`` on ``model`` now, with ``collect_residual=True``.
    """
    costs = shape_costs(model, adapter)
    remove = costs.total - target_params
    candidates = search_candidates(model, calib, sequences, target_params, cfg, adapter)
    losses: list[float | None] = [None]
    if len(candidates) > 1:
        bar = tqdm(candidates, desc=f"{label} shape candidates".strip(), disable=not progress, unit="shape")
        losses = [candidate_loss(model, c, calib, sequences, cfg, adapter, plan_units) for c in bar]
        if all(math.isinf(loss) for loss in losses):
            raise InfeasibleTargetError(
                f"no (layers, hidden) candidate leaves units that can remove the rest of {remove:,}"
            )
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
    "UnitPlanner",
    "apply_shape",
    "candidate_loss",
    "channel_keep",
    "layer_compensation_applies",
    "layer_scores",
    "search_candidates",
    "search_shape",
    "shape_costs",
    "sub_calibration",
]
