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
   the configured compensation (``prune.compensation``). ``accumulating`` re-scores inside the step:
   the units go in inner steps of about ``prune.inner_step_fraction`` of the prunable parameters, each
   on fresh calibration text with its own scores and offsets, so a layer of low influence loses more at
   every inner step (the offsets add up, as the accumulating allocator's do; issue #22).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ...allocation import normalised_influence, solve_layer_targets
from ...allocation.records import KeptRecord, Plan
from ...allocation.shape import ShapeCandidate
from ...arch import ATTENTION, MLP, ArchAdapter, get_adapter
from ...calibration.text import Calibration, next_sequences
from ...config import PruneConfig
from ..profiling import Profile
from ..step import (
    StepReport,
    _same_plan_on_every_rank,
    calibrate_for,
    compose_records,
    layer_budgets,
    prune_step,
    remove_units,
    score_units,
)
from ..surgery import ensure_output_biases
from .search import apply_shape, layer_scores
from .target import ModelShape, current_shape


def walk_allocation(allocation: str) -> str:
    """How a walk sets per-layer sizes under ``allocation``: the model card's words (module docstring)."""
    if allocation == "uniform":
        return "every layer has exactly its sizes"
    how = f"per-layer sizes vary around its means (allocation `{allocation}`), by −A·Ĩ"
    if allocation == "accumulating":
        return f"{how} at every inner step (re-scored on fresh text)"
    return f"{how} once per stage"


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
    steps = unit_inner_steps(model, shape, cfg, adapter)
    for j in range(steps):
        budgets = [adapter.layer_shape(model, i) for i in range(len(adapter.decoder_layers(model)))]
        totals = inner_totals(budgets, shape, steps - j)
        if _cuts(budgets, totals, cfg.allocation == "uniform"):
            desc = f"{label} calibrating" + (f" {j + 1}/{steps}" if steps > 1 else "")
            sequences = next_sequences(calibration, j)
            records += cut_units(model, sequences, budgets, totals, cfg, adapter, profile, progress, desc.strip())
    return StepReport(
        plan=compose_records([r for r in records if isinstance(r, KeptRecord)]),
        records=records,
        profile=profile,
        influence=[],
        inner_steps=steps,
    )


def cut_units(
    model: nn.Module,
    sequences: Tensor,
    budgets: list,
    totals: UnitTotals,
    cfg: PruneConfig,
    adapter: ArchAdapter,
    profile: Profile,
    progress: bool,
    desc: str,
) -> list:
    """Calibrate on ``sequences``, score, keep ``totals`` (``shape_unit_plan``) and remove the rest."""
    with profile.phase("calibration"):
        calib = calibrate_for(model, sequences, cfg, adapter, progress, desc)
    with profile.phase("scoring"):
        scores, influence = score_units(model, range(len(budgets)), calib, cfg, adapter)
        plan = _same_plan_on_every_rank(shape_unit_plan(budgets, scores, influence, totals, cfg))
    with profile.phase("surgery"):
        return remove_units(model, plan, calib, sequences, cfg, adapter, progress)


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
class UnitTotals(NamedTuple):
    """KV groups and MLP neurons summed over layers: what one (inner) step of a walk leaves."""

    groups: int
    neurons: int


def unit_inner_steps(model: nn.Module, shape: ModelShape, cfg: PruneConfig, adapter: ArchAdapter) -> int:
    """Inner steps of a walk's unit cut: 1, or for ``accumulating`` ⌈R / (Δ·Σ P_l)⌉ as its allocator
    splits a stage (R: the parameters the shape's units remove, P_l: each layer's prunable parameters)."""
    if cfg.allocation != "accumulating":
        return 1
    budgets = layer_budgets(model, adapter)
    layers = len(budgets)
    per_group = sum(b.params_per_group for b in budgets) / layers
    per_neuron = sum(b.params_per_neuron for b in budgets) / layers
    gap = unit_gap(budgets, UnitTotals(shape.groups * layers, shape.neurons * layers))
    removal = gap.groups * per_group + gap.neurons * per_neuron
    per_step = cfg.inner_step_fraction * sum(b.prunable_params for b in budgets)
    return max(1, math.ceil(removal / per_step - 1e-9))


def unit_gap(budgets: list, totals: UnitTotals) -> UnitTotals:
    """Groups and neurons the layers hold above ``totals`` (0 where they hold no more)."""
    groups = sum(b.groups for b in budgets) - totals.groups
    return UnitTotals(max(groups, 0), max(sum(b.neurons for b in budgets) - totals.neurons, 0))


def inner_totals(budgets: list, shape: ModelShape, remaining: int) -> UnitTotals:
    """The totals after this inner step, ``remaining`` steps (this one included) before the shape:
    an equal share of what is left, the whole of it at the last."""
    target = UnitTotals(shape.groups * len(budgets), shape.neurons * len(budgets))
    gap = unit_gap(budgets, target)
    return UnitTotals(target.groups + gap.groups - gap.groups // remaining,
                      target.neurons + gap.neurons - gap.neurons // remaining)  # fmt: skip


def _cuts(budgets: list, totals: UnitTotals, uniform: bool) -> bool:
    """Whether a step to ``totals`` removes anything (``uniform``: also any layer above the mean)."""
    if unit_gap(budgets, totals) != (0, 0):
        return True
    layers = len(budgets)
    return uniform and any(b.groups * layers > totals.groups or b.neurons * layers > totals.neurons for b in budgets)


def shape_unit_plan(budgets: list, scores: list[dict[str, Tensor]], influence: Tensor, totals: UnitTotals, cfg) -> Plan:
    """Kept unit ids per (layer, kind) so the layers hold ``totals``: the same groups and neurons in every
    layer (``uniform``), or spread around the mean by layer influence (any other allocation)."""
    offsets = -cfg.amplitude * normalised_influence(influence) if cfg.allocation != "uniform" else None
    keep = {
        ATTENTION: kept_counts([b.groups for b in budgets], totals.groups, offsets, 1),
        MLP: kept_counts([b.neurons for b in budgets], totals.neurons, offsets, cfg.neuron_multiple),
    }
    plan: Plan = {}
    for i in range(len(budgets)):
        for kind, counts in keep.items():
            layer_scores_ = scores[i][kind]
            if counts[i] < layer_scores_.numel():
                top = torch.sort(layer_scores_, descending=True, stable=True).indices[: counts[i]]
                plan.setdefault(i, {})[kind] = sorted(top.tolist())
    return plan


def kept_counts(counts: list[int], total_keep: int, offsets: Tensor | None, multiple: int) -> list[int]:
    """Units each layer keeps: total_keep / L everywhere (no offsets), or Σ = total_keep spread by offsets.

    With offsets, layer l removes clip(s̄ + o_l)·n_l units (s̄ solved so the total matches, as the
    adaptive allocator does), rounded to ``multiple`` by largest remainder; never more than it has, never
    below one multiple (offsets that add up over a walk's inner steps would otherwise empty a layer).
    """
    if offsets is None:
        return [min(total_keep // len(counts), n) for n in counts]
    if total_keep >= sum(counts):
        return list(counts)
    sizes = torch.tensor(counts, dtype=torch.float64)
    floor = torch.where(sizes >= multiple, float(multiple), sizes)  # a layer keeps one multiple at least
    removal = solve_layer_targets(offsets, sizes, sizes - floor, int(sizes.sum()) - total_keep)
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
    return [k * multiple if counts[i] >= multiple else counts[i] for i, k in enumerate(kept)]


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
