"""``accumulating``: Adapt-Pruner's layer-wise sparsity as published (arXiv 2502.03460, Alg. 1).

Upstream (research4pan/AdaptPruner: ``utils/hf_prune.py`` runs the inner steps,
``LLMPruner/torch_pruning/pruner/algorithms/metapruner.py`` ``adaptive_update_prune_distribution``
and ``prune_local`` apply them) keeps a per-layer *target sparsity* s_l, a fraction of the
layer's size when the pruner was built, and before every inner step, on fresh samples, sets

    s_l ← clip(s_l + Δ − A·Ĩ_l, 0, 0.99),   Δ = pruning_ratio / iterative_steps = 1.0 / 50,

Ĩ = the normalised layer influence of this step. Each layer is then cut down to (1 − s_l) of its
initial size (its KV heads and MLP neurons alike), until a step lands below the parameter target.

Here, per layer: the reference sizes (G0_l, N0_l), so P0_l = G0·ppg + N0·ppn, and s_l; the
layer has removed D_l = P0_l − P_l so far (P_l: its prunable parameters now).

- **Inner steps.** A stage removing R parameters is split into k = ⌈R / (Δ·Σ P0)⌉ inner steps
  (``inner_steps``), upstream's number of steps for R, with cumulative targets ⌊j·R/k⌋.
- **Δ is solved, not fixed** (how "Δ per step" meets an exact target): inner step j removing R_j
  sets the common increment Δ_j to the smallest value with
  Σ_l clip(clip(s_l + Δ_j − A·Ĩ_l, 0, s_max)·P0_l − D_l, 0, cap_l) = R_j
  (bisection; the sum is continuous and non-decreasing in Δ_j). Without clipping that is
  Δ_j = R_j / Σ P0 ≈ R / (k·Σ P0) ≤ Δ. Layer targets are rounded to whole chunks by largest
  remainder (``apportion``): target ≤ removed < target + one chunk, as for every allocator, where
  upstream overshoots by up to one inner step. The offsets −A·Ĩ_l accumulate over steps.
- **State = targets.** s_l keeps the solved clip(s_l + Δ_j − A·Ĩ_l, 0, s_max), as upstream keeps
  its targets; rounding is absorbed through D_l (a layer that overshot removes less next step).
- **Scope.** ``"stage"`` (upstream: ``hf_prune.py`` runs once per prune-train stage with a new
  pruner, so s_l restarts at 0 with the stage's sizes as reference) or ``"run"`` (one state for
  the whole run, reference = the sizes the allocator first saw). Either way the state is JSON
  (``to_json``/``from_json``) so a stage checkpoint can carry it.
- **same_ratio.** Upstream cuts a layer's KV heads and neurons at the same ratio. With
  ``same_ratio`` a layer holds ⌊s_l·G0_l⌋ groups removed in all and spends the rest of its
  parameter budget s_l·P0_l on neurons (its lowest-scored ones); otherwise the layer's budget goes
  to its cheapest chunks per unit of importance (the mixed queue of ``core``). Upstream removes
  ⌈s·N0⌉ neurons instead, so its layers lose less than s·P0 when the heads floor. Where a group
  jump would overshoot a step, the step takes the groups just below the jump and the neurons
  make up the target (``_resolve_jump``), so the target guarantee holds here too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..arch import ATTENTION, MLP
from .core import (
    Allocator,
    LayerBudget,
    _check_inputs,
    _infeasible,
    _kind_chunks,
    _LayerQueue,
    apportion,
    neuron_chunk_sizes,
    normalised_influence,
    relative_to_mean,
)

SCOPES = ("stage", "run")
_EPS = 1e-9  # ⌊s·G0⌋ must not drop a group to float noise when s·G0 is a whole number


@dataclass
class SparsityState:
    """Per-layer reference sizes and target sparsity: everything the allocator remembers."""

    groups: list[int]  # G0_l: KV groups of each layer when the state started (the reference)
    neurons: list[int]  # N0_l: MLP neurons likewise
    sparsity: list[float]  # s_l: target fraction of the reference prunable parameters removed
    steps: int = 0  # inner steps taken since the state started

    @classmethod
    def start(cls, layers: Sequence[LayerBudget]) -> SparsityState:
        return cls([b.groups for b in layers], [b.neurons for b in layers], [0.0] * len(layers))

    def check(self, layers: Sequence[LayerBudget]) -> None:
        """The layers must be the reference model's, never larger than their reference size."""
        if len(layers) != len(self.sparsity):
            raise ValueError(f"allocator state covers {len(self.sparsity)} layers, the model has {len(layers)}")
        for i, b in enumerate(layers):
            if b.groups > self.groups[i] or b.neurons > self.neurons[i]:
                raise ValueError(
                    f"layer {i} has {b.groups} groups and {b.neurons} neurons, more than the state's reference "
                    f"({self.groups[i]}, {self.neurons[i]}): the state belongs to another model"
                )

    def reference(self, layers: Sequence[LayerBudget]) -> Tensor:
        """P0_l = G0·ppg + N0·ppn, float64 (L,)."""
        return torch.tensor(
            [g * b.params_per_group + n * b.params_per_neuron for g, n, b in zip(self.groups, self.neurons, layers)],
            dtype=torch.float64,
        )

    def removed(self, layers: Sequence[LayerBudget]) -> Tensor:
        """D_l = P0_l − P_l: parameters each layer has lost since the reference, float64 (L,)."""
        return self.reference(layers) - torch.tensor([b.prunable_params for b in layers], dtype=torch.float64)


