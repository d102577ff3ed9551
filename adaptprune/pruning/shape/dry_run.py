"""A dry run of one pruning step from a config alone: the depth, width and units a target leads to.

For ``adaptprune plan``: no weights and no calibration. The model is built on the meta device
(shapes only, instant for any size), the step's candidates come from the same maths as a real run
(``allocation.shape``), and the units are spread with the ``uniform`` allocator on equal scores.

What a dry run cannot know, and assumes instead:
- **which** layers go (calibration ranks them): the deepest ones before the last layer, ShortGPT's
  usual finding; for a model whose layers are all alike only their number matters;
- **which** candidate wins (the run measures each on calibration text): ``shape_candidates_for``
  lists every candidate of the grid, ``shape_for_target`` computes one;
- per-layer unit counts under ``adaptive`` allocation (it follows layer influence); the totals are
  those of the run up to the last unit chunk (target ≤ removed < target + one chunk either way).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ...allocation import UniformAllocator, removed_params
from ...allocation.shape import ShapeCandidate, candidate, grid_candidates, width_adjusted_cost
from ...arch import ATTENTION, MLP, ArchAdapter
from ...checkpoint import meta_model
from ...config import PruneConfig
from ..step import layer_budgets, unit_floors
from ..surgery import ensure_output_biases
from .reshape import unit_channel_share
from .search import layer_compensation_applies, shape_costs


@dataclass(frozen=True)
class ShapePlan:
    """The model after one step to ``target``: depth, width, units per kept layer, parameters."""

    layer_fraction: float
    hidden_fraction: float
    removed_layers: tuple[int, ...]  # original ids (assumed, see the module docstring)
    layers: int  # kept
    hidden: int  # kept residual channels
    groups: tuple[int, ...]  # KV groups of each kept layer
    neurons: tuple[int, ...]  # MLP neurons of each kept layer
    params: int  # after the step (output biases for mean compensation included)
    target: int
    reshape_params: int  # removed with the layers and channels
    unit_params: int  # removed with KV groups and neurons

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """'29 layers, hidden 568, 1,203 neurons and 3 KV groups per layer (mean); 102,651,904 parameters'."""
        neurons = sum(self.neurons) / max(len(self.neurons), 1)
        groups = sum(self.groups) / max(len(self.groups), 1)
        return (
            f"{self.layers} layers, hidden {self.hidden}, {neurons:,.0f} neurons and {groups:.3g} KV groups per "
            f"layer (mean); {self.params:,} parameters (target {self.target:,})"
        )


def _dry_layer_scores(layers: int) -> torch.Tensor:
    """Equal scores, the last layer kept longest: the deepest layers before it go first."""
    scores = torch.zeros(layers, dtype=torch.float64)
    scores[-1] = 1.0
    return scores


def _step_model(config, prune: PruneConfig) -> tuple[nn.Module, ArchAdapter]:
    model, adapter = meta_model(config.config if isinstance(config, nn.Module) else config)
    if prune.mean_compensation or layer_compensation_applies(prune, adapter, model.config):
        ensure_output_biases(model, adapter)  # as prune_step: the bias slots count towards the target
    return model, adapter


def _plan_units(
    model: nn.Module, adapter: ArchAdapter, chosen: ShapeCandidate, target: int, prune: PruneConfig
) -> ShapePlan:
    """Units of the kept layers at the reshaped width, spread uniformly to land on ``target``."""
    costs = shape_costs(model, adapter)
    width = costs.hidden - chosen.removed_channels
    kept = [i for i in range(costs.layers) if i not in set(chosen.removed_layers)]
    budgets = []
    for b, i in ((layer_budgets(model, adapter, *unit_floors(prune))[i], i) for i in kept):
        shares = [unit_channel_share(model, i, kind, adapter) for kind in (ATTENTION, MLP)]
        per_group = width_adjusted_cost(b.params_per_group, shares[0], costs.hidden, width)
        per_neuron = width_adjusted_cost(b.params_per_neuron, shares[1], costs.hidden, width)
        budgets.append(type(b)(b.groups, b.neurons, per_group, per_neuron, b.min_groups, b.min_neurons))
    remove = costs.total - target - chosen.cost
    scores = [{ATTENTION: torch.zeros(b.groups), MLP: torch.zeros(b.neurons)} for b in budgets]
    plan = UniformAllocator().plan(
        budgets, scores, torch.zeros(len(budgets)), remove, neuron_multiple=prune.neuron_multiple
    )
    units = removed_params(budgets, plan)
    return ShapePlan(
        layer_fraction=chosen.layer_fraction,
        hidden_fraction=chosen.hidden_fraction,
        removed_layers=chosen.removed_layers,
        layers=len(kept),
        hidden=width,
        groups=tuple(len(plan.get(j, {}).get(ATTENTION, range(b.groups))) for j, b in enumerate(budgets)),
        neurons=tuple(len(plan.get(j, {}).get(MLP, range(b.neurons))) for j, b in enumerate(budgets)),
        params=costs.total - chosen.cost - units,
        target=target,
        reshape_params=chosen.cost,
        unit_params=units,
    )


def shape_candidates_for(config, target: int, prune: PruneConfig | None = None) -> list[ShapePlan]:
    """Every distinct candidate of ``prune``'s grids for one step from ``config`` (an HF config, or a
    model whose config is used) to ``target`` parameters; a run picks one of them by calibration loss.
    Infeasible candidates (the units cannot remove the rest) are left out."""
    prune = prune or PruneConfig()
    model, adapter = _step_model(config, prune)
    costs = shape_costs(model, adapter)
    floors = (prune.min_layers, prune.min_hidden, prune.hidden_multiple)
    scores = _dry_layer_scores(costs.layers)
    plans = []
    for c in grid_candidates(
        costs, scores, costs.total - target, prune.layer_fractions, prune.hidden_fractions, floors
    ):
        try:
            plans.append(_plan_units(model, adapter, c, target, prune))
        except ValueError:
            continue
    return plans


def shape_for_target(
    config, target: int, prune: PruneConfig | None = None, layer_fraction: float = 0.0, hidden_fraction: float = 0.0
) -> ShapePlan:
    """The shape one step from ``config`` to ``target`` gives when a fraction ``layer_fraction`` of the
    removal may go to layers and ``hidden_fraction`` to hidden channels (each taken as 0 when its
    dimension is not in ``prune.dims``), the units taking the rest uniformly. ValueError if the units
    cannot remove the rest (floors)."""
    prune = prune or PruneConfig()
    model, adapter = _step_model(config, prune)
    costs = shape_costs(model, adapter)
    fractions = (
        layer_fraction if "layers" in prune.dims else 0.0,
        hidden_fraction if "hidden" in prune.dims else 0.0,
    )
    floors = (prune.min_layers, prune.min_hidden, prune.hidden_multiple)
    chosen = candidate(costs, _dry_layer_scores(costs.layers), costs.total - target, fractions, floors)
    return _plan_units(model, adapter, chosen, target, prune)
