"""Allocation: turn per-unit scores into a pruning ``Plan`` that removes an exact parameter count.

Pure tensor math; the caller gathers each layer's sizes (``LayerBudget``), unit scores and layer
influence from the adapter. Three allocators, registered by name in ``ALLOCATORS``:

- ``uniform``: every layer loses the same fraction of its prunable parameters.
- ``adaptive`` (Adapt-Pruner, arXiv 2502.03460): layer l loses the fraction
  s_l = clip(s̄ − A·Ĩ_l, 0, s_max) of its prunable parameters, Ĩ = normalised layer influence, so
  more influential layers lose less; s̄ is solved so that the total equals the target.
- ``global`` (FLAP "AL-AM", arXiv 2312.11983): scores z-scored per layer and kind, every group
  and neuron ranked together, the lowest removed first, each costing its parameter count.

**Units and chunks.** A removal candidate ("chunk") is one KV group, or a run of MLP neurons:
with ``neuron_multiple`` m the kept neuron count of a pruned layer steps through multiples of m
(n → m·⌊(n−1)/m⌋ → ... → the smallest multiple of m ≥ ``min_neurons``), so the first chunk holds
1..m neurons and later ones m. Chunks of one kind are always taken lowest-score first, so every
kept set is the highest-scored units of its kind in its layer.

**Groups vs neurons inside a layer (uniform, adaptive).** Scores of each kind are divided by
the kind's mean |score| in that layer. Under the neutral prior that an average attention
parameter and an average MLP parameter matter equally, this ratio is the unit's importance per
parameter, so the layer removes the lowest ratios first (the greedy fractional-knapsack order);
a chunk's key is the mean ratio of its neurons, ties go to neurons. A KV group is coarse (often
100+ neurons' worth of parameters) and is only cut when it is the cheapest importance per
parameter at the layer's cut point, so early pruning lands mostly on neurons.

**Guarantee (all allocators).** With C = the parameter cost of the last chunk taken (at most
max over layers of max(params_per_group, neuron_multiple·params_per_neuron)):
``remove_params ≤ removed < remove_params + C`` — the target is never missed, and overshot by
less than one chunk; removed == 0 when ``remove_params == 0``. Floors are never crossed; a
target above what the floors (and s_max for ``adaptive``) allow raises ``ValueError``.
Layers whose neurons are untouched keep their count even if it is not a multiple of m.
For ``uniform``/``adaptive`` each layer also ends within one chunk of its own sparsity target
s_l·P_l (rounding by largest remainder, see ``apportion``).
"""

from __future__ import annotations

import difflib
import itertools
import math
import operator
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .arch import ATTENTION, MLP
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


def _infeasible(remove_params: int, available: int, why: str) -> ValueError:
    return ValueError(f"cannot remove {remove_params:,} parameters: only {available:,} are removable ({why})")


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
    """Scores + sizes -> Plan removing ``remove_params`` (never fewer, fewer than one chunk more)."""

    name: ClassVar[str]

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


class _LayerwiseAllocator(Allocator):
    """Per-layer removal targets r_l from sparsities, rounded to chunks by largest remainder."""

    max_sparsity: float = 1.0

    normalise = staticmethod(relative_to_mean)

    @abstractmethod
    def offsets(self, influence: Tensor) -> Tensor:
        """Per-layer sparsity offsets o_l; layer l removes clip(s̄ + o_l, 0, s_max) of its params."""

    def _take(
        self, layers: Sequence[LayerBudget], queues: Sequence[_LayerQueue], influence: Tensor, remove_params: int
    ) -> list[int]:
        prunable = torch.tensor([b.prunable_params for b in layers], dtype=torch.float64)
        capacity = torch.tensor([q.capacity for q in queues], dtype=torch.float64)
        available = math.floor(torch.minimum(prunable * self.max_sparsity, capacity).sum())
        if remove_params > available:
            raise _infeasible(remove_params, available, f"floors, and at most {self.max_sparsity:g} of each layer")
        targets = solve_layer_targets(self.offsets(influence), prunable, capacity, remove_params, self.max_sparsity)
        return apportion([q.cost for q in queues], targets, remove_params)


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


class UniformAllocator(_LayerwiseAllocator):
    """Every layer loses the same fraction of its prunable parameters (layers at a floor excepted)."""

    name = "uniform"

    def offsets(self, influence: Tensor) -> Tensor:
        return torch.zeros(influence.numel(), dtype=torch.float64)


