"""How one controller stage removes parameters: the ``StagePruner`` interface and adaptprune's own.

The controller hands a pruner the plain model, a source of fresh calibration text and the
stage's parameter target; the pruner returns the (possibly new) model and what it kept. Anything
a pruner must remember across stages (e.g. accumulated per-layer sparsity) goes through
``state_dict``/``load_state_dict`` into every stage checkpoint, so ``--resume`` is exact.
Baselines become stage pruners too (``adaptprune.methods``), so they train under the same loop.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..allocation import allocator_from_json
from ..arch import ArchAdapter
from ..config import PruneConfig
from ..pruning.shape.reach import reach_shape
from ..pruning.shape.target import ShapeWalk
from ..pruning.staging import prunes_on_host
from ..pruning.step import Record, build_allocator, prune_step


class CalibrationSource(Protocol):
    """Fresh calibration sequences on every call (identical on every rank)."""

    def next(self) -> torch.Tensor:
        """(N, L) token ids not handed out before in this run."""

    def state(self) -> dict:
        """JSON-serialisable position, restored by the data module on resume."""


class StagePruner(Protocol):
    # Whether the stage needs only decoder layers' forwards on the accelerator, so that under FSDP the model is
    # gathered in host memory and its layers run on the GPU one at a time (``pruning.staging``).
    on_host: bool

    def __call__(
        self, model: nn.Module, calibration: CalibrationSource, target: int, label: str
    ) -> tuple[nn.Module, list[Record]]:
        """Shrink ``model`` to at most ``target`` parameters; return it and the surgery records in the
        order applied (``KeptRecord``; ``DepthRecord``/``HiddenRecord`` when layers or channels went)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class AdaptprunePruner:
    """adaptprune's step: calibrate -> score (``prune.metric``) -> allocate -> remove with compensation.

    One allocator lives for the whole run, so a stateful one (``accumulating`` with
    ``prune.sparsity_scope: run``) carries its per-layer sparsity from stage to stage; every inner
    step of a stage calibrates on fresh text (``calibration.next``). With hidden or layers in
    ``prune.dims`` every stage first chooses its (layers, hidden) share (``shape.search``). With a
    target shape (``walk``) every stage instead cuts to its point on the walk (``shape.reach``).
    """

    def __init__(
        self, cfg: PruneConfig, adapter: ArchAdapter, progress: bool = True, walk: ShapeWalk | None = None
    ) -> None:
        self.cfg, self.adapter, self.progress, self.walk = cfg, adapter, progress, walk
        self.allocator = build_allocator(cfg)
        self.on_host = prunes_on_host(cfg)

    def __call__(
        self, model: nn.Module, calibration: CalibrationSource, target: int, label: str
    ) -> tuple[nn.Module, list[Record]]:
        if self.walk is not None:  # prune.target_shape: this stage's point on the walk decides the sizes
            shape = self.walk.at(target)
            report = reach_shape(model, calibration.next, shape, self.cfg, self.adapter, self.progress, label)
            return model, report.records
        report = prune_step(
            model, calibration.next, target, self.cfg, self.adapter, self.progress, label, allocator=self.allocator
        )
        return model, report.records

    def state_dict(self) -> dict:
        return self.allocator.to_json()

    def load_state_dict(self, state: dict) -> None:
        self.allocator = allocator_from_json(state) if state else build_allocator(self.cfg)


def default_pruner(
    cfg: PruneConfig, adapter: ArchAdapter, progress: bool = True, walk: ShapeWalk | None = None
) -> StagePruner:
    return AdaptprunePruner(cfg, adapter, progress, walk)
