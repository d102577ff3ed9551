"""Stateless allocators: ``uniform``, ``adaptive`` (one Adapt-Pruner offset per step) and ``global`` (FLAP)."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from .core import (
    Allocator,
    LayerBudget,
    _infeasible,
    _LayerQueue,
    apportion,
    normalised_influence,
    relative_to_mean,
    solve_layer_targets,
    zscore,
)


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


class UniformAllocator(_LayerwiseAllocator):
    """Every layer loses the same fraction of its prunable parameters (layers at a floor excepted)."""

    name = "uniform"

    def offsets(self, influence: Tensor) -> Tensor:
        return torch.zeros(influence.numel(), dtype=torch.float64)


class AdaptiveAllocator(_LayerwiseAllocator):
    """Adapt-Pruner's (2502.03460) offset without its state: s_l = clip(s̄ − A·Ĩ_l, 0, s_max).

    Stateless: applied once per pruning stage with that stage's ``remove_params``, so s_l is a
    fraction of the layer's *current* prunable parameters and each stage shifts a layer by A·Ĩ_l
    once. Upstream accumulates the shift over its inner steps (``accumulating``), so at the same
    A its layers end several times less uniform than here.
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

    def config(self) -> dict:
        return {"amplitude": self.amplitude, "max_sparsity": self.max_sparsity}


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
