"""adaptprune's own methods: one-shot, incremental, and one-shot followed by the incremental run's training."""

from __future__ import annotations

import dataclasses

from torch import nn

from ..pruning.shape.reach import prune_once
from ..pruning.shape.target import plan_walk
from .base import Method, MethodContext, register_method
from .training import run_controller


@register_method
class Dense(Method):
    name = "dense"
    description = "the unpruned model"

    def __call__(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        return model


@register_method
class AdaptpruneOneShot(Method):
    name = "adaptprune_oneshot"
    description = "one pruning step with adaptprune's defaults (run.prune), no training"

    def __call__(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        walk = plan_walk(model, ctx.run.prune)  # a target shape decides the size: pick one within ±0.5%
        with ctx.profile.phase("prune"):
            prune_once(model, ctx.calibration, ctx.target, ctx.run.prune, walk, progress=False)
        return model


class ControllerRun(Method):
    """adaptprune's own pruning under the controller: ``one_stage`` prunes once, then trains every token."""

    trains = True
    one_stage = False

    def __call__(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        return run_controller(model, ctx, one_stage=self.one_stage)


@register_method
class AdaptpruneIncremental(ControllerRun):
    name = "adaptprune_incremental"
    description = "~5% pruning steps interleaved with training (run.schedule, run.train)"


@register_method
class AdaptpruneOneShotFull(ControllerRun):
    name = "adaptprune_oneshot+full"
    description = "adaptprune one-shot, then the incremental run's training on the same tokens"
    one_stage = True


@register_method
class AdaptPrunerPublished(Method):
    name = "adapt_pruner"
    trains = True
    description = (
        "Adapt-Pruner as published (research4pan/AdaptPruner): Taylor param_first on 512 x 64 tokens per inner "
        "step, per-layer sparsity accumulated in 2% inner steps with A = 0.02, KV heads and neurons at the same "
        "ratio, no compensation; incremental with the same tokens and trainer"
    )

    def __call__(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
        prune = dataclasses.replace(
            ctx.run.prune,
            metric="taylor_param_first",
            allocation="accumulating",
            amplitude=0.02,
            inner_step_fraction=0.02,
            sparsity_scope="stage",
            same_ratio=True,
            compensation="none",
        )
        taylor_tokens = prune.taylor_samples * prune.taylor_seq_len
        data = dataclasses.replace(ctx.run.data, calib_tokens=max(ctx.run.data.calib_tokens, taylor_tokens))
        return run_controller(model, ctx, one_stage=False, prune=prune, data=data)
