"""Calibration text: seeded random windows of a token stream, and what each (inner) pruning step reads.

A step's calibration is a tensor (reused by every inner step), a sequence of tensors (one per inner
step) or a callable returning fresh sequences on every call (``fresh_windows``, or a controller's
calibration source's ``next``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Calibration = Tensor | Sequence[Tensor] | Callable[[], Tensor]


def random_windows(stream: Tensor, num: int, seq_len: int, seed: int) -> Tensor:
    """``num`` non-overlapping windows of ``seq_len`` tokens at seeded random offsets of a 1-D stream.

    Upstream samplers (LLM-Pruner's and Adapt-Pruner's ``get_examples``) draw distinct random
    documents and a random window in each; a packed stream has no documents, so the gaps between
    windows are random instead: the n − num·seq_len free tokens are cut at ``num`` sorted uniform
    points. (num, seq_len) in stream order, reproducible from ``seed``.
    """
    free = stream.numel() - num * seq_len
    if num < 1 or seq_len < 1 or free < 0:
        raise ValueError(f"cannot cut {num} windows of {seq_len} tokens from a stream of {stream.numel():,} tokens")
    generator = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randint(0, free + 1, (num,), generator=generator)).values
    starts = cuts + torch.arange(num) * seq_len  # (num,)
    return stream[starts[:, None] + torch.arange(seq_len)[None, :]]


def fresh_windows(stream: Tensor, num: int, seq_len: int, seed: int) -> Callable[[], Tensor]:
    """A calibration source for ``prune_step``: call j draws ``random_windows`` with seed ``seed + j``."""
    calls = itertools.count()
    return lambda: random_windows(stream, num, seq_len, seed + next(calls))


def next_sequences(calibration: Calibration, step: int) -> Tensor:
    """Inner step ``step``'s text: a tensor is reused, a sequence indexed, a callable called (fresh)."""
    if isinstance(calibration, Tensor):
        return calibration
    if callable(calibration):
        return calibration()
    if step >= len(calibration):
        raise ValueError(f"inner step {step + 1} needs calibration text; only {len(calibration)} batches were given")
    return calibration[step]


def taylor_rows(sequences: Tensor, samples: int, seq_len: int) -> Tensor:
    """(samples, seq_len) Taylor sequences: each calibration row cut into whole windows, the first kept."""
    rows = sequences[:, : (sequences.shape[1] // seq_len) * seq_len].reshape(-1, seq_len)
    if rows.shape[0] < samples:
        raise ValueError(
            f"the Taylor pass needs {samples} x {seq_len} = {samples * seq_len:,} calibration tokens per pruning step "
            f"(prune.taylor_samples x prune.taylor_seq_len); the calibration text holds {rows.shape[0]} windows of "
            f"{seq_len} in {tuple(sequences.shape)}: raise data.calib_tokens or lower prune.taylor_samples"
        )
    return rows[:samples]


def indexed_by_step(calibration: Calibration) -> bool:
    """Whether inner step j reads ``calibration[j]``: then a skipped step's text is not the next step's, as it
    is when one tensor serves every step or a callable draws the next text whenever a step asks."""
    return not isinstance(calibration, Tensor) and not callable(calibration)
