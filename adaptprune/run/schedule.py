"""The incremental schedule as pure functions (Adapt-Accel, arXiv 2502.03460).

- ``stage_targets``: parameter count after each pruning stage, equal steps of about
  ``step_params`` from the start size down to the target.
- ``split_budget``: the training budget (in optimizer steps, so nothing is lost to rounding)
  split over stages, either equally or Adapt-Accel's 2i/(N(N+1)) so later, smaller models
  train longest; a share is kept for final recovery.
- ``lr_at``: one warmup–constant–decay learning-rate schedule spanning every stage.
"""

from __future__ import annotations

import math


def num_stages(start_params: int, target_params: int, step_params: int) -> int:
    """Stages needed to go from start to target removing at most ~step_params each."""
    if target_params > start_params:
        raise ValueError(f"target {target_params:,} is larger than the model ({start_params:,} parameters)")
    if step_params <= 0:
        raise ValueError(f"step size must be positive, got {step_params}")
    return max(1, math.ceil((start_params - target_params) / step_params - 1e-9)) if target_params < start_params else 0


def stage_targets(start_params: int, target_params: int, step_params: int) -> list[int]:
    """Parameter count to reach after each stage; the last equals ``target_params``."""
    n = num_stages(start_params, target_params, step_params)
    gap = start_params - target_params
    return [start_params - round(gap * (i + 1) / n) for i in range(n)]


def tokens_per_step(cfg, processes: int) -> int:
    """Tokens of one optimizer step over all processes: micro-batch x accumulation x sequence x processes."""
    return cfg.train.batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len * processes


def split_budget(
    total_tokens: int, stages: int, split: str = "adapt_accel", recovery_fraction: float = 0.0
) -> tuple[list[int], int]:
    """(budget of each pruning stage, budget of the final recovery phase); integer units
    (tokens or steps) that add up exactly to ``total_tokens``."""
    if stages < 0 or total_tokens < 0:
        raise ValueError("stages and total_tokens must be non-negative")
    recovery = round(total_tokens * recovery_fraction) if stages else total_tokens
    budget = total_tokens - recovery
    if stages == 0:
        return [], recovery
    if split == "uniform":
        weights = [1.0] * stages
    elif split == "adapt_accel":
        weights = [2 * (i + 1) / (stages * (stages + 1)) for i in range(stages)]
    else:
        raise ValueError(f"split must be 'uniform' or 'adapt_accel', got '{split}'")
    total_w = sum(weights)
    per_stage = [math.floor(budget * w / total_w) for w in weights]
    per_stage[-1] += budget - sum(per_stage)  # rounding remainder goes to the last stage
    return per_stage, recovery


def lr_at(
    step: int,
    total_steps: int,
    peak: float,
    warmup_fraction: float = 0.05,
    decay_fraction: float = 0.1,
    min_ratio: float = 0.1,
) -> float:
    """Warmup–constant–decay: linear warmup, flat peak, linear decay to ``min_ratio * peak``."""
    if total_steps <= 0:
        return peak
    warmup = math.floor(total_steps * warmup_fraction)
    decay = math.floor(total_steps * decay_fraction)
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_start = total_steps - decay
    if step < decay_start or decay == 0:
        return peak
    progress = min(1.0, (step - decay_start + 1) / decay)
    return peak * (1.0 - (1.0 - min_ratio) * progress)


def lr_schedule(cfg, total_steps: int, scale: float = 1.0):
    """``step -> lr`` of a run (``cfg``: its RunConfig), times ``scale`` (halved by each rollback)."""
    s, t = cfg.schedule, cfg.train

    def lr(step: int) -> float:
        return scale * lr_at(step, total_steps, t.lr, s.warmup_fraction, s.decay_fraction, t.min_lr_ratio)

    return lr
