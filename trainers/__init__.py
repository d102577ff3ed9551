"""Recovery training between pruning steps: full, LoRA and distillation phases on accelerate.

``get_trainer(name)`` turns ``train.trainer`` into a class; see ``trainers.base`` for the lifecycle
the controller drives (before_surgery -> surgery -> after_surgery -> run_phase). A new trainer is
one module in this package whose class is decorated with ``@register_trainer``: every module
here is imported below, so nothing else needs editing.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from .base import TRAINERS, BatchesExhaustedError, NonFiniteLossError, PhaseResult, Trainer, register_trainer
from .checkpointing import load_optimizer_state, save_optimizer_state
from .optim_state import OPTIMIZER_STATE_MODES, carry_optimizer_state, state_by_name

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .distill import DistillTrainer  # noqa: E402
from .full import FullTrainer  # noqa: E402
from .lora import LoraTrainer  # noqa: E402


def get_trainer(name: str) -> type[Trainer]:
    """The trainer class registered under ``name``."""
    if name not in TRAINERS:
        near = difflib.get_close_matches(name, TRAINERS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ValueError(f"unknown trainer '{name}'{hint}; choose one of {', '.join(TRAINERS)}")
    return TRAINERS[name]


__all__ = [
    "OPTIMIZER_STATE_MODES",
    "TRAINERS",
    "BatchesExhaustedError",
    "DistillTrainer",
    "FullTrainer",
    "LoraTrainer",
    "NonFiniteLossError",
    "PhaseResult",
    "Trainer",
    "carry_optimizer_state",
    "get_trainer",
    "load_optimizer_state",
    "register_trainer",
    "save_optimizer_state",
    "state_by_name",
]
