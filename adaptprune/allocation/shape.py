"""Shape allocation: how much of one pruning step goes to whole layers and to hidden channels.

Pure integer maths on parameter counts; ``shape.search`` measures the counts on the model and
picks among the candidates by calibration loss, ``shape.dry_run`` runs it without weights.

**Costs.** ``ShapeCosts`` holds the model's parameter count P, its hidden size H, each decoder
layer's parameters p_l and, per residual channel, the parameters it owns outside the layers (c_out:
embedding column, final norm, an untied head's column) and inside layer l (c_l: reader columns,
writer rows and biases, norm entries). Removing the layer set S and then c channels removes exactly

    Σ_{l∈S} p_l  +  c · (c_out + Σ_{l∉S} c_l)

parameters (layers first: a channel removed afterwards no longer has entries in the removed layers).

**One candidate** is a pair of fractions (f_L, f_H) of the step's removal R:
- layers: the lowest-scored layers, taken in score order while their summed cost stays ≤ f_L·R
  (a prefix of the ranking: the k least important layers that fit), never below ``min_layers``;
- hidden channels: the kept width steps down through multiples of ``hidden_multiple`` (as MLP
  neurons do with ``neuron_multiple``) while the channels' cost stays ≤ min(f_H·R, R − layers' cost),
  never below ``min_hidden``;
- units (KV groups, MLP neurons) remove the rest, R − layers − hidden ≥ 0, with the allocators'
  guarantee.

**Guarantee.** Layers and channels never exceed R, so the units always fill an exact remainder:
``target ≤ removed < target + C`` with C the cost of the last *unit* chunk (a KV group or
``neuron_multiple`` neurons at the reshaped width), as without reshaping. A whole layer, which can
cost far more than a chunk, is never the last chunk: it is only taken when it fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .core import neuron_chunk_sizes

HIDDEN = "hidden"
LAYERS = "layers"


@dataclass(frozen=True)
class ShapeCosts:
    """Parameter counts of one model that decide what removing layers and channels costs."""

    total: int  # P: every (unique) parameter
    hidden: int  # H: residual channels
    layer_params: tuple[int, ...]  # p_l: parameters of decoder layer l
    channel_outside: int  # c_out: parameters one channel owns outside the decoder layers
    channel_per_layer: tuple[int, ...]  # c_l: parameters one channel owns inside layer l

    def __post_init__(self) -> None:
        if len(self.layer_params) != len(self.channel_per_layer):
            raise ValueError(f"{len(self.layer_params)} layer sizes but {len(self.channel_per_layer)} channel shares")

    @property
    def layers(self) -> int:
        return len(self.layer_params)

    def channel_cost(self, removed_layers: Sequence[int] = ()) -> int:
        """Parameters one channel owns once ``removed_layers`` are gone: c_out + Σ_{l∉S} c_l."""
        gone = set(removed_layers)
        return self.channel_outside + sum(c for i, c in enumerate(self.channel_per_layer) if i not in gone)

    def removal_cost(self, removed_layers: Sequence[int], channels: int) -> int:
        """Σ_{l∈S} p_l + c·channel_cost(S): exactly what the two surgeries remove, layers first."""
        return sum(self.layer_params[i] for i in set(removed_layers)) + channels * self.channel_cost(removed_layers)


@dataclass(frozen=True)
class ShapeCandidate:
    """One point of the grid: what goes, and what that costs (units remove the rest)."""

    layer_fraction: float  # f_L
    hidden_fraction: float  # f_H
    removed_layers: tuple[int, ...]  # ascending layer ids
    removed_channels: int
    cost: int  # parameters the layers and channels own (≤ the step's removal)

    @property
    def key(self) -> tuple[tuple[int, ...], int]:
        """Two fraction pairs giving the same layers and channel count are one candidate."""
        return self.removed_layers, self.removed_channels

    @property
    def reshapes(self) -> bool:
        return bool(self.removed_layers) or self.removed_channels > 0


def layers_within(layer_params: Sequence[int], scores: Tensor, budget: float, min_layers: int = 1) -> tuple[int, ...]:
    """The lowest-scored layers (ties: the later layer first) while their summed cost ≤ ``budget``.

    Stops at the first layer that does not fit, so the result is always the k least important
    layers for some k, and keeps at least ``min_layers``. Ascending ids.
    """
    if scores.numel() != len(layer_params):
        raise ValueError(f"{scores.numel()} layer scores for {len(layer_params)} layers")
    order = sorted(range(len(layer_params)), key=lambda i: (float(scores[i]), -i))
    taken: list[int] = []
    spent = 0
    for i in order[: max(len(layer_params) - min_layers, 0)]:
        if spent + layer_params[i] > budget:
            break
        spent += layer_params[i]
        taken.append(i)
    return tuple(sorted(taken))


def channels_within(hidden: int, per_channel: int, budget: float, min_hidden: int = 1, multiple: int = 1) -> int:
    """Channels to remove: the most whole chunks (kept width on multiples of ``multiple``, never
    below ``min_hidden``) whose cost ``channels · per_channel`` stays ≤ ``budget``."""
    if per_channel <= 0:
        return 0
    removed = 0
    for size in neuron_chunk_sizes(hidden, min_hidden, multiple):
        if (removed + size) * per_channel > budget:
            break
        removed += size
    return removed


def candidate(
    costs: ShapeCosts,
    layer_scores: Tensor,
    remove_params: int,
    fractions: tuple[float, float],
    floors: tuple[int, int, int] = (1, 1, 1),
) -> ShapeCandidate:
    """The (f_L, f_H) candidate of a step removing ``remove_params``; ``floors`` = (min_layers,
    min_hidden, hidden_multiple). Layers first, then channels from what layers left (module docstring)."""
    layer_fraction, hidden_fraction = fractions
    min_layers, min_hidden, multiple = floors
    removed = layers_within(costs.layer_params, layer_scores, layer_fraction * remove_params, min_layers)
    layer_cost = costs.removal_cost(removed, 0)
    budget = min(hidden_fraction * remove_params, remove_params - layer_cost)
    channels = channels_within(costs.hidden, costs.channel_cost(removed), budget, min_hidden, multiple)
    cost = costs.removal_cost(removed, channels)
    return ShapeCandidate(layer_fraction, hidden_fraction, removed, channels, cost)


def grid_candidates(
    costs: ShapeCosts,
    layer_scores: Tensor | None,
    remove_params: int,
    layer_grid: Sequence[float],
    hidden_grid: Sequence[float],
    floors: tuple[int, int, int] = (1, 1, 1),
) -> list[ShapeCandidate]:
    """Every distinct candidate of the grid layer_grid × hidden_grid, in grid order (the first pair
    giving a shape names it). ``layer_scores`` None: no layer scores (use a grid of (0,) for layers)."""
    if remove_params < 0:
        raise ValueError(f"remove_params must be >= 0, got {remove_params:,}")
    scores = layer_scores if layer_scores is not None else torch.zeros(costs.layers, dtype=torch.float64)
    out: dict[tuple, ShapeCandidate] = {}
    for f_layers in layer_grid:
        for f_hidden in hidden_grid:
            c = candidate(costs, scores, remove_params, (f_layers, f_hidden), floors)
            out.setdefault(c.key, c)
    return list(out.values())


def width_adjusted_cost(params_per_unit: int, channel_share: int, old_width: int, new_width: int) -> int:
    """A unit's parameters once the stream is ``new_width`` wide: it owns ``channel_share`` entries
    per channel (a neuron: gate row, up row, down column = 3), the rest (biases) does not scale."""
    return params_per_unit - channel_share * (old_width - new_width)
