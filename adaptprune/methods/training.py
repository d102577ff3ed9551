"""Methods that train run through the same ``Controller`` as adaptprune's incremental run.

So every method that trains gets the same trainer, objective, learning-rate curve, data order and
number of tokens (``schedule.train_tokens``); only how each stage prunes differs. A one-shot method
is a single stage (``prune.step_fraction = 1``): prune once, then train on every token.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..checkpoint import load_model
from ..config import DataConfig, PruneConfig, TrainConfig
from ..run.stage_pruner import StagePruner
from .base import MethodContext


def run_controller(
    model: nn.Module | None,
    ctx: MethodContext,
    pruner: StagePruner | None = None,
    *,
    one_stage: bool,
    prune: PruneConfig | None = None,
    train: TrainConfig | None = None,
    data: DataConfig | None = None,
) -> nn.Module:
    """Prune ``model`` to ``ctx.target`` and train it under the controller; the final model.

    A run folder left by an interrupted comparison is resumed (``ctx.out``).
    """
    from ..run.controller import Controller  # the controller imports the methods' pruners' modules

    run = ctx.run
    prune = dataclasses.replace(prune or run.prune, target_params=str(ctx.target))
    if one_stage:
        prune = dataclasses.replace(prune, step_fraction=1.0)
    cfg = dataclasses.replace(
        run,
        prune=prune,
        train=train or run.train,
        data=data or run.data,
        eval=dataclasses.replace(run.eval, every_stage=False, tasks=[]),
        output=dataclasses.replace(run.output, dir=str(ctx.out), tensorboard=False),
    )
    resume = (ctx.out / "checkpoints").exists()
    with ctx.profile.phase("prune+train"):
        results = Controller(cfg, pruner=pruner, dense=None if resume else model).run(resume=resume)
    ctx.train_tokens = results["history"][-1]["train_tokens"]
    return load_model(str(ctx.out / "final"))
