"""One structured pruning step: calibrate -> score -> allocate -> compensate + remove.

Shared by the one-shot ``adaptprune prune`` command and every stage of the controller. Pure
math lives in ``importance``, ``allocation`` and ``compensation``; this module only walks the
model through the adapter and times each phase.

A stage may be split into inner steps when the allocator asks for it (``accumulating``:
Adapt-Pruner's ~2% steps, each on fresh calibration text, re-scored and re-allocated); the text
each reads comes from ``calibration.text.next_sequences``. With ``prune.calibration: sequential``
the removal then walks the layers in order (``sequential``), each rebuilt on the inputs the pruned
layers before it give it.

With ``hidden`` or ``layers`` in ``prune.dims`` a step first removes whole layers and residual
channels, chosen among a small grid by calibration loss (``shape.search``), and the units then fill
the exact remainder; unit kinds missing from ``prune.dims`` are never removed (``unit_floors``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..allocation import Allocator, LayerBudget, get_allocator, removable_params
from ..allocation.records import DepthRecord, HiddenRecord, KeptRecord, Plan
from ..arch import ATTENTION, MLP, ArchAdapter, get_adapter
from ..calibration.activations import CalibrationResult, LayerwiseStats, calibrate
from ..calibration.text import Calibration, indexed_by_step, next_sequences, taylor_rows
from ..config import PruneConfig
from ..importance import get_metric
from .compensation import apply_compensated_plan
from .profiling import Profile
from .sequential import lookahead_stats, sequential_rebuild
from .shape.search import ShapeStep, UnitPlanner, layer_compensation_applies, search_shape
from .surgery import count_parameters, ensure_output_biases

Record = KeptRecord | HiddenRecord | DepthRecord  # what surgery returns, in the order it was applied
KEEP_ALL = 2**62  # a floor no layer reaches: ``layer_budgets`` keeps every unit of a kind not in prune.dims


@dataclass
class StepReport:
    """What one ``prune_step`` did, over all of its inner steps."""

    plan: Plan  # kept unit ids per (layer, kind) that lost units (layer ids after any layer removal)
    records: list[Record]  # every removal (layers, channels, units), in the order surgery applied them
    profile: Profile
    influence: list[float]  # raw block influence I_l of the last inner step
    inner_steps: int = 1  # inner steps planned (one whose target an earlier step's overshoot met is skipped)
    allocator_state: dict | None = None  # ``allocator.to_json()`` afterwards: what a checkpoint carries
    shape: ShapeStep | None = None  # the (layers, hidden) search, when prune.dims has hidden or layers


def build_allocator(cfg: PruneConfig) -> Allocator:
    """The allocator ``prune.allocation`` names, built from the prune config's knobs."""
    if cfg.allocation == "adaptive":
        return get_allocator("adaptive", amplitude=cfg.amplitude)
    if cfg.allocation == "accumulating":
        return get_allocator(
            "accumulating",
            amplitude=cfg.amplitude,
            step=cfg.inner_step_fraction,
            same_ratio=cfg.same_ratio,
            scope=cfg.sparsity_scope,
        )
    return get_allocator(cfg.allocation)


def unit_floors(cfg: PruneConfig) -> tuple[int, int]:
    """(min_groups, min_neurons) for ``layer_budgets``: a unit kind missing from prune.dims keeps all."""
    groups = cfg.min_groups if "groups" in cfg.dims else KEEP_ALL
    return groups, cfg.min_neurons if "neurons" in cfg.dims else KEEP_ALL


def layer_budgets(
    model: nn.Module, adapter: ArchAdapter, min_groups: int = 1, min_neurons: int = 1
) -> list[LayerBudget]:
    """Current sizes, per-unit parameter costs and floors of every decoder layer."""
    budgets = []
    for layer in range(len(adapter.decoder_layers(model))):
        shape = adapter.layer_shape(model, layer)
        budgets.append(
            LayerBudget(
                groups=shape.groups,
                neurons=shape.neurons,
                params_per_group=adapter.params_per_unit(model, layer, ATTENTION),
                params_per_neuron=adapter.params_per_unit(model, layer, MLP),
                min_groups=min(min_groups, shape.groups),
                min_neurons=min(min_neurons, shape.neurons),
            )
        )
    return budgets


