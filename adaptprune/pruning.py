"""One structured pruning step: calibrate -> score -> allocate -> compensate + remove.

Shared by the one-shot ``adaptprune prune`` command and every stage of the controller. Pure
math lives in ``importance``, ``allocation`` and ``compensation``; this module only walks the
model through the adapter and times each phase.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .allocation import LayerBudget, get_allocator
from .arch import ATTENTION, MLP, ArchAdapter, get_adapter
from .calibration import CalibrationResult, calibrate
from .compensation import apply_compensated_plan
from .config import PruneConfig
from .importance import get_metric
from .profiling import Profile
from .records import KeptRecord, Plan
from .surgery import count_parameters, ensure_output_biases


@dataclass
class StepReport:
    plan: Plan
    records: list[KeptRecord]
    profile: Profile
    influence: list[float]


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


TAYLOR_MINI_BATCHES = 2  # backward passes for Taylor scores (LLM-Pruner uses ~10 short samples)


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
    sequences: torch.Tensor,
    target_params: int,
    cfg: PruneConfig,
    adapter: ArchAdapter | None = None,
    progress: bool = True,
    label: str = "",
) -> StepReport:
    """Shrink ``model`` to at most ``target_params`` parameters (less than one unit below)."""
    adapter = adapter or get_adapter(model)
    profile = Profile()
    with profile.phase("calibration"):
        calib = calibrate_for(model, sequences, cfg, adapter, progress=progress, desc=f"{label} calibrating".strip())
    return prune_with_stats(model, calib, target_params, cfg, adapter, profile)


def calibrate_for(
    model: nn.Module,
    sequences: torch.Tensor,
    cfg: PruneConfig,
    adapter: ArchAdapter,
    progress: bool = True,
    desc: str = "calibrating",
) -> CalibrationResult:
    """One calibration pass collecting what the configured metric and compensation need."""
    metric = get_metric(cfg.metric)
    return calibrate(
        model,
        sequences,
        adapter=adapter,
        collect_cov=cfg.energy_compensation or metric.needs_cov,
        taylor_batches=TAYLOR_MINI_BATCHES if metric.needs_grads else 0,
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
) -> StepReport:
    """Score, allocate and remove (with compensation) from existing calibration statistics."""
    adapter = adapter or get_adapter(model)
    profile = profile or Profile()
    metric = get_metric(cfg.metric)
    if cfg.mean_compensation:
        ensure_output_biases(model, adapter)  # the bias slots count towards the target too
    remove_params = count_parameters(model) - target_params
    with profile.phase("scoring"):
        layers = range(len(adapter.decoder_layers(model)))
        scores = [
            {kind: metric.unit_scores(model, adapter, i, kind, calib) for kind in (ATTENTION, MLP)} for i in layers
        ]
        influence = torch.tensor([s.influence for s in calib.layers], dtype=torch.float64)
        allocator = get_allocator(
            cfg.allocation, **({"amplitude": cfg.amplitude} if cfg.allocation == "adaptive" else {})
        )
        plan = allocator.plan(
            layer_budgets(model, adapter, cfg.min_groups, cfg.min_neurons),
            scores,
            influence,
            remove_params,
            neuron_multiple=cfg.neuron_multiple,
        )
        plan = _same_plan_on_every_rank(plan)
    with profile.phase("surgery"):
        records = apply_compensated_plan(
            model, plan, calib, mean=cfg.mean_compensation, energy=cfg.energy_compensation, adapter=adapter
        )
    return StepReport(plan=plan, records=records, profile=profile, influence=influence.tolist())