# ---- pure tensor math --------------------------------------------------------------------
def accumulate(sparsity: Tensor, delta: float, offsets: Tensor, max_sparsity: float) -> Tensor:
    """Upstream's update s_l ← clip(s_l + Δ + o_l, 0, s_max) with o_l = −A·Ĩ_l."""
    return (sparsity + delta + offsets).clamp(0.0, max_sparsity)


def bracket(total: Callable[[float], float], lo: float, hi: float, target: float) -> tuple[float, float]:
    """(lo, hi) with total(lo) < target ≤ total(hi), hi − lo at float resolution.

    ``total`` must be non-decreasing with total(lo) < target ≤ total(hi) on entry.
    """
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if total(mid) < target else (lo, mid)
    return lo, hi


def layer_increments(new_sparsity: Tensor, reference: Tensor, removed: Tensor, capacity: Tensor) -> Tensor:
    """This step's removal per layer: clip(s_l·P0_l − D_l, 0, cap_l), float64 (L,)."""
    return torch.minimum((new_sparsity * reference - removed).clamp_min(0.0), capacity)


def same_ratio_split(
    new_sparsity: Tensor, ref_groups: Tensor, layers: Sequence[LayerBudget], removed: Tensor, reference: Tensor
) -> tuple[Tensor, Tensor]:
    """(groups removed now (L,) int64, neuron parameters the layer budget leaves, float64 (L,)).

    Groups: ⌊s_l·G0_l⌋ in all, less those already gone, within the floor. Neurons: the rest of
    the layer's budget s_l·P0_l − D_l (clipped at 0; the caller caps it at the neuron capacity).
    """
    groups_now = torch.tensor([b.groups for b in layers], dtype=torch.long)
    room = torch.tensor([max(b.groups - b.min_groups, 0) for b in layers], dtype=torch.long)
    per_group = torch.tensor([b.params_per_group for b in layers], dtype=torch.float64)
    total = torch.floor(new_sparsity * ref_groups + _EPS).long()
    groups = (total - (ref_groups.long() - groups_now)).clamp(min=0)
    groups = torch.minimum(groups, room)
    neurons = (new_sparsity * reference - removed - groups * per_group).clamp_min(0.0)
    return groups, neurons


def spread(targets: Tensor, capacity: Tensor, total: float) -> Tensor:
    """Targets rescaled to sum to ``total`` within ``capacity``: scaled down, or the missing part
    spread over the remaining room in proportion to it."""
    have = float(targets.sum())
    if have >= total:
        return targets * (total / have) if have > 0 else targets
    room = capacity - targets
    if float(room.sum()) <= 0:
        return targets
    return targets + room * min((total - have) / float(room.sum()), 1.0)