def smallest_reachable(model: nn.Module, adapter: ArchAdapter, prune: PruneConfig) -> int:
    """The fewest parameters pruning can reach without crossing prune.min_groups / min_neurons.

    Mean compensation adds a bias to every o/down projection, and those count towards the target.
    """
    budgets = layer_budgets(model, adapter, *unit_floors(prune))
    cap = getattr(build_allocator(prune), "max_sparsity", 1.0)  # adaptive keeps >= 1% of a layer
    removable = sum(
        min(math.floor(b.prunable_params * cap), removable_params([b], neuron_multiple=prune.neuron_multiple))
        for b in budgets
    )
    added = 0
    if prune.mean_compensation or layer_compensation_applies(prune, adapter, model.config):
        for layer in adapter.decoder_layers(model):
            for path in (adapter.attention_output, adapter.mlp_output):
                linear = layer.get_submodule(path)
                added += linear.out_features if linear.bias is None else 0
    return count_parameters(model) + added - removable


TAYLOR_MINI_BATCHES = 2  # backward passes of the ``taylor`` metric (|Σ w·g|) on the calibration text
TAYLOR_BATCH = 16  # sequences per backward of ``taylor_param_first`` (upstream hf_prune.py's --batch_size)


def inner_targets(start: int, target: int, steps: int) -> list[int]:
    """Parameter counts after each inner step: start − ⌊j·(start − target)/k⌋; the last is ``target``."""
    return [start - (j * (start - target)) // steps for j in range(1, steps + 1)]


def compose_records(records: Sequence[KeptRecord]) -> Plan:
    """Kept ids per (layer, kind) as ids before the first record, through records applied in order."""
    kept: dict[int, dict[str, list[int]]] = {}
    for r in records:
        current = kept.setdefault(r.layer, {}).get(r.kind, list(range(r.before)))
        kept[r.layer][r.kind] = [current[k] for k in r.kept]
    return kept


def _same_plan_on_every_rank(plan: Plan) -> Plan:
    """Under multi-process runs, every rank applies rank 0's plan.

    Ranks score identical weights on identical data, but a one-ulp difference in a reduction
    could flip a tie and leave ranks with different shapes; rank 0 decides.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return plan
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([plan], from_process=0)[0]


def prune_step(
    model: nn.Module,
    calibration: Calibration,
    target_params: int,
    cfg: PruneConfig,
    adapter: ArchAdapter | None = None,
    progress: bool = True,
    label: str = "",
    allocator: Allocator | None = None,
) -> StepReport:
    """Shrink ``model`` to at most ``target_params`` parameters (less than one unit below).

    ``allocator`` defaults to ``build_allocator(cfg)``; pass the same object every stage to carry its state
    (``accumulating`` with scope ``run``), or one rebuilt with ``allocator_from_json`` on resume. It splits the
    stage into ``allocator.inner_steps`` inner steps with cumulative targets (``inner_targets``); each
    calibrates on ``next_sequences(calibration, j)`` (or its statistics were collected ahead, ``_calibrated``),
    scores, allocates and removes, so the last lands on ``target_params`` exactly as one step would. With hidden
    or layers in ``prune.dims`` the step first chooses and removes layers and hidden channels (``shape_search``,
    on ``next_sequences(calibration, 0)``); the units fill the rest."""
    adapter = adapter or get_adapter(model)
    allocator = allocator or build_allocator(cfg)
    profile = Profile()
    if cfg.mean_compensation or layer_compensation_applies(cfg, adapter, model.config):
        ensure_output_biases(model, adapter)  # the bias slots count towards the target too
    if target_params > count_parameters(model):
        raise ValueError(f"target {target_params:,} exceeds the model's {count_parameters(model):,} parameters")
    first = next_sequences(calibration, 0) if cfg.reshapes else None  # the shape search's text
    shape = _shape_step(model, first, target_params, cfg, adapter, allocator, profile, progress, label)
    reuse = shape.calibration if shape is not None else None  # the text's statistics, if the shape stayed
    records: list[Record] = list(shape.records) if shape is not None else []
    start = count_parameters(model)
    budgets = layer_budgets(model, adapter, *unit_floors(cfg))
    allocator.start_stage(budgets)
    steps = allocator.inner_steps(budgets, start - target_params)
    influence: list[float] = []
    ahead: LayerwiseStats | None = None  # this inner step's statistics, collected by the last one's pass
    for j, goal in enumerate(inner_targets(start, target_params, steps)):
        if count_parameters(model) <= goal:
            ahead = None if indexed_by_step(calibration) else ahead  # else its text is the next step's
            continue  # nothing to remove (target met, or met by an earlier inner step's overshoot)
        desc = (f"{label} calibrating" + (f" {j + 1}/{steps}" if steps > 1 else "")).strip()
        if j == 0 and reuse is not None:
            calib, sequences = reuse, first
        else:
            calib, sequences = _calibrated(model, calibration, j, ahead, cfg, adapter, profile, progress, desc)
        ahead = lookahead_stats(model, calibration, j + 1, steps, cfg, adapter)
        report = prune_with_stats(
            model, calib, goal, cfg, adapter, profile, allocator, sequences, progress, label, lookahead=ahead
        )
        records += report.records
        influence = report.influence
    return StepReport(
        plan=compose_records([r for r in records if isinstance(r, KeptRecord)]),
        records=records,
        profile=profile,
        influence=influence,
        inner_steps=steps,
        allocator_state=allocator.to_json(),
        shape=shape,
    )


def _calibrated(
    model: nn.Module,
    calibration: Calibration,
    j: int,
    ahead: LayerwiseStats | None,
    cfg: PruneConfig,
    adapter: ArchAdapter,
    profile: Profile,
    progress: bool,
    desc: str,
) -> tuple[CalibrationResult, Tensor]:
    """Inner step ``j``'s statistics and text: collected by the step before it (``ahead``), or calibrated now."""
    if ahead is not None:
        return ahead.result(), ahead.sequences
    sequences = next_sequences(calibration, j)
    with profile.phase("calibration"):
        return calibrate_for(model, sequences, cfg, adapter, progress, desc), sequences


def _shape_step(
    model: nn.Module,
    sequences: Tensor | None,
    target_params: int,
    cfg: PruneConfig,
    adapter: ArchAdapter,
    allocator: Allocator,
    profile: Profile,
    progress: bool = True,
    label: str = "",
) -> ShapeStep | None:
    """Calibrate once with the residual stream, then let ``search_shape`` choose and remove layers and
    hidden channels; each candidate's units are estimated on its copy with a copy of the allocator."""
    if sequences is None:
        return None
    with profile.phase("calibration"):
        desc = f"{label} calibrating".strip()
        calib = calibrate_for(model, sequences, cfg, adapter, progress, desc, collect_residual=True)

    plan_units = unit_planner(target_params, cfg, adapter, allocator)
    with profile.phase("shape"):
        return search_shape(model, calib, sequences, target_params, cfg, adapter, plan_units, progress, label)


def unit_planner(target_params: int, cfg: PruneConfig, adapter: ArchAdapter, allocator: Allocator) -> UnitPlanner:
    """How the search allocates a candidate's units: from ``allocate_units`` with a copy of ``allocator``
    (its state is the stage's, and only the winner's real units move it)."""

    def plan_units(scored: nn.Module, kept: Sequence[int], stats: CalibrationResult, sizes: nn.Module) -> Plan:
        if cfg.mean_compensation:
            ensure_output_biases(sizes, adapter)  # the bias slots the units' compensation adds count too
        return allocate_units(scored, kept, stats, sizes, target_params, cfg, adapter, copy.deepcopy(allocator))

    return plan_units


def calibrate_for(
    model: nn.Module,
    sequences: torch.Tensor,
    cfg: PruneConfig,
    adapter: ArchAdapter,
    progress: bool = True,
    desc: str = "calibrating",
    collect_residual: bool = False,
) -> CalibrationResult:
    """One calibration pass collecting what the configured metric and compensation need
    (``collect_residual``: also the residual stream's moments, for width and depth pruning).

    ``taylor_param_first`` (Adapt-Pruner's scoring) calibrates on ``prune.taylor_samples`` windows
    of ``prune.taylor_seq_len`` tokens cut from ``sequences``, all with a backward pass (mini-batches
    of ``TAYLOR_BATCH``); its layer influence and channel statistics come from the same windows,
    as upstream's layer importance does. Other metrics use all of ``sequences``.
    """
    metric = get_metric(cfg.metric)
    # the width/depth search (collect_residual) compensates its candidates from this pass, sequential or not
    collect_cov = cfg.needs_cov or metric.needs_cov or (collect_residual and cfg.compensation_reads_cov)
    if metric.needs_elementwise_grads:
        rows = taylor_rows(sequences, cfg.taylor_samples, cfg.taylor_seq_len)
        return calibrate(
            model,
            rows,
            batch_size=TAYLOR_BATCH,
            adapter=adapter,
            collect_cov=collect_cov,
            taylor_batches=math.ceil(rows.shape[0] / TAYLOR_BATCH),
            taylor_elementwise=True,
            collect_residual=collect_residual,
            progress=progress,
            desc=desc,
        )
    return calibrate(
        model,
        sequences,
        adapter=adapter,
        collect_cov=collect_cov,
        taylor_batches=TAYLOR_MINI_BATCHES if metric.needs_grads else 0,
        collect_residual=collect_residual,
        progress=progress,
        desc=desc,
    )


def prune_with_stats(
    model: nn.Module,
    calib: CalibrationResult,
    target_params: int,
    cfg: PruneConfig,
    adapter: ArchAdapter | None = None,
    profile: Profile | None = None,
    allocator: Allocator | None = None,
    sequences: Tensor | None = None,
    progress: bool = True,
    label: str = "",
    lookahead: LayerwiseStats | None = None,
) -> StepReport:
    """Score, allocate and remove (with compensation) from existing calibration statistics: one
    step, one ``allocator.plan`` (``build_allocator(cfg)`` unless given). ``prune.calibration:
    sequential`` rebuilds the layers in order on ``sequences``, the text ``calib`` came from (and fills
    ``lookahead``, see ``remove_units``)."""
    adapter = adapter or get_adapter(model)
    profile = profile or Profile()
    allocator = allocator or build_allocator(cfg)
    if cfg.mean_compensation:  # mean, mean+energy and least_squares write a bias
        ensure_output_biases(model, adapter)  # the bias slots count towards the target too
    with profile.phase("scoring"):
        layers = range(len(adapter.decoder_layers(model)))
        plan = allocate_units(model, layers, calib, model, target_params, cfg, adapter, allocator, start_stage=False)
        plan = _same_plan_on_every_rank(plan)
    with profile.phase("surgery"):
        records = remove_units(model, plan, calib, sequences, cfg, adapter, progress, label, lookahead)
    influence = [calib.layers[i].influence for i in layers]
    return StepReport(
        plan=plan, records=records, profile=profile, influence=influence, allocator_state=allocator.to_json()
    )


def remove_units(
    model: nn.Module,
    plan: Plan,
    calib: CalibrationResult,
    sequences: Tensor | None,
    cfg: PruneConfig,
    adapter: ArchAdapter,
    progress: bool = True,
    label: str = "",
    lookahead: LayerwiseStats | None = None,
) -> list[KeptRecord]:
    """Remove ``plan``'s units with ``prune.compensation``: from ``calib`` (parallel) or, with
    ``prune.calibration: sequential``, layer by layer on ``sequences`` (``sequential_rebuild``), which also
    collects ``lookahead``'s statistics of the pruned model on its text."""
    if not cfg.sequential:
        return apply_compensated_plan(model, plan, calib, mode=cfg.compensation, ridge=cfg.ls_ridge, adapter=adapter)
    if sequences is None:
        raise ValueError("prune.calibration=sequential needs the calibration text the step's statistics came from")
    desc = f"{label} rebuilding".strip()
    return sequential_rebuild(
        model, plan, sequences, cfg.compensation, cfg.ls_ridge, adapter, cfg.rebuild_target, progress, desc, lookahead
    )


def allocate_units(
    scored: nn.Module,
    layers: Sequence[int],
    calib: CalibrationResult,
    sizes: nn.Module,
    target_params: int,
    cfg: PruneConfig,
    adapter: ArchAdapter,
    allocator: Allocator,
    start_stage: bool = True,
) -> Plan:
    """The units ``sizes`` (a model, or its meta copy with a shape applied) loses to reach ``target_params``:
    scored on ``scored``'s ``layers`` (the plan's layer t is ``layers[t]``), allocated by ``allocator``
    (its ``start_stage`` first, unless the caller already started it)."""
    scores, influence = score_units(scored, layers, calib, cfg, adapter)
    budgets = layer_budgets(sizes, adapter, *unit_floors(cfg))
    if start_stage:
        allocator.start_stage(budgets)
    remove = count_parameters(sizes) - target_params
    return allocator.plan(budgets, scores, influence, remove, neuron_multiple=cfg.neuron_multiple)


def score_units(
    scored: nn.Module, layers: Sequence[int], calib: CalibrationResult, cfg: PruneConfig, adapter: ArchAdapter
) -> tuple[list[dict[str, Tensor]], Tensor]:
    """``prune.metric``'s unit scores per (layer, kind) of ``layers``, and their raw block influence (float64)."""
    metric = get_metric(cfg.metric)
    scores = [{kind: metric.unit_scores(scored, adapter, i, kind, calib) for kind in (ATTENTION, MLP)} for i in layers]
    return scores, torch.tensor([calib.layers[i].influence for i in layers], dtype=torch.float64)
