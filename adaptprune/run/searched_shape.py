"""``prune.target_shape: search`` in a training run: the shape chosen before stage 1, and the walk to it.

Every candidate is probed on training-split text (``pruning.shape.choice``); the choice is written to
``shape_choice.json`` so ``--resume`` walks to the same shape without probing again. Every rank probes
the same text (no rank waits on a long collective) and rank 0's choice is kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from accelerate import Accelerator

from ..pruning.shape.choice import SHAPE_CHOICE, ShapeChoice, choose_shape
from ..pruning.shape.target import ModelShape, plan_walk
from .preflight import Prepared
from .run_data import RunData
from .rundir import RunDir
from .schedule import stage_targets


def search_or_restore(
    prep: Prepared, prune, run_dir: RunDir, corpus: RunData, acc: Accelerator, resume: bool, log: Callable[[str], None]
) -> ShapeChoice:
    """The saved choice on --resume, else every candidate probed now."""
    saved = run_dir.read_json(SHAPE_CHOICE) if resume else None
    if saved is not None:
        return ShapeChoice.from_dict(saved)
    draw = corpus.calibration_source(0, {}).next  # training-split chunks, never the held-out text
    choice = choose_shape(prep.dense, prep.candidates, draw, prune, acc.is_main_process)
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        choice = broadcast_object_list([choice], from_process=0)[0]
    log(f"target shape search: {choice.describe()}")
    return choice


def walk_to_searched(prep: Prepared, prune, searched: ModelShape) -> Prepared:
    """``prep`` with the walk to the shape a search chose; its size decides the stage targets."""
    walk = plan_walk(prep.dense, prune, prep.adapter, searched=searched)
    targets = stage_targets(prep.original, walk.final, max(1, round(prune.step_fraction * prep.original)))
    return dataclasses.replace(prep, walk=walk, target=walk.final, targets=targets)
