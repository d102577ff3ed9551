"""Recovery training between pruning steps: full, LoRA and distillation phases on accelerate.

``get_trainer(name)`` turns a config string into a class; see ``trainers.base`` for the
lifecycle the controller drives (before_surgery -> apply_plan -> after_surgery -> run_phase).
"""

from __future__ import annotations

from .base import (
    BatchesExhaustedError,
    NonFiniteLossError,
    PhaseResult,
    Trainer,
    TrainerConfig,
)
from .checkpointing import load_optimizer_state, save_optimizer_state
from .distill import DistillTrainer
from .full import FullTrainer
from .lora import LoraTrainer
from .optim_state import OPTIMIZER_STATE_MODES, carry_optimizer_state, state_by_name

TRAINERS: dict[str, type[Trainer]] = {cls.name: cls for cls in (FullTrainer, LoraTrainer, DistillTrainer)}


def get_trainer(name: str) -> type[Trainer]:
    """The trainer class registered under ``name`` ('full', 'lora', 'distill')."""
    try:
        return TRAINERS[name]
    except KeyError:
        raise ValueError(f"unknown trainer '{name}'; choose one of {sorted(TRAINERS)}") from None


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
    "TrainerConfig",
    "carry_optimizer_state",
    "get_trainer",
    "load_optimizer_state",
    "save_optimizer_state",
    "state_by_name",
]
