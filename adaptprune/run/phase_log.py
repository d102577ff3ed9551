"""What one training phase reports: a labelled progress bar, TensorBoard scalars and a persistent log line.

Every ``output.log_every`` optimizer steps one dense line (nanoGPT style) is printed and appended
to ``train.log`` in the run folder, so a run's progress survives the terminal::

    stage 3 | step 120/400 | loss 3.214 | lr 4.50e-05 | grad 0.812 | 181 tok/s | ETA 14m05s
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from accelerate import Accelerator
from tqdm.auto import tqdm

from .rundir import RunDir


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class PhaseLog:
    """The ``on_step`` callback of ``Trainer.run_phase`` for one phase of ``steps`` optimizer steps."""

    def __init__(self, acc: Accelerator, run_dir: RunDir, label: str, steps: int, total_steps: int, every: int) -> None:
        self.acc, self.run_dir, self.label = acc, run_dir, label
        self.steps, self.total_steps, self.every = steps, total_steps, every
        self.bar = tqdm(total=steps, desc=label, disable=not acc.is_main_process, leave=False)
        self.first_loss = math.nan
        self.done = 0
        self.started = time.perf_counter()
        self.on_halfway: Callable[[], None] | None = None

    def on_step(self, m: dict) -> None:
        """m = {step, loss, lr, grad_norm, tokens_per_s} (see ``Trainer.run_phase``)."""
        self.done += 1
        if self.done == 1:
            self.first_loss = m["loss"]
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.1e}", tok_s=f"{m['tokens_per_s']:.0f}")
        scalars = {"train/loss": m["loss"], "train/lr": m["lr"], "train/tokens_per_s": m["tokens_per_s"]}
        self.acc.log({**scalars, "train/grad_norm": m["grad_norm"]}, step=m["step"])
        if self.done % self.every == 0 or self.done == self.steps:
            self._write_line(m)
        if self.done == max(1, self.steps // 2) and self.on_halfway is not None:
            self.on_halfway()

    def _write_line(self, m: dict) -> None:
        per_step = (time.perf_counter() - self.started) / self.done
        eta = per_step * (self.total_steps - m["step"])
        line = (
            f"{self.label} | step {m['step']}/{self.total_steps} | loss {m['loss']:.3f} | lr {m['lr']:.2e} | "
            f"grad {m['grad_norm']:.3f} | {m['tokens_per_s']:.0f} tok/s | ETA {format_eta(eta)}"
        )
        if self.acc.is_main_process:
            tqdm.write(line)
        self.run_dir.append_log(line)

    def close(self) -> None:
        self.bar.close()
