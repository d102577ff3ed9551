"""The prune <-> train controller: incremental ~5% steps to a target size, then recovery.

One explicit loop (Adapt-Accel, arXiv 2502.03460)::

    preflight -> restore the last complete stage, or start from the dense model
    for each stage: prune (calibrate -> score -> allocate -> remove) -> train a phase
                    -> evaluate held-out perplexity -> checkpoint (atomic)
    recovery phase -> final model, results, summary

Every stage ends in a complete checkpoint, so ``--resume`` continues with the same plan, data
position, RNG state and optimizer state. Pruning is computed identically on every rank from
identical weights and data (rank 0's plan is broadcast); DDP re-broadcasts rank 0's weights when
the model is prepared again after surgery.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm

from trainers import NonFiniteLossError, get_trainer, load_optimizer_state, save_optimizer_state
from trainers.sharding import is_sharded

from ..compat import cpu_has_native_bf16
from ..config import RunConfig, to_dict
from ..pruning.shape.choice import SHAPE_CHOICE
from ..pruning.staging import LayerStaging, staged_forwards
from .kept_ids import compose_kept_ids, initial_kept_ids
from .phase_log import PhaseLog
from .preflight import Prepared, load_teacher, preflight
from .rollback import roll_back
from .run_data import RunData, gather_rank_states
from .rundir import RunDir, RunState
from .schedule import lr_schedule, split_budget, tokens_per_step
from .searched_shape import search_or_restore, walk_to_searched
from .stage_pruner import StagePruner, default_pruner
from .stage_record import final_results, flat_scalars, heldout_perplexity, history_row, pruning_scalars

CRASH_ENV = "ADAPTPRUNE_CRASH_AT"  # fault injection for the kill-and-resume tests: "<point>:<stage>"


def fault_point(point: str, stage: int) -> None:
    """SIGKILL this process at a named point when ``$ADAPTPRUNE_CRASH_AT`` asks for it.

    Points: calibration, surgery, training, saving. Only the crash-safety tests set it; a
    SIGKILL (not an exception) is the honest model of a machine dying mid-stage.
    """
    if os.environ.get(CRASH_ENV) == f"{point}:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)


def precision_warning(mixed_precision: str, on_cpu: bool, native_bf16: bool) -> str | None:
    """The one-line warning a precision choice deserves on this hardware, or None."""
    if mixed_precision == "fp16" and on_cpu:
        return "train.mixed_precision=fp16 has no effect without a GPU (accelerate autocasts fp16 on CUDA only)"
    if mixed_precision == "bf16" and on_cpu and not native_bf16:
        return ("warning: this CPU has no native bf16 (AVX512-BF16/AMX): bf16 autocast is emulated and much "
                "slower than fp32 here; consider train.mixed_precision=no")  # fmt: skip
    return None


def build_accelerator(cfg: RunConfig) -> Accelerator:
    """The run's Accelerator: precision from ``train.mixed_precision``, TensorBoard under output.dir."""
    on_cpu = not torch.cuda.is_available()
    native_bf16 = cpu_has_native_bf16() if on_cpu and cfg.train.mixed_precision == "bf16" else True
    warning = precision_warning(cfg.train.mixed_precision, on_cpu, native_bf16)
    if warning:
        print(f"[adaptprune] {warning}")
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=1,  # the trainer accumulates itself (and says so in its loop)
        log_with="tensorboard" if cfg.output.tensorboard else None,
        project_dir=str(Path(cfg.output.dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


class Controller:
    """Runs one configured prune-and-train job end to end.

    ``pruner`` decides how a stage removes parameters (default: adaptprune's calibrate -> score ->
    allocate -> remove); the comparison harness passes a baseline's pruner to train it the same way.
    """

    def __init__(
        self,
        config: RunConfig,
        accelerator: Accelerator | None = None,
        pruner: StagePruner | None = None,
        dense: torch.nn.Module | None = None,  # the dense model when the caller has loaded it already
    ):
        self.cfg = config
        self.acc = accelerator or build_accelerator(config)
        self.run_dir = RunDir(config.output.dir, is_main=self.acc.is_main_process)
        self.pruner = pruner
        self.dense = dense

    def log(self, message: str) -> None:
        if self.acc.is_main_process:
            tqdm.write(f"[adaptprune] {message}")

    # ---- the loop -----------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        self.started = time.perf_counter()
        set_seed(self.cfg.train.seed)
        prep = preflight(self.cfg, self.run_dir, resume, dense=self.dense)
        self.dense = None  # the run owns it now
        prep = self._setup(prep, resume)
        state, model = self._restore_or_start(prep, resume)
        self._start_training(model, state, prep)
        rollbacks = 0
        try:
            while state.stage <= len(self.targets):
                try:
                    state = self._run_stage(state)
                except NonFiniteLossError as err:
                    state, rollbacks = self._roll_back(err, state, rollbacks)
            return self._finish(state)
        finally:
            self.run_dir.close()

    def _setup(self, prep: Prepared, resume: bool) -> Prepared:
        cfg = self.cfg
        self.corpus = RunData(cfg, prep.tokenizer, self.acc.process_index, self.acc.num_processes)
        self.shape_choice = None
        if prep.candidates is not None:  # prune.target_shape=search
            self.shape_choice = search_or_restore(
                prep, cfg.prune, self.run_dir, self.corpus, self.acc, resume, self.log
            )
            prep = walk_to_searched(prep, cfg.prune, self.shape_choice.chosen)
        self.tokenizer, self.adapter, self.targets = prep.tokenizer, prep.adapter, prep.targets
        self.original, self.target = prep.original, prep.target
        self.heldout = self.corpus.heldout_texts(cfg.data.eval_tokens) if cfg.eval.every_stage else {}
        self.pruner = self.pruner or default_pruner(cfg.prune, prep.adapter, self.acc.is_main_process, prep.walk)
        s, steps = cfg.schedule, cfg.schedule.train_tokens // tokens_per_step(self.cfg, self.acc.num_processes)
        self.stage_steps, self.recovery_steps = split_budget(steps, len(self.targets), s.split, s.recovery_fraction)
        self.total_steps = sum(self.stage_steps) + self.recovery_steps
        self.run_dir.open()
        if self.shape_choice is not None:
            self.run_dir.write_json(SHAPE_CHOICE, self.shape_choice.as_dict())
        self.acc.wait_for_everyone()
        return prep

    def _restore_or_start(self, prep: Prepared, resume: bool) -> tuple[RunState, torch.nn.Module]:
        last = self.run_dir.last_stage() if resume else None
        self.last_restored = last
        if last is not None:
            state, model = self.run_dir.load_stage(last, self.cfg.model.dtype)
            self.pruner.load_state_dict(state.allocation)
            self.log(f"resuming after stage {state.stage} from {last}")
            return state, model
        state = RunState(kept_ids=initial_kept_ids(prep.dense, self.adapter))
        ppl = heldout_perplexity(prep.dense, self.heldout, self.cfg.data.eval_context)
        state.history.append(history_row(0, prep.dense, ppl, 0.0, 0.0))
        return state, prep.dense

    def _start_training(self, model, state: RunState, prep: Prepared) -> None:
        if self.cfg.output.tensorboard:
            self.acc.init_trackers("tb", config=flat_scalars(to_dict(self.cfg)))
        self.teacher = load_teacher(self.cfg, self.acc.device)
        self.trainer = self._new_trainer(model, self.last_restored)
        if self.last_restored is None:
            self._save(state, self.trainer.export_model())  # the prepared model (gathered under FSDP)
        self.log(
            f"{self.original:,} -> {self.target:,} parameters in {len(self.targets)} stages, "
            f"{self.total_steps * tokens_per_step(self.cfg, self.acc.num_processes):,} training tokens in {self.total_steps} steps "
            f"({self.recovery_steps} for recovery)"
        )

    def _run_stage(self, state: RunState) -> RunState:
        """Stage s (1-based) prunes to targets[s-1] then trains; s = N+1 is the recovery phase."""
        stage = state.stage + 1
        recovery = stage > len(self.targets)
        t0 = time.perf_counter()
        prune_seconds = 0.0 if recovery else self._prune(state, stage)
        steps = self.recovery_steps if recovery else self.stage_steps[stage - 1]
        phase = self._train_phase(state, steps, label="recovery" if recovery else f"stage {stage}")
        model = self.trainer.export_model()  # plain HF model (LoRA: a merged copy)
        ppl = heldout_perplexity(model, self.heldout, self.cfg.data.eval_context)
        state.stage = stage
        state.tokens += phase["tokens"]
        wall = time.perf_counter() - t0
        state.history.append(history_row(stage, model, ppl, prune_seconds, wall, phase, state.tokens))
        if ppl:
            self.acc.log({f"eval/ppl_{name}": value["ppl"] for name, value in ppl.items()}, step=state.global_step)
        self._save(state, model)
        return state

    def _prune(self, state: RunState, stage: int) -> float:
        """Calibrate on fresh text, score, allocate and remove down to targets[stage-1]; seconds spent."""
        t0 = time.perf_counter()
        fault_point("calibration", stage)
        staging = LayerStaging(self.acc.device) if self.pruner.on_host and is_sharded(self.acc) else None
        model = self.trainer.before_surgery(on_host=staging is not None)
        calibration = self.corpus.calibration_source(stage, state.calibration)
        label = f"({stage}/{len(self.targets)})"
        with staged_forwards(model, self.adapter, staging):
            model, records = self.pruner(model, calibration, self.targets[stage - 1], label)
        fault_point("surgery", stage)
        self.trainer.after_surgery(model, records)
        state.kept_ids = compose_kept_ids(state.kept_ids, records)
        state.calibration = calibration.state()
        state.allocation = self.pruner.state_dict()
        self._log_pruning(stage, model, state.global_step)
        return time.perf_counter() - t0

    def _train_phase(self, state: RunState, steps: int, label: str) -> dict:
        if steps == 0:
            return {"tokens": 0, "loss": math.nan, "first_loss": math.nan, "seconds": 0.0}
        log = PhaseLog(self.acc, self.run_dir, label, steps, self.total_steps, self.cfg.output.log_every)
        log.on_halfway = lambda: fault_point("training", state.stage + 1)
        rank = str(self.acc.process_index)
        batches = self.corpus.train_batches(self.cfg.train.batch_size, self.cfg.data.seq_len, state.data.get(rank, {}))
        try:
            result = self.trainer.run_phase(
                batches, steps, lr_schedule(self.cfg, self.total_steps, state.lr_scale), state.global_step, log.on_step
            )
        finally:
            log.close()
        state.global_step = result.global_step
        state.data = gather_rank_states(batches.state(), self.acc.num_processes)
        return {
            "tokens": result.tokens,
            "loss": result.last_loss,
            "first_loss": log.first_loss,
            "seconds": result.seconds,
        }

    def _roll_back(self, err: NonFiniteLossError, state: RunState, rollbacks: int) -> tuple[RunState, int]:
        restored, model = roll_back(err, self.cfg, self.run_dir, state, rollbacks, self.log)
        self.pruner.load_state_dict(restored.allocation)
        self.trainer = self._new_trainer(model, self.run_dir.last_stage())
        return restored, rollbacks + 1

    # ---- pieces -------------------------------------------------------------------------
    def _new_trainer(self, model, stage_dir: Path | None):
        trainer = get_trainer(self.cfg.train.trainer)(model, self.acc, self.cfg.train, teacher=self.teacher)
        if stage_dir is not None and self.cfg.train.optim.after_surgery == "carry":
            trainer.load_optimizer_state_by_name(load_optimizer_state(stage_dir / "optimizer.safetensors")[0])
        return trainer

    def _save(self, state: RunState, model) -> None:
        optimizer_state = self.trainer.optimizer_state_by_name()  # every rank: a collective under FSDP

        def write_optimizer(path: Path) -> None:
            save_optimizer_state(path, optimizer_state, extra={"global_step": state.global_step})

        self.acc.wait_for_everyone()
        self.run_dir.save_stage(
            state, model, self.tokenizer, write_optimizer, on_written=lambda: fault_point("saving", state.stage)
        )
        self.acc.wait_for_everyone()

    def _log_pruning(self, stage: int, model, global_step: int) -> None:
        scalars = pruning_scalars(model, self.adapter, stage)
        self.acc.log(scalars, step=global_step)
        shape = f" ({scalars['prune/layers']} layers, hidden {scalars['prune/hidden_size']})"
        self.log(
            f"stage {stage}: pruned to {scalars['prune/params']:,} parameters{shape if self.cfg.prune.reshapes else ''}"
        )

    def _finish(self, state: RunState) -> dict:
        model = self.trainer.export_model()
        seconds = time.perf_counter() - self.started
        final_dir = self.run_dir.path / "final"
        results = final_results(self.original, model, len(self.targets), state.history, final_dir, seconds)
        if self.shape_choice is not None:
            results["shape_choice"] = self.shape_choice.as_dict()
        table = self.run_dir.write_final(model, self.tokenizer, self.cfg, results, state.kept_ids)
        if self.acc.is_main_process:
            print(table)
        self.acc.wait_for_everyone()
        self.acc.end_training()
        return results
