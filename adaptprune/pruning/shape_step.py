"""One pruning step to a given shape: layers and hidden channels, then every layer's units.

``reach_shape`` is the step a target shape's walk takes (``target_shape``): the shape says how many
layers, hidden channels, KV groups and MLP neurons stay; importance says which.

1. Layers and channels (when the shape has fewer): one calibration with the residual stream, the
   lowest-scored layers go (``prune.layer_score``, their mean folded into the kept layer before them
   with ``prune.layer_compensation``), then the channels with the lowest Minitron scores (norm gains
   rescaled with ``prune.norm_compensation``), exactly as the width/depth search removes its choice.
2. Units: a fresh calibration of the reshaped model, unit scores (``prune.metric``), and per-layer
   counts from the shape: ``uniform`` keeps exactly the shape's groups and neurons in every layer
   (an ordinary config); any other allocation keeps the same totals but varies them per layer around
   the mean by Adapt-Pruner's offset −A·Ĩ_l (normalised block influence, A = ``prune.amplitude``),
   neurons on multiples of ``prune.neuron_multiple``. The lowest-scored units of each layer go, with
   the configured compensation (``prune.compensation``).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..allocation import normalised_influence, solve_layer_targets
from ..allocation.shape import ShapeCandidate
from ..arch import ATTENTION, MLP, ArchAdapter, get_adapter
from ..config import PruneConfig
from ..importance import get_metric
from .compensation import apply_compensated_plan
from .profiling import Profile
from .records import KeptRecord, Plan
from .shape_search import apply_shape, layer_scores
from .step import (
    Calibration,
    StepReport,
    _same_plan_on_every_rank,
    calibrate_for,
    compose_records,
    next_sequences,
    prune_step,
)
from .surgery import ensure_output_biases
from .target_shape import ModelShape, current_shape


def walk_note(allocation: str) -> str:
    """What a walk does not take from the allocation (empty when it takes all of it): ``shape_unit_plan``
    only tells ``uniform`` from the rest, so accumulating's inner re-scoring never runs here."""
    if allocation != "accumulating":
        return ""
    return "; the accumulating allocation's inner re-scoring does not apply to a walk (it acts as adaptive)"


def reach_shape(
    model: nn.Module,
    calibration: Calibration,
    shape: ModelShape,
    cfg: PruneConfig,
    adapter: ArchAdapter,
    progress: bool = True,
    label: str = "",
) -> StepReport:
    """Cut ``model`` down to ``shape`` (module docstring); the records of every removal, in order."""
    profile = Profile()
    cfg = dataclasses.replace(cfg, dims=list(PruneConfig.DIMS))  # the shape may cut any dimension
    if cfg.mean_compensation or (cfg.layer_compensation and shape.layers < current_shape(model, adapter).layers):
        ensure_output_biases(model, adapter)  # the slots mean and layer compensation write into
    records: list = reshape_to(model, calibration, shape, cfg, adapter, profile, progress, label)
    budgets = [adapter.layer_shape(model, i) for i in range(len(adapter.decoder_layers(model)))]
    plan: Plan = {}
    if any(b.groups > shape.groups or b.neurons > shape.neurons for b in budgets):
        desc = f"{label} calibrating".strip()
        with profile.phase("calibration"):
            calib = calibrate_for(model, next_sequences(calibration, 0), cfg, adapter, progress, desc)
        with profile.phase("scoring"):
            metric = get_metric(cfg.metric)
            scores = [
                {k: metric.unit_scores(model, adapter, i, k, calib) for k in (ATTENTION, MLP)}
                for i in range(len(budgets))
            ]
            influence = torch.tensor([s.influence for s in calib.layers], dtype=torch.float64)
            plan = _same_plan_on_every_rank(shape_unit_plan(budgets, scores, influence, shape, cfg))
        with profile.phase("surgery"):
            records += apply_compensated_plan(model, plan, calib, cfg.compensation, cfg.ls_ridge, adapter)
    return StepReport(
        plan=compose_records([r for r in records if isinstance(r, KeptRecord)]),
        records=records,
        profile=profile,
        influence=[],
    )


