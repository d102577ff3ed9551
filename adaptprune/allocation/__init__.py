"""Allocation: turn per-unit scores into a pruning ``Plan`` that removes an exact parameter count.

Pure tensor math; the caller gathers each layer's sizes (``LayerBudget``), unit scores and layer
influence from the adapter. Four allocators, registered by name in ``ALLOCATORS``:

- ``uniform``: every layer loses the same fraction of its prunable parameters.
- ``adaptive`` (Adapt-Pruner's offset, stateless): each pruning stage, layer l loses the fraction
  s_l = clip(s̄ − A·Ĩ_l, 0, s_max) of its *current* prunable parameters, Ĩ = normalised layer
  influence, s̄ solved so that the total equals the target. One offset per stage, then forgotten.
- ``accumulating`` (Adapt-Pruner as published, ``accumulating.py``): a per-layer sparsity state
  s_l, a fraction of each layer's *reference* size, grows by Δ_j − A·Ĩ_l in every inner step
  (Δ_j solved so each step's target is exact; Ĩ re-estimated on fresh text every inner step), so
  the offsets accumulate: over k inner steps a layer that is always the most (least) influential
  ends k·A below (above) the mean, where ``adaptive`` gives A. Optionally a layer's KV groups and
  neurons share its ratio (``same_ratio``). Stateful: ``to_json``/``from_json``.
- ``global`` (FLAP "AL-AM", arXiv 2312.11983): scores z-scored per layer and kind, every group
  and neuron ranked together, the lowest removed first, each costing its parameter count.

How much of a step goes to whole layers and to hidden channels before the units take the rest is
``shape.py`` (pure counts; ``shape_search`` picks a candidate by calibration loss).

**Units and chunks.** A removal candidate ("chunk") is one KV group, or a run of MLP neurons:
with ``neuron_multiple`` m the kept neuron count of a pruned layer steps through multiples of m
(n → m·⌊(n−1)/m⌋ → ... → the smallest multiple of m ≥ ``min_neurons``), so the first chunk holds
1..m neurons and later ones m. Chunks of one kind are always taken lowest-score first, so every
kept set is the highest-scored units of its kind in its layer.

**Groups vs neurons inside a layer (uniform, adaptive, accumulating).** Scores of each kind are
divided by the kind's mean |score| in that layer. Under the neutral prior that an average
attention parameter and an average MLP parameter matter equally, this ratio is the unit's
importance per parameter, so the layer removes the lowest ratios first (the greedy
fractional-knapsack order); a chunk's key is the mean ratio of its neurons, ties go to neurons.
A KV group is coarse (often 100+ neurons' worth of parameters) and is only cut when it is the
cheapest importance per parameter at the layer's cut point, so early pruning lands mostly on
neurons. ``accumulating`` with ``same_ratio`` replaces this by upstream's rule: ⌊s_l·G0_l⌋ groups.

**Guarantee (all allocators).** With C = the parameter cost of the last chunk taken (at most
max over layers of max(params_per_group, neuron_multiple·params_per_neuron)):
``remove_params ≤ removed < remove_params + C`` — the target is never missed, and overshot by
less than one chunk; removed == 0 when ``remove_params == 0``. Floors are never crossed; a
target above what the floors (and s_max for ``adaptive``/``accumulating``) allow raises
``InfeasibleTargetError`` (a ``ValueError``). Layers whose neurons are untouched keep their count even if it is not a multiple
of m. For ``uniform``/``adaptive``/``accumulating`` each layer also ends within one chunk of its
own target (rounding by largest remainder, see ``apportion``); with ``same_ratio`` a layer's
groups follow ⌊s_l·G0_l⌋ and its neurons absorb the rounding.
"""

from __future__ import annotations

import difflib
from typing import Any

from ..config.registry import ALLOCATORS
from .accumulating import SCOPES, AccumulatingAllocator, SparsityState
from .core import (
    Allocator,
    InfeasibleTargetError,
    LayerBudget,
    apportion,
    neuron_chunk_sizes,
    normalised_influence,
    relative_to_mean,
    removable_params,
    removed_params,
    solve_layer_targets,
    zscore,
)
from .layerwise import AdaptiveAllocator, GlobalAllocator, UniformAllocator
from .targets import parse_target

ALLOCATORS.update(
    (cls.name, cls) for cls in (UniformAllocator, AdaptiveAllocator, AccumulatingAllocator, GlobalAllocator)
)


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


def allocator_from_json(data: dict[str, Any]) -> Allocator:
    """Rebuild an allocator (with its state) from ``Allocator.to_json()``."""
    name = data.get("name")
    if name not in ALLOCATORS:
        raise ValueError(f"allocator state names unknown allocator {name!r}; known: {', '.join(ALLOCATORS)}")
    return ALLOCATORS[name].from_json(data)


__all__ = [
    "ALLOCATORS",
    "SCOPES",
    "AccumulatingAllocator",
    "AdaptiveAllocator",
    "Allocator",
    "GlobalAllocator",
    "InfeasibleTargetError",
    "LayerBudget",
    "SparsityState",
    "UniformAllocator",
    "allocator_from_json",
    "apportion",
    "get_allocator",
    "neuron_chunk_sizes",
    "normalised_influence",
    "parse_target",
    "relative_to_mean",
    "removable_params",
    "removed_params",
    "solve_layer_targets",
    "zscore",
]
