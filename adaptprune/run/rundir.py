"""The run folder: its lock, stage checkpoints (atomic), restore, partial-stage cleanup, final export.

Layout of ``output.dir``::

    checkpoints/stage-NNN/   model/, optimizer.safetensors, rng.safetensors, state.json (the newest only)
    final/                   the pruned model, its config.yaml and model card
    results.json  plan.json  summary.md  config.yaml  train.log  tb/

Every stage folder is written under a temporary name and renamed into place when complete, so a
crash at any moment leaves the last complete stage loadable. One process at a time may write a
run folder: a file lock (released by the OS if the holder dies) refuses a second writer.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import atomic_dir, load_model, save_checkpoint
from ..config import ConfigError, RunConfig, dump_yaml
from .report import write_model_card, write_summary_table

LOCK_NAME = ".adaptprune.lock"
PID_NAME = ".adaptprune.pid"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, I/O error); one line naming folder and size."""


@dataclass
class RunState:
    """What a stage checkpoint restores besides the weights and the optimizer."""

    stage: int = 0  # stages completed (0 = dense model, before any pruning)
    global_step: int = 0
    tokens: int = 0
    lr_scale: float = 1.0  # lowered after a non-finite loss rollback
    data: dict = field(default_factory=dict)  # the training stream's position (resume continues there)
    calibration: dict = field(default_factory=dict)  # the calibration stream's position
    allocation: dict = field(default_factory=dict)  # a stateful allocator's state (e.g. accumulated sparsity)
    kept_ids: dict = field(default_factory=dict)  # {layer: {kind: original unit ids kept}}
    history: list = field(default_factory=list)  # one row per stage for the summary table

    @classmethod
    def from_json(cls, data: dict) -> RunState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def human_bytes(count: float) -> str:
    """'12.3 MiB' below a GiB, '4.5 GiB' above (small models must not read '0.0 GiB')."""
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (where a new folder would be created)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class RunDir:
    """One run's output folder. Only the main process writes; every method is safe to call on all ranks."""

    def __init__(self, path: str | os.PathLike, is_main: bool = True) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.is_main = is_main
        self._lock: FileLock | None = None

    # ---- before any work: checks that write nothing ----------------------------------------
    def check(self, resume: bool) -> None:
        """Refuse a folder that is a file, holds another run (without ``resume``) or is not writable."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"output.dir={self.path} is a file; it must be a folder (new or empty)")
        if self.path.is_dir() and not resume and self.last_stage() is not None:
            raise ConfigError(f"output.dir={self.path} already holds a run; pass --resume or choose another folder")
        base = existing_ancestor(self.path)
        if not base.is_dir():
            raise ConfigError(f"output.dir={self.path} is not writable: {base} is a file, not a folder")
        if not os.access(base, os.W_OK | os.X_OK):
            raise ConfigError(f"output.dir={self.path} is not writable: no write permission on {base}")

    def check_disk(self, need_bytes: int) -> None:
        """Fail before any work when the disk cannot hold a stage checkpoint."""
        free = shutil.disk_usage(existing_ancestor(self.path)).free
        if free < need_bytes:
            raise ConfigError(
                f"output.dir={self.path} has {human_bytes(free)} free; a stage checkpoint needs about "
                f"{human_bytes(need_bytes)} (model, optimizer state and a temporary copy)"
            )

    # ---- taking the folder ---------------------------------------------------------------
    def open(self) -> None:
        """Create the folder, lock it, prove a write works, and drop half-written stage folders."""
        if not self.is_main:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._acquire_lock()
            probe = self.path / ".write-probe"
            probe.write_bytes(b"0" * 1024)
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"output.dir={self.path} is not writable: {err.strerror or err}") from None
        self._remove_partial_stages()

    def _acquire_lock(self) -> None:
        lock = FileLock(str(self.path / LOCK_NAME))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            pid = (self.path / PID_NAME).read_text().strip() if (self.path / PID_NAME).exists() else "unknown"
            raise ConfigError(
                f"output.dir={self.path} is in use by another adaptprune process (pid {pid}); "
                f"wait for it to finish or stop it before --resume"
            ) from None
        (self.path / PID_NAME).write_text(str(os.getpid()))
        self._lock = lock

    def close(self) -> None:
        """Release the lock (also released by the OS when the process dies)."""
        if self._lock is not None:
            (self.path / PID_NAME).unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def _remove_partial_stages(self) -> None:
        """Drop what a SIGKILL while saving leaves: ``.stage-XXX.tmp-*`` folders (never loaded: only
        complete ``stage-XXX`` folders are) and ``.old-*`` copies already replaced."""
        for path in self.checkpoints.glob(".stage-*"):
            name, _, kind = path.name[1:].partition(".")
            if kind.startswith("tmp-") or (kind.startswith("old-") and (self.checkpoints / name).exists()):
                print(f"[adaptprune] removing the half-written checkpoint folder {path.name}", flush=True)
                shutil.rmtree(path, ignore_errors=True)

    # ---- stage checkpoints ---------------------------------------------------------------
    def stage_dir(self, stage: int) -> Path:
        return self.checkpoints / f"stage-{stage:03d}"

    def last_stage(self) -> Path | None:
        done = sorted(p for p in self.checkpoints.glob("stage-*") if (p / "state.json").exists())
        return done[-1] if done else None

    def save_stage(self, state: RunState, model, tokenizer, write_optimizer, on_written=None) -> None:
        """Weights, optimizer, RNG and state in one folder renamed into place at the end.

        ``write_optimizer(path)`` writes the optimizer file; ``on_written()`` runs after the model is
        on disk (the crash-safety tests kill the process there).
        """
        if not self.is_main:
            return
        target = self.stage_dir(state.stage)
        try:
            with atomic_dir(target) as tmp:
                save_checkpoint(model, tmp / "model", tokenizer)
                if on_written is not None:
                    on_written()
                write_optimizer(tmp / "optimizer.safetensors")
                save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
                (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1))
        except (OSError, SafetensorError) as err:
            raise self._write_error(target, model, err) from None
        for path in self.checkpoints.glob("stage-*"):  # only the newest complete stage is needed to resume
            if path.name != target.name:
                shutil.rmtree(path, ignore_errors=True)

    def _write_error(self, target: Path, model, err: Exception) -> CheckpointWriteError:
        need = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
        free = shutil.disk_usage(existing_ancestor(self.path)).free
        last = self.last_stage()
        kept = f"the last complete stage, {last.name}, is intact" if last else "no stage was complete yet"
        return CheckpointWriteError(
            f"could not write {target} ({err}); it needs about {human_bytes(need)} and "
            f"{human_bytes(free)} is free; {kept}: free space and rerun with --resume"
        )

    def load_stage(self, stage_dir: Path, dtype: str) -> tuple[RunState, torch.nn.Module]:
        """The state and model of a complete stage; the torch RNG is restored too."""
        state = RunState.from_json(json.loads((stage_dir / "state.json").read_text()))
        model = load_model(str(stage_dir / "model"), dtype=dtype)
        torch.set_rng_state(load_file(str(stage_dir / "rng.safetensors"))["torch_rng"])
        return state, model

    # ---- the end of a run ----------------------------------------------------------------
    def write_final(self, model, tokenizer, cfg: RunConfig, results: dict, kept_ids: dict) -> str:
        """The final model with its config and card, plus results, plan and summary; returns the table."""
        if not self.is_main:
            return ""
        final = self.path / "final"
        save_checkpoint(model, final, tokenizer)
        dump_yaml(cfg, final / "config.yaml")
        dump_yaml(cfg, self.path / "config.yaml")
        (self.path / "plan.json").write_text(json.dumps(kept_ids, indent=1))
        (self.path / "results.json").write_text(json.dumps(results, indent=1))
        write_model_card(final, cfg, results)
        return write_summary_table(results["history"], self.path / "summary.md")

    def write_json(self, name: str, data: dict) -> None:
        """A small JSON file in the run folder, written whole or not at all (main process only)."""
        if self.is_main:
            tmp = self.path / f".{name}.tmp"
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.path / name)

    def read_json(self, name: str) -> dict | None:
        path = self.path / name
        return json.loads(path.read_text()) if path.exists() else None

    def append_log(self, line: str) -> None:
        """One line of the persistent training log (``train.log``)."""
        if self.is_main:
            with open(self.path / "train.log", "a", encoding="utf-8") as f:
                f.write(line + "\n")