class AdaptiveAllocator(_LayerwiseAllocator):
    """Adapt-Pruner (2502.03460) layer-wise sparsity: s_l = clip(s̄ − A·Ĩ_l, 0, s_max).

    Stateless: applied once per pruning step with that step's ``remove_params``, so s_l is a
    fraction of the layer's *current* prunable parameters, and each step shifts layers by the
    paper's per-step A·Ĩ_l (the paper's s_l ← s_l + Δ − A·Ĩ_l, with s̄ playing Δ).
    """

    name = "adaptive"

    def __init__(self, amplitude: float = 0.02, max_sparsity: float = 0.99) -> None:
        if not 0.0 <= amplitude <= 1.0:
            raise ValueError(f"amplitude must lie in [0, 1], got {amplitude}")
        if not 0.0 < max_sparsity <= 1.0:
            raise ValueError(f"max_sparsity must lie in (0, 1], got {max_sparsity}")
        self.amplitude = float(amplitude)
        self.max_sparsity = float(max_sparsity)

    def offsets(self, influence: Tensor) -> Tensor:
        return -self.amplitude * normalised_influence(influence)


class GlobalAllocator(Allocator):
    """FLAP AL-AM (2312.11983): z-score scores per layer and kind, remove the lowest globally.

    Greedy removal by lowest standardised score with cost accounting: each chunk costs its
    parameter count (a group weighs params_per_group / params_per_neuron neurons, FLAP's 512/3
    for Llama-7B); chunks are taken in ascending z until the removed count reaches the target.
    Differences from FLAP: group scores (not o_proj channels) are standardised, and the cut is
    the first prefix reaching the target rather than the nearest one. Influence is unused.
    """

    name = "global"

    normalise = staticmethod(zscore)

    def _take(
        self, layers: Sequence[LayerBudget], queues: Sequence[_LayerQueue], influence: Tensor, remove_params: int
    ) -> list[int]:
        available = sum(q.capacity for q in queues)
        if remove_params > available:
            raise _infeasible(remove_params, available, "floors")
        keys = torch.cat([q.key for q in queues])
        costs = torch.cat([q.cost for q in queues])
        layer_of = torch.cat([torch.full_like(q.cost, i) for i, q in enumerate(queues)])
        order = torch.sort(keys, stable=True).indices  # stable: each layer's queue order survives
        spent = costs[order].cumsum(0)
        count = int(torch.searchsorted(spent, torch.tensor([remove_params]))) + 1
        return torch.bincount(layer_of[order[:count]], minlength=len(queues)).tolist()


ALLOCATORS: dict[str, type[Allocator]] = {
    cls.name: cls for cls in (UniformAllocator, AdaptiveAllocator, GlobalAllocator)
}


def get_allocator(name: str, **kwargs) -> Allocator:
    """Build an allocator from its config name; unknown names suggest the nearest valid one."""
    if name not in ALLOCATORS:
        near = difflib.get_close_matches(name, ALLOCATORS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ValueError(f"unknown allocator '{name}'{hint}; choose from {', '.join(ALLOCATORS)}")
    try:
        return ALLOCATORS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"allocator '{name}' does not accept {sorted(kwargs)}: {err}") from None


# ---- target strings ----------------------------------------------------------------------
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}
_TARGET = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([kmbx]?)$", re.IGNORECASE)


def parse_target(text: str, total_params: int) -> int:
    """A parameter count from ``'90M'``, ``'1.2B'``, ``'500k'``, ``'134515008'`` or ``'0.7x'`` (× total).

    The result must lie in [1, total_params); anything else raises a one-line ``ValueError``.
    """
    match = _TARGET.match(str(text).strip().replace("_", ""))
    if not match:
        raise ValueError(
            f"target_params '{text}' is not a count like '90M', '1.2B', '134515008' or a ratio like '0.7x'"
        )
    number, suffix = match.group(1), match.group(2).lower()
    value = float(number)
    if suffix == "x":
        if not 0.0 < value < 1.0:
            raise ValueError(f"target_params ratio '{text}' must lie strictly between 0 and 1")
        count = round(value * total_params)
    elif suffix == "" and "." in number:
        raise ValueError(f"target_params '{text}' must be a whole number of parameters (or use K/M/B or x)")
    else:
        count = round(value * _SUFFIX[suffix])
    if not 0 < count < total_params:
        raise ValueError(f"target_params '{text}' = {count:,} must lie between 1 and the model's {total_params:,} - 1")
    return count
