"""The baselines as methods: LLM-Pruner, FLAP and SliceGPT one-shot, as published (LLM-Pruner + LoRA),
and each followed by the same training adaptprune's incremental run gets (``<name>+full``).

A baseline is a function ``(model, calibration (N, L), target) -> records | new model``; the
table at the bottom registers its rows. ``BaselinePruner`` turns it into a controller stage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..allocation.records import KeptRecord
from ..run.stage_pruner import CalibrationSource
from .base import Method, MethodContext, register_method
from .training import run_controller

PruneFn = Callable[[nn.Module, torch.Tensor, int], "list[KeptRecord] | nn.Module"]


def llm_pruner(model: nn.Module, calibration: torch.Tensor, target: int):
    """Block-wise LLM-Pruner (element-wise first-order Taylor) on 10 × 64 tokens at random offsets."""
    from ..baselines.llm_pruner import llm_pruner_calibration, llm_pruner_prune

    return llm_pruner_prune(model, llm_pruner_calibration(calibration.flatten()), target, progress=False)


def flap(model: nn.Module, calibration: torch.Tensor, target: int):
    """FLAP: WIFV scores, AL-AM global structure, bias compensation."""
    from ..baselines.flap import flap_prune

    return flap_prune(model, calibration, target, progress=False)


def slicegpt(model: nn.Module, calibration: torch.Tensor, target: int):
    """SliceGPT at the slicing ratio whose parameter count is nearest the target (head sliced too:
    at equal parameters that is its better setting on tied models; a new model is returned)."""
    from ..baselines.slicegpt import slice_to_params

    return slice_to_params(model, calibration, target, slice_head=True, progress=False)


class BaselinePruner:
    """A baseline's prune function as a controller stage (stateless)."""

    on_host = False  # a baseline runs its own way: on the accelerator

    def __init__(self, prune: PruneFn) -> None:
        self.prune = prune

    def __call__(self, model: nn.Module, calibration: CalibrationSource, target: int, label: str):
        result = self.prune(model, calibration.next(), target)
        return (result, []) if isinstance(result, nn.Module) else (model, list(result))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def one_shot_method(name: str, prune: PruneFn, description: str) -> type[Method]:
    class OneShot(Method):
        def __call__(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
            with ctx.profile.phase("prune"):
                result = prune(model, ctx.calibration, ctx.target)
            return result if isinstance(result, nn.Module) else model

    OneShot.name, OneShot.description = name, description
    return register_method(OneShot)


def trained_method(name: str, prune: PruneFn, description: str, train_for=None) -> type[Method]:
    """``prune`` once, then train under the controller (``train_for(run.train)`` or run.train itself)."""

    class Trained(Method):
        trains = True

        def __call__(self, model: nn.Module, ctx: MethodContext) -> nn.Module:
            train = train_for(ctx.run.train) if train_for else None
            return run_controller(model, ctx, BaselinePruner(prune), one_stage=True, train=train)

    Trained.name, Trained.description = name, description
    return register_method(Trained)


def published_lora(train):
    """The published LoRA recipe, but with the run's batches: at CPU budgets the published 64-sequence
    batches would leave one or two optimizer steps, and every method must see the same batches."""
    import dataclasses

    from ..baselines.llm_pruner import llm_pruner_lora_config

    recipe = llm_pruner_lora_config(train)
    return dataclasses.replace(recipe, batch_size=train.batch_size, grad_accum_steps=train.grad_accum_steps)


# Each baseline's one-shot by method name: compare's rows below, and scripts/bench_budget.py's schedules.
PRUNERS: dict[str, PruneFn] = {"llm_pruner": llm_pruner, "flap": flap, "slicegpt": slicegpt}
for _name, _fn in PRUNERS.items():
    one_shot_method(_name, _fn, f"{_name} one-shot, no training")
    trained_method(f"{_name}+full", _fn, f"{_name}, then the incremental run's training on the same tokens")
trained_method(
    "llm_pruner_lora",
    llm_pruner,
    "LLM-Pruner with its published LoRA recovery (r=8, alpha 16, lr 1e-4) on the same tokens and batches",
    train_for=published_lora,
)
