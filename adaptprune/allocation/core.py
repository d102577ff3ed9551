"""Shared allocation machinery: layer budgets, score normalisation, removal chunks, exact rounding.

Pure tensor math. ``Allocator`` is the one extension point: scores + sizes -> a ``Plan`` that
removes an exact parameter count (see the package docstring for the guarantee). Its lifecycle
hooks ``start_stage`` and ``inner_steps`` let a stateful allocator split a pruning stage into
several inner steps (``AccumulatingAllocator``); stateless allocators use one step per stage.
"""

from __future__ import annotations

import itertools
import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..arch import ATTENTION, MLP
from .records import Plan

_KIND_CODE = {ATTENTION: 0, MLP: 1}


@dataclass(frozen=True)
class LayerBudget:
    """One decoder layer now: its units, the parameters each unit owns, and the floors."""

    groups: int  # KV groups the layer has now
    neurons: int  # MLP neurons the layer has now
    params_per_group: int  # parameters one KV group owns (q/k/v rows, o columns, biases)
    params_per_neuron: int  # parameters one neuron owns (gate/up rows, down column)
    min_groups: int = 1  # never keep fewer groups than this (0 allows emptying attention)
    min_neurons: int = 1  # never keep fewer neurons than this

    def __post_init__(self) -> None:
        for name in ("groups", "neurons", "params_per_group", "params_per_neuron", "min_groups", "min_neurons"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LayerBudget.{name} must be a non-negative int, got {value!r}")
        for count, per_unit in (("groups", "params_per_group"), ("neurons", "params_per_neuron")):
            if getattr(self, count) and not getattr(self, per_unit):
                raise ValueError(f"LayerBudget.{per_unit} must be >= 1 when {count} > 0")

    @property
    def prunable_params(self) -> int:
        """Parameters held by the layer's groups and neurons (what sparsity fractions refer to)."""
        return self.groups * self.params_per_group + self.neurons * self.params_per_neuron


# ---- per-kind normalisation --------------------------------------------------------------
def relative_to_mean(scores: Tensor) -> Tensor:
    """score / mean|score| of its kind: importance per parameter under the equal-value prior."""
    denom = scores.abs().mean() if scores.numel() else scores.new_zeros(())
    return scores / denom if denom > 0 else torch.zeros_like(scores)


def zscore(scores: Tensor) -> Tensor:
    """(score − mean) / std of its kind (FLAP's standardisation); 0 where std is 0 or undefined."""
    if scores.numel() < 2:
        return torch.zeros_like(scores)
    std = scores.std()
    return (scores - scores.mean()) / std if std > 0 else torch.zeros_like(scores)


def normalised_influence(influence: Tensor) -> Tensor:
    """Ĩ_l = (I_l − mean I) / max|I − mean I| ∈ [−1, 1] (Adapt-Pruner); all zeros if I is flat."""
    centred = influence.double() - influence.double().mean()
    scale = centred.abs().max() if centred.numel() else centred.new_zeros(())
    return centred / scale if scale > 0 else torch.zeros_like(centred)


# ---- chunks: the removal candidates of one layer -----------------------------------------
def neuron_chunk_sizes(count: int, floor: int, multiple: int) -> list[int]:
    """Neurons per removal step, lowest-scored first, so kept counts are multiples of ``multiple``."""
    lowest = multiple * math.ceil(floor / multiple)  # smallest kept count allowed
    levels = [count] + list(range(multiple * ((count - 1) // multiple), lowest - 1, -multiple))
    return [a - b for a, b in itertools.pairwise(levels)]


@dataclass(frozen=True)
class _LayerQueue:
    """One layer's chunks in removal order (lowest key first) and each kind's ids, lowest score first."""

    kind: Tensor  # (C,) int64: 0 attention, 1 mlp
    units: Tensor  # (C,) int64 units per chunk
    cost: Tensor  # (C,) int64 parameters per chunk
    key: Tensor  # (C,) float64 priority, non-decreasing
    order: dict[str, Tensor]  # kind -> unit ids sorted by ascending score

    @property
    def capacity(self) -> int:
        return int(self.cost.sum())

    def removed_units(self, taken: int, kind: str) -> int:
        """Units of ``kind`` inside the first ``taken`` chunks."""
        mask = self.kind[:taken] == _KIND_CODE[kind]
        return int(self.units[:taken][mask].sum())


def _kind_chunks(
    scores: Tensor, sizes: list[int], per_unit: int, normalise: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ids ascending, chunk sizes, chunk costs, chunk keys) for one kind of one layer."""
    order = torch.sort(scores, stable=True).indices
    ranked = normalise(scores.double())[order]
    units = torch.tensor(sizes, dtype=torch.long)
    ends = units.cumsum(0)
    sums = torch.cat([ranked.new_zeros(1), ranked.cumsum(0)])
    if not sizes:
        return order, units, units * per_unit, ranked.new_zeros(0)
    means = (sums[ends] - sums[ends - units]) / units
    keys = torch.cummax(means, 0).values  # non-decreasing despite rounding, so chunks keep their order
    return order, units, units * per_unit, keys


def _layer_queue(
    budget: LayerBudget, scores: dict[str, Tensor], normalise: Callable[[Tensor], Tensor], multiple: int
) -> _LayerQueue:
    group_sizes = [1] * max(budget.groups - budget.min_groups, 0)
    neuron_sizes = neuron_chunk_sizes(budget.neurons, budget.min_neurons, multiple)
    n_order, n_units, n_cost, n_key = _kind_chunks(scores[MLP], neuron_sizes, budget.params_per_neuron, normalise)
    g_order, g_units, g_cost, g_key = _kind_chunks(scores[ATTENTION], group_sizes, budget.params_per_group, normalise)
    # neurons first so that a stable sort hands ties to the finer unit
    kind = torch.cat([torch.ones_like(n_units), torch.zeros_like(g_units)])
    key = torch.cat([n_key, g_key])
    perm = torch.sort(key, stable=True).indices
    return _LayerQueue(
        kind=kind[perm],
        units=torch.cat([n_units, g_units])[perm],
        cost=torch.cat([n_cost, g_cost])[perm],
        key=key[perm],
        order={MLP: n_order, ATTENTION: g_order},
    )


def _to_plan(queues: Sequence[_LayerQueue], taken: Sequence[int]) -> dict[int, dict[str, list[int]]]:
    """Kept ids (sorted) for every (layer, kind) that loses at least one unit."""
    plan: dict[int, dict[str, list[int]]] = {}
    for layer_idx, (queue, k) in enumerate(zip(queues, taken, strict=True)):
        for kind in (ATTENTION, MLP):
            removed = queue.removed_units(k, kind)
            if removed:
                plan.setdefault(layer_idx, {})[kind] = sorted(queue.order[kind][removed:].tolist())
    return plan


# ---- validation and bookkeeping ----------------------------------------------------------
def _check_inputs(
    layers: Sequence[LayerBudget],
    scores: Sequence[dict[str, Tensor]],
    influence: Tensor,
    remove_params: int,
    neuron_multiple: int,
) -> int:
    remove_params = operator.index(remove_params)
    if remove_params < 0:
        raise ValueError(f"remove_params must be >= 0, got {remove_params:,}")
    if isinstance(neuron_multiple, bool) or not isinstance(neuron_multiple, int) or neuron_multiple < 1:
        raise ValueError(f"neuron_multiple must be an int >= 1, got {neuron_multiple!r}")
    if len(scores) != len(layers) or influence.numel() != len(layers):
        raise ValueError(
            f"got {len(layers)} layer budgets, {len(scores)} score dicts and {influence.numel()} influence values"
        )
    if not torch.isfinite(influence).all():
        raise ValueError("influence contains NaN or inf")
    for layer_idx, (budget, layer_scores) in enumerate(zip(layers, scores, strict=True)):
        for kind, count in ((ATTENTION, budget.groups), (MLP, budget.neurons)):
            s = layer_scores.get(kind)
            if s is None or s.dim() != 1 or s.numel() != count:
                got = "missing" if s is None else tuple(s.shape)
                raise ValueError(f"layer {layer_idx}: scores['{kind}'] must have shape ({count},), got {got}")
            if not torch.isfinite(s).all():
                raise ValueError(f"layer {layer_idx}: scores['{kind}'] contains NaN or inf")
    return remove_params


class InfeasibleTargetError(ValueError):
    """A removal the floors do not allow; one line, which the CLI shows as a user error (exit 2)."""


def _infeasible(remove_params: int, available: int, why: str) -> InfeasibleTargetError:
    return InfeasibleTargetError(
        f"cannot remove {remove_params:,} parameters: only {available:,} are removable ({why}); raise "
        "prune.target_params or lower the floors (prune.min_groups, prune.min_neurons, prune.neuron_multiple)"
    )


def removable_params(layers: Sequence[LayerBudget], *, neuron_multiple: int = 1) -> int:
    """Parameters that could be removed without crossing any floor (with kept neurons on multiples)."""
    total = 0
    for b in layers:
        total += max(b.groups - b.min_groups, 0) * b.params_per_group
        total += sum(neuron_chunk_sizes(b.neurons, b.min_neurons, neuron_multiple)) * b.params_per_neuron
    return total


def removed_params(layers: Sequence[LayerBudget], plan: Plan) -> int:
    """Parameters a plan removes, counted from the budgets (what surgery's count will drop by)."""
    total = 0
    for layer_idx, kinds in plan.items():
        b = layers[layer_idx]
        if ATTENTION in kinds:
            total += (b.groups - len(kinds[ATTENTION])) * b.params_per_group
        if MLP in kinds:
            total += (b.neurons - len(kinds[MLP])) * b.params_per_neuron
    return total


# ---- allocators --------------------------------------------------------------------------
class Allocator(ABC):
    """Scores + sizes -> Plan removing ``remove_params`` (never fewer, fewer than one chunk more).

    Lifecycle per pruning stage (``pruning.prune_step``): ``start_stage(layers)`` once, then
    ``inner_steps(layers, remove)`` says into how many inner steps the stage's removal is split,
    then one ``plan`` per inner step, each on freshly calibrated scores. A stateless allocator
    takes the whole stage in one step. ``to_json``/``from_json`` round-trip the allocator (and any
    state) through JSON so a checkpoint can carry it.
    """

    name: ClassVar[str]

    def start_stage(self, layers: Sequence[LayerBudget]) -> None:
        """Called once at the start of every pruning stage; stateless allocators ignore it."""
        return None

    def inner_steps(self, layers: Sequence[LayerBudget], remove_params: int) -> int:
        """How many inner steps (each recalibrated) the stage's ``remove_params`` is split into."""
        return 1

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON values) that rebuild this allocator."""
        return {}

    def to_json(self) -> dict[str, Any]:
        """``{"name": ..., **config}``: everything ``allocator_from_json`` needs, JSON-serialisable."""
        return {"name": self.name, **self.config()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Allocator:
        """The allocator ``to_json`` described."""
        return cls(**{k: v for k, v in data.items() if k != "name"})

    def plan(
        self,
        layers: Sequence[LayerBudget],
        scores: Sequence[dict[str, Tensor]],
        influence: Tensor,
        remove_params: int,
        *,
        neuron_multiple: int = 1,
    ) -> dict[int, dict[str, list[int]]]:
        """Kept ids per layer and kind (only entries that lose units); see the module docstring."""
        remove_params = _check_inputs(layers, scores, influence, remove_params, neuron_multiple)
        queues = [_layer_queue(b, s, self.normalise, neuron_multiple) for b, s in zip(layers, scores, strict=True)]
        taken = self._take(layers, queues, influence, remove_params) if remove_params else [0] * len(layers)
        return _to_plan(queues, taken)

    @staticmethod
    @abstractmethod
    def normalise(scores: Tensor) -> Tensor:
        """Per-layer, per-kind score normalisation that defines the removal order."""

    @abstractmethod
    def _take(
        self, layers: Sequence[LayerBudget], queues: Sequence[_LayerQueue], influence: Tensor, remove_params: int
    ) -> list[int]:
        """Chunks taken from the front of each layer's queue."""


def solve_layer_targets(
    offsets: Tensor, prunable: Tensor, capacity: Tensor, remove_params: int, max_sparsity: float = 1.0
) -> Tensor:
    """r_l = min(clip(s̄ + o_l, 0, s_max)·P_l, cap_l) with s̄ found by bisection so Σ r_l = remove_params.

    Σ r_l is continuous and non-decreasing in s̄, so the bisection is exact to float precision;
    layers that hit a floor (cap_l) hand their share to the others (water-filling).
    """
    offsets, prunable, capacity = offsets.double(), prunable.double(), capacity.double()

    def removal(level: float) -> Tensor:
        return torch.minimum((level + offsets).clamp(0.0, max_sparsity) * prunable, capacity)

    lo, hi = float(-offsets.max()), float(max_sparsity - offsets.min())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if float(removal(mid).sum()) < remove_params else (lo, mid)
    return removal(hi)


def apportion(costs: Sequence[Tensor], targets: Tensor, remove_params: int) -> list[int]:
    """Round per-layer targets r_l to chunk prefixes so the total lands in [target, target + chunk).

    Each layer first takes its longest prefix costing ≤ r_l; then, while the total is short, the
    layer whose next chunk is most covered by its remaining deficit (largest remainder, in units
    of that chunk) takes it. Every layer ends within one chunk of its r_l.
    """
    prefix = [torch.cat([c.new_zeros(1), c.cumsum(0)]).double() for c in costs]
    taken = [int(torch.searchsorted(p, targets[i : i + 1].double(), right=True)) - 1 for i, p in enumerate(prefix)]
    removed = sum(int(p[k]) for p, k in zip(prefix, taken, strict=True))
    while removed < remove_params:
        open_layers = [i for i, p in enumerate(prefix) if taken[i] < len(p) - 1]
        best = max(open_layers, key=lambda i: (float(targets[i] - prefix[i][taken[i]]) / float(costs[i][taken[i]]), -i))
        removed += int(costs[best][taken[best]])
        taken[best] += 1
    return taken
