"""What a run does when the training loss goes non-finite (``train.on_nonfinite``).

``rollback``: reload the last complete stage (weights, optimizer, data position) at half the learning
rate, at most ``MAX_ROLLBACKS`` times; ``stop``: end with one line naming the checkpoint to resume from
(``TrainingStoppedError``, exit status 3).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..config import RunConfig
from .rundir import RunDir, RunState

MAX_ROLLBACKS = 3


class TrainingStoppedError(RuntimeError):
    """Training hit a non-finite loss and was told (or ran out of rollbacks) to stop; one line."""


def roll_back(
    err: Exception, cfg: RunConfig, run_dir: RunDir, state: RunState, rollbacks: int, log: Callable[[str], None]
) -> tuple[RunState, nn.Module]:
    """The last complete stage's state (at half ``state``'s learning rate) and model, or ``TrainingStoppedError``."""
    last = run_dir.last_stage()
    if cfg.train.on_nonfinite == "stop" or rollbacks >= MAX_ROLLBACKS:
        why = "train.on_nonfinite=stop" if cfg.train.on_nonfinite == "stop" else f"{MAX_ROLLBACKS} rollbacks"
        raise TrainingStoppedError(
            f"training stopped ({why}): {err}; the last complete checkpoint is {last} "
            f"(rerun with --resume, e.g. with a lower train.lr)"
        ) from None
    log(f"{err}; rolling back to {last.name} at half the learning rate")
    restored, model = run_dir.load_stage(last, cfg.model.dtype)
    restored.lr_scale = state.lr_scale * 0.5
    return restored, model
