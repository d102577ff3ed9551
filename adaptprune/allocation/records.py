"""Shared records of pruning: a ``Plan`` (what to keep) and ``KeptRecord`` (what surgery kept),
plus ``HiddenRecord`` (residual channels kept) and ``DepthRecord`` (decoder layers kept).

Dependency-free (torch only), so allocation, surgery, trainers and baselines can all speak
about plans and kept units without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# {layer_idx: {"mlp": kept neuron ids, "attention": kept group ids}}; ids are current ones.
Plan = Mapping[int, Mapping[str, Sequence[int]]]


@dataclass(frozen=True)
class SliceRecord:
    """One rebuilt matrix: the kept positions along ``dim`` (used to slice optimizer state)."""

    path: str  # relative to the decoder layer, e.g. "mlp.down_proj"
    dim: int
    positions: torch.Tensor


@dataclass(frozen=True)
class KeptRecord:
    """What one removal kept: unit ids (before renumbering) out of ``before`` units."""

    layer: int
    kind: str
    kept: tuple[int, ...]
    before: int
    slices: tuple[SliceRecord, ...] = ()

    @property
    def removed(self) -> int:
        return self.before - len(self.kept)


@dataclass(frozen=True)
class HiddenRecord:
    """What hidden-size surgery kept: residual channels ``kept`` (old ids, ascending) of ``before``.

    ``cuts`` names every parameter that was sliced, from the model root as ``named_parameters``
    spells it, with the dim the channels lie on; all of them kept the positions ``kept``. A tied
    LM head shares the embedding's parameter and is listed once, under the embedding's name.
    """

    kept: tuple[int, ...]
    before: int
    cuts: tuple[tuple[str, int], ...]  # (parameter name, dim)

    @property
    def removed(self) -> int:
        return self.before - len(self.kept)

    @property
    def positions(self) -> torch.Tensor:
        return torch.tensor(self.kept, dtype=torch.long)


@dataclass(frozen=True)
class DepthRecord:
    """What layer removal kept: decoder layers ``kept`` (old indices, ascending) of ``before``.

    Layers live under ``prefix`` (e.g. ``"model.layers"``); the parameters of kept layer
    ``kept[j]`` are renamed from ``prefix.{kept[j]}.*`` to ``prefix.{j}.*`` and those of removed
    layers are gone. Parameters outside the stack keep their names.
    """

    prefix: str
    kept: tuple[int, ...]
    before: int

    @property
    def removed(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.before) if i not in set(self.kept))

    def rename(self, name: str) -> str | None:
        """``name`` after the removal: re-indexed inside the stack, None when its layer is gone."""
        head = f"{self.prefix}."
        if not name.startswith(head):
            return name
        index, _, rest = name[len(head) :].partition(".")
        new_index = {old: new for new, old in enumerate(self.kept)}.get(int(index))
        return None if new_index is None else f"{head}{new_index}.{rest}"