def reshape_to(
    model: nn.Module,
    calibration: Calibration,
    shape: ModelShape,
    cfg: PruneConfig,
    adapter: ArchAdapter,
    profile: Profile,
    progress: bool,
    label: str,
) -> list:
    """Remove layers (lowest scores) and hidden channels (lowest Minitron scores) down to ``shape``."""
    now = current_shape(model, adapter)
    drop_layers, drop_channels = now.layers - shape.layers, now.hidden - shape.hidden
    if drop_layers <= 0 and drop_channels <= 0:
        return []
    sequences = next_sequences(calibration, 0)
    with profile.phase("calibration"):
        desc = f"{label} calibrating".strip()
        calib = calibrate_for(model, sequences, cfg, adapter, progress, desc, collect_residual=True)
    with profile.phase("shape"):
        removed = ()
        if drop_layers > 0:
            order = torch.sort(layer_scores(model, calib, sequences, cfg, adapter), stable=True).indices
            removed = _same_plan_on_every_rank(tuple(sorted(order[:drop_layers].tolist())))  # rank 0 decides
        chosen = ShapeCandidate(0.0, 0.0, removed, max(drop_channels, 0), cost=0)
        return apply_shape(model, chosen, calib, cfg, adapter)


# ---- per-layer unit counts ------------------------------------------------------------------------
def shape_unit_plan(budgets: list, scores: list[dict[str, Tensor]], influence: Tensor, shape: ModelShape, cfg) -> Plan:
    """Kept unit ids per (layer, kind) so every layer holds the shape's groups and neurons (``uniform``),
    or the same totals spread around the mean by layer influence (any other allocation)."""
    offsets = -cfg.amplitude * normalised_influence(influence) if cfg.allocation != "uniform" else None
    keep = {
        ATTENTION: kept_counts([b.groups for b in budgets], shape.groups, offsets, 1),
        MLP: kept_counts([b.neurons for b in budgets], shape.neurons, offsets, cfg.neuron_multiple),
    }
    plan: Plan = {}
    for i in range(len(budgets)):
        for kind, counts in keep.items():
            layer_scores_ = scores[i][kind]
            if counts[i] < layer_scores_.numel():
                top = torch.sort(layer_scores_, descending=True, stable=True).indices[: counts[i]]
                plan.setdefault(i, {})[kind] = sorted(top.tolist())
    return plan


def kept_counts(counts: list[int], mean: int, offsets: Tensor | None, multiple: int) -> list[int]:
    """Units each layer keeps: ``mean`` everywhere (no offsets), or Σ = mean·L spread by sparsity offsets.

    With offsets, layer l removes clip(s̄ + o_l)·n_l units (s̄ solved so the total matches, as the
    adaptive allocator does), rounded to ``multiple`` by largest remainder; never more than it has.
    """
    if offsets is None or mean >= max(counts):
        return [min(mean, n) for n in counts]
    total_keep = mean * len(counts)
    sizes = torch.tensor(counts, dtype=torch.float64)
    removal = solve_layer_targets(offsets, sizes, sizes - 1, int(sizes.sum()) - total_keep)
    wanted = (sizes - removal) / multiple  # kept, in multiples
    kept = [min(n // multiple, math.floor(w)) for n, w in zip(counts, wanted.tolist(), strict=True)]
    short = total_keep // multiple - sum(kept)
    order = sorted(range(len(counts)), key=lambda i: (-(wanted[i].item() - kept[i]), i))
    for i in order:
        if short <= 0:
            break
        if (kept[i] + 1) * multiple <= counts[i]:
            kept[i] += 1
            short -= 1
    return [max(1, k * multiple) if counts[i] >= multiple else counts[i] for i, k in enumerate(kept)]


def prune_once(
    model: nn.Module,
    calibration: Calibration,
    target: int,
    cfg: PruneConfig,
    walk,
    progress: bool = True,
    label: str = "",
) -> StepReport:
    """A one-shot cut: to ``walk.target`` when a target shape is given (``plan_walk``), else to ``target``."""
    if walk is None:
        return prune_step(model, calibration, target, cfg, progress=progress, label=label)
    return reach_shape(model, calibration, walk.target, cfg, get_adapter(model), progress, label)
