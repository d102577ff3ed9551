"""Shared helpers for the trainer tests: a learnable toy corpus and a CPU accelerator."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from accelerate import Accelerator

from adaptprune.arch import ATTENTION, MLP, get_adapter
from adaptprune.config import TrainConfig, from_dict


def toy_batches(
    seed: int = 0, batch: int = 4, length: int = 16, period: int = 8, vocab: int = 128
) -> Iterator[torch.Tensor]:
    """Endless (B, L) batches of one fixed token cycle at random phases: after a token or two
    the next one is determined, so a tiny model's loss falls fast."""
    pattern = torch.randperm(vocab, generator=torch.Generator().manual_seed(1234))[:period]
    gen = torch.Generator().manual_seed(seed)
    positions = torch.arange(length)
    while True:
        offsets = torch.randint(0, period, (batch, 1), generator=gen)
        yield pattern[(offsets + positions) % period]  # (B, L)


def train_cfg(**values) -> TrainConfig:
    """A validated ``TrainConfig`` from keyword values (nested sections as dicts, e.g. lora={"r": 4})."""
    return from_dict(TrainConfig, values, "train.")


def cpu_accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def constant_lr(lr: float):
    return lambda step: lr


def half_plan(model) -> dict:
    """Keep every other MLP neuron in layers 0 and 2, and drop the last KV group of layer 1."""
    adapter = get_adapter(model)
    neurons = adapter.count_units(model, 0, MLP)
    groups = adapter.count_units(model, 1, ATTENTION)
    return {
        0: {MLP: list(range(0, neurons, 2))},
        1: {ATTENTION: list(range(groups - 1)), MLP: list(range(neurons - 5))},
        2: {MLP: list(range(1, neurons, 2))},
    }
