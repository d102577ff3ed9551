"""Shared records of pruning: a ``Plan`` (what to keep) and ``KeptRecord`` (what surgery kept).

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