# ---- the allocator -----------------------------------------------------------------------
class AccumulatingAllocator(Allocator):
    """Adapt-Pruner's stateful allocation: s_l ← clip(s_l + Δ_j − A·Ĩ_l, 0, s_max) every inner step.

    One ``plan`` call is one inner step and advances the state; see the module docstring for how
    Δ_j, the inner-step count, the scope and ``same_ratio`` are defined.
    """

    name = "accumulating"

    normalise = staticmethod(relative_to_mean)

    def __init__(
        self,
        amplitude: float = 0.02,
        step: float = 0.02,
        max_sparsity: float = 0.99,
        same_ratio: bool = False,
        scope: str = "stage",
        state: SparsityState | dict | None = None,
    ) -> None:
        if not 0.0 <= amplitude <= 1.0:
            raise ValueError(f"amplitude must lie in [0, 1], got {amplitude}")
        if not 0.0 < step <= 1.0:
            raise ValueError(f"step (Δ) must lie in (0, 1], got {step}")
        if not 0.0 < max_sparsity <= 1.0:
            raise ValueError(f"max_sparsity must lie in (0, 1], got {max_sparsity}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        self.amplitude, self.step, self.max_sparsity = float(amplitude), float(step), float(max_sparsity)
        self.same_ratio, self.scope = bool(same_ratio), scope
        self.state = SparsityState(**state) if isinstance(state, dict) else state

    # ---- lifecycle and serialisation -------------------------------------------------------
    def start_stage(self, layers: Sequence[LayerBudget]) -> None:
        """Scope ``stage``: restart at s = 0 with today's sizes; scope ``run``: keep the state."""
        if self.scope == "stage" or self.state is None:
            self.state = SparsityState.start(layers)
        else:
            self.state.check(layers)

    def inner_steps(self, layers: Sequence[LayerBudget], remove_params: int) -> int:
        """k = ⌈R / (Δ·Σ P0)⌉: upstream's inner steps for R (it stops at the first step past the target)."""
        if remove_params <= 0:
            return 1
        state = self.state or SparsityState.start(layers)
        per_step = self.step * float(state.reference(layers).sum())
        return max(1, math.ceil(remove_params / per_step - _EPS)) if per_step > 0 else 1

    def config(self) -> dict[str, Any]:
        return {
            "amplitude": self.amplitude,
            "step": self.step,
            "max_sparsity": self.max_sparsity,
            "same_ratio": self.same_ratio,
            "scope": self.scope,
        }

    def to_json(self) -> dict[str, Any]:
        """Hyperparameters and state; ``json.dumps`` round-trips every float exactly."""
        return {**super().to_json(), "state": dataclasses.asdict(self.state) if self.state else None}

    # ---- one inner step ---------------------------------------------------------------------
    def plan(
        self,
        layers: Sequence[LayerBudget],
        scores: Sequence[dict[str, Tensor]],
        influence: Tensor,
        remove_params: int,
        *,
        neuron_multiple: int = 1,
    ) -> dict[int, dict[str, list[int]]]:
        """One inner step: update s_l on this step's influence, remove ``remove_params`` exactly."""
        remove_params = _check_inputs(layers, scores, influence, remove_params, neuron_multiple)
        if self.state is None:
            self.state = SparsityState.start(layers)
        self.state.check(layers)
        if remove_params == 0:
            return {}
        if self.same_ratio:
            return self._same_ratio_plan(layers, scores, influence, remove_params, neuron_multiple)
        return super().plan(layers, scores, influence, remove_params, neuron_multiple=neuron_multiple)

    def _offsets(self, influence: Tensor) -> Tensor:
        return -self.amplitude * normalised_influence(influence)

    def _levels(self) -> tuple[float, float]:
        """Δ values at which every layer's new s is 0, and s_max (|A·Ĩ_l| ≤ A)."""
        s = torch.tensor(self.state.sparsity, dtype=torch.float64)
        return -float(s.max()) - self.amplitude - 1.0, self.max_sparsity + self.amplitude + 1.0

    def _advance(self, new_sparsity: Tensor) -> None:
        self.state.sparsity = new_sparsity.tolist()
        self.state.steps += 1

    def _take(
        self, layers: Sequence[LayerBudget], queues: Sequence[_LayerQueue], influence: Tensor, remove_params: int
    ) -> list[int]:
        """Mixed queues: solve Δ_j for the layer targets, round them to chunks."""
        s = torch.tensor(self.state.sparsity, dtype=torch.float64)
        offsets = self._offsets(influence)
        reference, removed = self.state.reference(layers), self.state.removed(layers)
        capacity = torch.tensor([q.capacity for q in queues], dtype=torch.float64)

        def increments(delta: float) -> Tensor:
            return layer_increments(accumulate(s, delta, offsets, self.max_sparsity), reference, removed, capacity)

        lo, hi = self._levels()
        available = math.floor(increments(hi).sum())
        if remove_params > available:
            raise _infeasible(remove_params, available, f"floors, and at most {self.max_sparsity:g} of each layer")
        _, delta = bracket(lambda d: float(increments(d).sum()), lo, hi, remove_params)
        taken = apportion([q.cost for q in queues], increments(delta), remove_params)
        self._advance(accumulate(s, delta, offsets, self.max_sparsity))
        return taken

    # ---- same-ratio inner step --------------------------------------------------------------
    def _same_ratio_plan(
        self,
        layers: Sequence[LayerBudget],
        scores: Sequence[dict[str, Tensor]],
        influence: Tensor,
        remove_params: int,
        multiple: int,
    ) -> dict[int, dict[str, list[int]]]:
        """⌊s_l·G0_l⌋ groups per layer in all, the rest of each layer's budget in neurons."""
        s = torch.tensor(self.state.sparsity, dtype=torch.float64)
        offsets = self._offsets(influence)
        reference, removed = self.state.reference(layers), self.state.removed(layers)
        ref_groups = torch.tensor(self.state.groups, dtype=torch.float64)
        per_group = torch.tensor([b.params_per_group for b in layers], dtype=torch.float64)
        neuron = [
            _kind_chunks(
                sc[MLP], neuron_chunk_sizes(b.neurons, b.min_neurons, multiple), b.params_per_neuron, self.normalise
            )
            for b, sc in zip(layers, scores, strict=True)
        ]
        ncap = torch.tensor([float(costs.sum()) for _, _, costs, _ in neuron], dtype=torch.float64)

        def split(delta: float) -> tuple[Tensor, Tensor, Tensor]:
            new = accumulate(s, delta, offsets, self.max_sparsity)
            groups, neurons = same_ratio_split(new, ref_groups, layers, removed, reference)
            return new, groups, torch.minimum(neurons, ncap)

        def total(delta: float) -> float:
            _, groups, neurons = split(delta)
            return float((groups * per_group).sum() + neurons.sum())

        lo, hi = self._levels()
        available = math.floor(total(hi))
        if remove_params > available:
            raise _infeasible(remove_params, available, f"floors, and at most {self.max_sparsity:g} of each layer")
        new, groups, neurons = _resolve_jump(
            split, *bracket(total, lo, hi, remove_params), per_group, ncap, remove_params
        )
        rest = remove_params - int((groups * per_group).sum())
        taken = apportion([costs for _, _, costs, _ in neuron], neurons, rest)
        self._advance(new)
        return _same_ratio_kept(scores, groups, neuron, taken)


def _resolve_jump(
    split: Callable[[float], tuple[Tensor, Tensor, Tensor]],
    lo: float,
    hi: float,
    per_group: Tensor,
    neuron_capacity: Tensor,
    remove_params: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(new s, groups, neuron targets summing to the rest) for Δ at the bracket (lo, hi).

    Usually hi's groups leave a rest the neurons can take. At a group jump (one or several layers
    reach ⌊s·G0⌋ + 1 between lo and hi, i.e. s·G0 is a whole number to float precision, so either
    count is ⌊s·G0⌋) hi's groups may exceed the step: then start from lo's groups and add the
    jumping layers' groups, smallest first, only while the rest is more than the neurons can take.
    The result overshoots by less than one group (the guarantee's one chunk).
    """
    capacity = float(neuron_capacity.sum())
    new, groups, neurons = split(hi)
    rest = remove_params - float((groups * per_group).sum())
    if 0 <= rest <= capacity:
        return new, groups, spread(neurons, neuron_capacity, rest)
    new, lo_groups, neurons = split(lo)
    chosen = lo_groups.clone()
    jumping = sorted(
        (i for i in range(len(groups)) if groups[i] > lo_groups[i]), key=lambda i: (float(per_group[i]), i)
    )
    for i in jumping:
        while chosen[i] < groups[i] and remove_params - float((chosen * per_group).sum()) > capacity:
            chosen[i] += 1
    rest = remove_params - float((chosen * per_group).sum())
    return new, chosen, spread(neurons, neuron_capacity, max(rest, 0.0))


def _same_ratio_kept(
    scores: Sequence[dict[str, Tensor]],
    groups: Tensor,
    neuron: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]],
    taken: Sequence[int],
) -> dict[int, dict[str, list[int]]]:
    """Kept ids: all but the ``groups[l]`` lowest-scored groups and the neurons of ``taken[l]`` chunks."""
    plan: dict[int, dict[str, list[int]]] = {}
    for i, (layer_scores, (order, units, _, _), k) in enumerate(zip(scores, neuron, taken, strict=True)):
        kinds = {}
        g = int(groups[i])
        if g:
            kinds[ATTENTION] = sorted(torch.sort(layer_scores[ATTENTION], stable=True).indices[g:].tolist())
        gone = int(units[:k].sum())
        if gone:
            kinds[MLP] = sorted(order[gone:].tolist())
        if kinds:
            plan[i] = kinds
    return plan
