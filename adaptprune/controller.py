"""The prune <-> train controller: incremental ~5% steps to a target size, then recovery.

One explicit loop (Adapt-Accel, arXiv 2502.03460), per stage:

    calibrate -> score -> allocate -> prune (with compensation) -> train a phase
    -> evaluate held-out perplexity -> checkpoint (atomic)

then a final recovery phase. Every stage ends in a complete checkpoint folder, so ``--resume``
continues from the last finished stage with the same plan, data position, RNG state and
optimizer state. Pruning is computed identically on every rank from identical weights and
data; DDP re-broadcasts rank 0's weights when the model is prepared again after surgery.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from trainers import NonFiniteLossError, TrainerConfig, get_trainer, load_optimizer_state, save_optimizer_state

from .allocation import get_allocator, parse_target, removable_params
from .arch import UNIT_KINDS, ArchAdapter, UnsupportedArchitectureError, get_adapter, hf_compat
from .checkpoint import atomic_dir, load_model, load_tokenizer, resolve_model_path, save_checkpoint
from .checkpoint import load_config as load_model_config
from .compat import require_safetensors
from .config import ConfigError, PruneConfig, RunConfig, dump_yaml, to_dict
from .data import CorpusError, load_corpus, pack, token_stream
from .evaluation.perplexity import perplexity
from .importance import get_metric
from .pruning import layer_budgets, prune_step
from .report import write_model_card, write_summary_table
from .schedule import lr_at, split_budget, stage_targets
from .surgery import count_parameters

MAX_ROLLBACKS = 3
CRASH_ENV = "ADAPTPRUNE_CRASH_AT"  # fault injection for the kill-and-resume tests: "<point>:<stage>"


def fault_point(point: str, stage: int) -> None:
    """SIGKILL this process at a named point when ``$ADAPTPRUNE_CRASH_AT`` asks for it.

    Points: calibration, surgery, training, saving. Only the crash-safety tests set it; a
    SIGKILL (not an exception) is the honest model of a machine dying mid-stage.
    """
    if os.environ.get(CRASH_ENV) == f"{point}:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)


class TrainingStoppedError(RuntimeError):
    """Training hit a non-finite loss and was told (or ran out of rollbacks) to stop; one line."""


@dataclass
class RunState:
    """What a stage checkpoint must restore: everything that is not the weights."""

    stage: int = 0  # stages completed (0 = dense model, before any pruning)
    global_step: int = 0
    batches_seen: int = 0  # training batches consumed on each rank (the data position)
    tokens: int = 0
    lr_scale: float = 1.0  # lowered after a non-finite loss rollback
    kept_ids: dict = field(default_factory=dict)  # {layer: {kind: original unit ids kept}}
    history: list = field(default_factory=list)  # one row per stage for the summary table

    def to_json(self) -> dict:
        return dict(self.__dict__)


class Controller:
    """Runs one configured prune-and-train job end to end."""

    def __init__(self, config: RunConfig, accelerator: Accelerator | None = None):
        self.cfg = config
        self.acc = accelerator or Accelerator(
            log_with="tensorboard" if config.output.tensorboard else None,
            project_dir=str(Path(config.output.dir)),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
        self.out = Path(config.output.dir)
        self.ckpt_dir = self.out / "checkpoints"

    # ---- set-up -------------------------------------------------------------------------
    def _log(self, message: str) -> None:
        if self.acc.is_main_process:
            tqdm.write(f"[adaptprune] {message}")

    def _check_output_dir(self, resume: bool) -> None:
        """Refuse, without writing anything, an output.dir that is taken or cannot be created."""
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"output.dir={self.out} is a file; it must be a folder (new or empty)")
        if self.out.is_dir() and not resume and self._last_stage_dir() is not None:
            raise ConfigError(f"output.dir={self.out} already holds a run; pass --resume or choose another folder")
        base = _existing_ancestor(self.out)
        if not base.is_dir():
            raise ConfigError(f"output.dir={self.out} is not writable: {base} is a file, not a folder")
        if not os.access(base, os.W_OK | os.X_OK):
            raise ConfigError(f"output.dir={self.out} is not writable: no write permission on {base}")

    def _prepare_output(self, resume: bool) -> None:
        """Create output.dir, prove a write works, and drop half-written stage folders."""
        if self.acc.is_main_process:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                probe = self.out / ".write-probe"
                probe.write_bytes(b"0" * 1024)
                probe.unlink()
            except OSError as err:
                raise ConfigError(f"output.dir={self.out} is not writable: {err.strerror or err}") from None
            self._remove_partial_stages()
        self.acc.wait_for_everyone()

    def _remove_partial_stages(self) -> None:
        """Drop what a SIGKILL while saving leaves: ``.stage-XXX.tmp-*`` folders (never loaded:
        only complete ``stage-XXX`` folders are) and ``.old-*`` copies already replaced."""
        for path in self.ckpt_dir.glob(".stage-*"):
            name, _, kind = path.name[1:].partition(".")
            if kind.startswith("tmp-") or (kind.startswith("old-") and (self.ckpt_dir / name).exists()):
                self._log(f"removing the half-written checkpoint folder {path.name}")
                shutil.rmtree(path, ignore_errors=True)

    def _check_disk(self, model: torch.nn.Module) -> None:
        """Fail before any work if output.dir's disk cannot hold a stage checkpoint."""
        need = 3 * sum(p.numel() * p.element_size() for p in model.parameters())  # model + optimizer + temp copy
        free = shutil.disk_usage(_existing_ancestor(self.out)).free
        if free < need:
            raise ConfigError(
                f"output.dir={self.out} has {free / 2**30:.1f} GiB free; a stage checkpoint needs about "
                f"{need / 2**30:.1f} GiB (model, optimizer state and a temporary copy)"
            )

    def _validated_target(self, dense: torch.nn.Module, original: int) -> int:
        """prune.target_params as a count, between the smallest size the floors allow and the model."""
        prune = self.cfg.prune
        try:
            target = parse_target(prune.target_params, original)
        except ValueError as err:
            raise ConfigError(f"prune.{err}") from None
        floor = smallest_reachable(dense, self.adapter, prune)
        if target < floor:
            raise ConfigError(
                f"prune.target_params={prune.target_params!r} ({target:,} parameters) is below the smallest size "
                f"the floors allow ({floor:,} with prune.min_groups={prune.min_groups}, "
                f"prune.min_neurons={prune.min_neurons}); choose a target >= {floor:,} or lower the floors"
            )
        return target

    def _load_data(self, tokenizer) -> None:
        cfg = self.cfg.data
        corpus = load_corpus(cfg.corpus)
        self.train_stream = token_stream(corpus["train"], tokenizer)
        self.heldout = token_stream(corpus["heldout"], tokenizer, cfg.eval_tokens)
        if self.train_stream.numel() < cfg.calib_tokens + cfg.seq_len * self.cfg.train.batch_size:
            raise CorpusError(
                f"corpus '{cfg.corpus}' has {self.train_stream.numel():,} training tokens; calibration needs "
                f"{cfg.calib_tokens:,} plus at least one batch of {cfg.seq_len * self.cfg.train.batch_size:,}"
            )
        self.train_sequences = pack(self.train_stream, cfg.seq_len)  # (N, L)
        if self.heldout.numel() < 16:
            raise CorpusError(f"held-out split of '{cfg.corpus}' has only {self.heldout.numel()} tokens")

    def _calibration_sequences(self, stage: int) -> torch.Tensor:
        """Fresh calibration text each stage, at a deterministic offset in the train split."""
        cfg = self.cfg.data
        span = self.train_stream.numel() - cfg.calib_tokens
        offset = (stage * cfg.calib_tokens) % max(span, 1)
        count = max(1, cfg.calib_tokens // cfg.seq_len)
        return pack(self.train_stream, cfg.seq_len, count, offset)

    def _batches(self, start: int):
        """Endless shuffled training batches of this rank, from batch ``start`` on (resume)."""
        cfg = self.cfg.train
        loader = self.acc.prepare_data_loader(
            DataLoader(TensorDataset(self.train_sequences), batch_size=cfg.batch_size, shuffle=True, drop_last=True)
        )
        per_epoch = len(loader)
        if per_epoch == 0:
            raise CorpusError(f"the train split packs into fewer than batch_size={cfg.batch_size} sequences")
        epoch, skip = divmod(start, per_epoch)
        while True:
            loader.set_epoch(epoch)
            source = self.acc.skip_first_batches(loader, skip) if skip else loader
            for (batch,) in source:
                yield batch
            epoch, skip = epoch + 1, 0

    # ---- checkpoints --------------------------------------------------------------------
    def _stage_dir(self, stage: int) -> Path:
        return self.ckpt_dir / f"stage-{stage:03d}"

    def _last_stage_dir(self) -> Path | None:
        done = sorted(p for p in self.ckpt_dir.glob("stage-*") if (p / "state.json").exists())
        return done[-1] if done else None

    def _save_stage(self, state: RunState, model, tokenizer) -> None:
        """Weights, optimizer, data position and RNG in one folder, renamed into place at the end."""
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            with atomic_dir(self._stage_dir(state.stage)) as tmp:
                save_checkpoint(model, tmp / "model", tokenizer)  # model: the exported plain model
                fault_point("saving", state.stage)
                save_optimizer_state(
                    tmp / "optimizer.safetensors",
                    self.trainer.optimizer_state_by_name(),
                    extra={"global_step": state.global_step},
                )
                from safetensors.torch import save_file

                save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
                (tmp / "state.json").write_text(json.dumps(state.to_json(), indent=1))
            self._prune_old_stages(keep=state.stage)
        self.acc.wait_for_everyone()

    def _prune_old_stages(self, keep: int) -> None:
        """Only the newest complete stage is needed to resume; older ones are removed."""
        for path in self.ckpt_dir.glob("stage-*"):
            if path.name != self._stage_dir(keep).name:
                shutil.rmtree(path, ignore_errors=True)

    def _restore(self, stage_dir: Path):
        from safetensors.torch import load_file

        state = RunState(**json.loads((stage_dir / "state.json").read_text()))
        model = load_model(str(stage_dir / "model"), dtype=self.cfg.model.dtype)
        torch.set_rng_state(load_file(str(stage_dir / "rng.safetensors"))["torch_rng"])
        return state, model

    # ---- the loop -----------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        cfg = self.cfg
        self.started = time.perf_counter()
        set_seed(cfg.train.seed)
        # Everything that can be checked without writing is checked first: a bad value leaves
        # no trace in output.dir, and a doomed run fails before hours of work.
        self._check_output_dir(resume)
        _check_metric(cfg.prune.metric)
        require_safetensors(resolve_model_path(cfg.model.name))
        get_adapter(load_model_config(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code))
        tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
        self._load_data(tokenizer)
        dense = load_model(cfg.model.name, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
        self.adapter = get_adapter(dense)
        _check_head_groups(dense, self.adapter)
        original = count_parameters(dense)
        target = self._validated_target(dense, original)
        step = max(1, round(cfg.prune.step_fraction * original))
        self.targets = stage_targets(original, target, step)
        self.stage_steps, self.recovery_steps = split_budget(
            cfg.schedule.train_tokens // self._tokens_per_step(),
            len(self.targets),
            cfg.schedule.split,
            cfg.schedule.recovery_fraction,
        )
        self._check_disk(dense)
        self._prepare_output(resume)
        teacher = self._teacher(dense)

        last = self._last_stage_dir() if resume else None
        if last is not None:
            state, model = self._restore(last)
            self._log(f"resuming after stage {state.stage} from {last}")
        else:
            state, model = RunState(), dense
            state.kept_ids = self._all_ids(model)
            state.history.append(self._row(0, model, self._eval(model), 0, 0.0, 0.0))
        self._start_trackers()
        self.trainer = get_trainer(cfg.train.trainer)(model, self.acc, self._trainer_config(), teacher=teacher)
        if last is not None and cfg.train.optimizer_state == "carry":
            opt_state, _ = load_optimizer_state(last / "optimizer.safetensors")
            self.trainer.load_optimizer_state_by_name(opt_state)
        if last is None:
            self._save_stage(state, model, tokenizer)
        self.total_steps = self._total_steps()
        self._log(self._plan_line(original, target))

        rollbacks = 0
        while state.stage <= len(self.targets):
            try:
                state = self._run_stage(state, tokenizer)
            except NonFiniteLossError as err:
                state, rollbacks = self._recover_from_nonfinite(err, state, rollbacks, tokenizer)
        return self._finish(state, tokenizer, original)

    def _run_stage(self, state: RunState, tokenizer) -> RunState:
        """Stage s (1-based) prunes to targets[s-1] then trains; s = N+1 is the recovery phase."""
        stage = state.stage + 1
        recovery = stage > len(self.targets)
        t0 = time.perf_counter()
        prune_seconds = 0.0
        if not recovery:
            fault_point("calibration", stage)
            model = self.trainer.before_surgery()
            report = prune_step(
                model,
                self._calibration_sequences(stage),
                self.targets[stage - 1],
                self.cfg.prune,
                self.adapter,
                progress=self.acc.is_main_process,
                label=f"({stage}/{len(self.targets)})",
            )
            fault_point("surgery", stage)
            self.trainer.after_surgery(model, report.records)
            state.kept_ids = _compose_ids(state.kept_ids, report.records)
            prune_seconds = time.perf_counter() - t0
            self._log_pruning(stage, model, state.global_step)
        steps = self.recovery_steps if recovery else self.stage_steps[stage - 1]
        phase = self._train_phase(state, steps, label="recovery" if recovery else f"stage {stage}")
        model = self.trainer.export_model()  # plain HF model (LoRA: a merged copy)
        ppl = self._eval(model)
        state.stage = stage
        state.tokens += phase["tokens"]
        state.history.append(
            self._row(
                stage,
                model,
                ppl,
                state.tokens,
                prune_seconds,
                time.perf_counter() - t0,
                loss=phase["loss"],
                first_loss=phase["first_loss"],
            )
        )
        if ppl is not None:
            self.acc.log({"eval/ppl": ppl["ppl"]}, step=state.global_step)
        self._save_stage(state, model, tokenizer)
        return state

    def _train_phase(self, state: RunState, steps: int, label: str) -> dict:
        cfg = self.cfg.train
        if steps == 0:
            return {"tokens": 0, "loss": math.nan, "first_loss": math.nan}
        bar = tqdm(total=steps, desc=label, disable=not self.acc.is_main_process, leave=False)
        losses: list[float] = []

        def on_step(m: dict) -> None:
            losses.append(m["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.1e}", tok_s=f"{m['tokens_per_s']:.0f}")
            self.acc.log(
                {
                    "train/loss": m["loss"],
                    "train/lr": m["lr"],
                    "train/tokens_per_s": m["tokens_per_s"],
                    "train/grad_norm": m["grad_norm"],
                },
                step=m["step"],
            )
            if len(losses) == max(1, steps // 2):
                fault_point("training", state.stage + 1)

        def lr(step: int) -> float:
            s = self.cfg.schedule
            return state.lr_scale * lr_at(
                step, self.total_steps, cfg.lr, s.warmup_fraction, s.decay_fraction, cfg.min_lr_ratio
            )

        batches = self._batches(state.batches_seen)
        try:
            result = self.trainer.run_phase(batches, steps, lr, state.global_step, on_step)
        finally:
            bar.close()
        state.global_step = result.global_step
        state.batches_seen += steps * self.trainer.config.grad_accum_steps
        return {"tokens": result.tokens, "loss": result.last_loss, "first_loss": losses[0]}

    def _recover_from_nonfinite(self, err: NonFiniteLossError, state: RunState, rollbacks: int, tokenizer):
        """Roll back to the last complete stage at half the learning rate, or stop cleanly."""
        if self.cfg.train.on_nonfinite == "stop" or rollbacks >= MAX_ROLLBACKS:
            why = "train.on_nonfinite=stop" if self.cfg.train.on_nonfinite == "stop" else f"{MAX_ROLLBACKS} rollbacks"
            raise TrainingStoppedError(
                f"training stopped ({why}): {err}; the last complete checkpoint is {self._last_stage_dir()} "
                f"(rerun with --resume, e.g. with a lower train.lr)"
            ) from None
        last = self._last_stage_dir()
        self._log(f"{err}; rolling back to {last.name} at half the learning rate")
        restored, model = self._restore(last)
        restored.lr_scale = state.lr_scale * 0.5
        self.trainer = get_trainer(self.cfg.train.trainer)(
            model, self.acc, self._trainer_config(), teacher=getattr(self.trainer, "teacher", None)
        )
        if self.cfg.train.optimizer_state == "carry":
            self.trainer.load_optimizer_state_by_name(load_optimizer_state(last / "optimizer.safetensors")[0])
        return restored, rollbacks + 1

    # ---- helpers ------------------------------------------------------------------------
    def _teacher(self, dense):
        if not get_trainer(self.cfg.train.trainer).needs_teacher:
            return None
        teacher = load_model(
            self.cfg.model.name, dtype=self.cfg.model.dtype, trust_remote_code=self.cfg.model.trust_remote_code
        )
        return teacher.to(self.acc.device).eval().requires_grad_(False)

    def _trainer_config(self) -> TrainerConfig:
        t = self.cfg.train
        return TrainerConfig(
            weight_decay=t.weight_decay,
            max_grad_norm=t.grad_clip,
            optimizer_state=t.optimizer_state,
            lora_r=t.lora_r,
            lora_alpha=float(t.lora_alpha),
            lora_dropout=t.lora_dropout,
            distill_temperature=t.kd_temperature,
            distill_alpha=1.0 - t.kd_alpha,
        )

    def _tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.data.seq_len * self.acc.num_processes

    def _total_steps(self) -> int:
        return sum(self.stage_steps) + self.recovery_steps

    def _all_ids(self, model) -> dict:
        return {
            str(layer): {kind: list(range(self.adapter.count_units(model, layer, kind))) for kind in UNIT_KINDS}
            for layer in range(len(self.adapter.decoder_layers(model)))
        }

    def _eval(self, model) -> dict | None:
        if not self.cfg.eval.every_stage:
            return None
        context = min(self.cfg.data.eval_context, getattr(model.config, "max_position_embeddings", 10**9))
        result = perplexity(model, self.heldout, context=context)
        return result.as_dict()

    def _row(self, stage, model, ppl, tokens, prune_s, wall_s, loss=None, first_loss=None) -> dict:
        return {
            "stage": stage,
            "params": count_parameters(model),
            "ppl": ppl["ppl"] if ppl else None,
            "train_tokens": tokens,
            "train_loss": _finite_or_none(loss),
            "first_step_loss": _finite_or_none(first_loss),
            "prune_seconds": round(prune_s, 2),
            "wall_seconds": round(wall_s, 2),
        }

    def _log_pruning(self, stage: int, model, global_step: int) -> None:
        params = count_parameters(model)
        scalars = {"prune/params": params, "prune/stage": stage}
        for layer in range(len(self.adapter.decoder_layers(model))):
            shape = self.adapter.layer_shape(model, layer)
            scalars[f"prune/kept_neurons/layer_{layer:02d}"] = shape.neurons
            scalars[f"prune/kept_groups/layer_{layer:02d}"] = shape.groups
        self.acc.log(scalars, step=global_step)
        self._log(f"stage {stage}: pruned to {params:,} parameters")

    def _start_trackers(self) -> None:
        if self.cfg.output.tensorboard:
            self.acc.init_trackers("tb", config=_flat_scalars(to_dict(self.cfg)))

    def _plan_line(self, original: int, target: int) -> str:
        return (
            f"{original:,} -> {target:,} parameters in {len(self.targets)} stages, "
            f"{self._total_steps() * self._tokens_per_step():,} training tokens in {self._total_steps()} steps "
            f"({self.recovery_steps} for recovery)"
        )

    def _finish(self, state: RunState, tokenizer, original: int) -> dict:
        model = self.trainer.export_model()
        final_dir = self.out / "final"
        results = {
            "original_params": original,
            "final_params": count_parameters(model),
            "stages": len(self.targets),
            "history": state.history,
            "final_model": str(final_dir),
            "wall_seconds_this_process": round(time.perf_counter() - self.started, 2),
            "prune_seconds_total": round(sum(r["prune_seconds"] for r in state.history), 2),
        }
        if self.acc.is_main_process:
            save_checkpoint(model, final_dir, tokenizer)
            dump_yaml(self.cfg, final_dir / "config.yaml")
            dump_yaml(self.cfg, self.out / "config.yaml")
            (self.out / "plan.json").write_text(json.dumps(state.kept_ids, indent=1))
            (self.out / "results.json").write_text(json.dumps(results, indent=1))
            write_model_card(final_dir, self.cfg, results)
            print(write_summary_table(state.history, self.out / "summary.md"))
        self.acc.wait_for_everyone()
        self.acc.end_training()
        return results


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (where a new output.dir would be created)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def smallest_reachable(model: torch.nn.Module, adapter: ArchAdapter, prune: PruneConfig) -> int:
    """The fewest parameters pruning can reach without crossing prune.min_groups / min_neurons.

    Mean compensation adds a bias to every o/down projection, and those count towards the target.
    """
    budgets = layer_budgets(model, adapter, prune.min_groups, prune.min_neurons)
    cap = getattr(get_allocator(prune.allocation), "max_sparsity", 1.0)  # adaptive keeps >= 1% of a layer
    removable = sum(
        min(math.floor(b.prunable_params * cap), removable_params([b], neuron_multiple=prune.neuron_multiple))
        for b in budgets
    )
    added = 0
    if prune.mean_compensation:
        for layer in adapter.decoder_layers(model):
            for path in (adapter.attention_output, adapter.mlp_output):
                linear = layer.get_submodule(path)
                added += linear.out_features if linear.bias is None else 0
    return count_parameters(model) + added - removable


def _check_metric(name: str) -> None:
    try:
        get_metric(name)
    except ValueError as err:
        raise ConfigError(f"prune.metric={name!r}: {err}") from None


def _check_head_groups(model: torch.nn.Module, adapter: ArchAdapter) -> None:
    """Attention is pruned in whole KV groups, so every layer's query heads must split into them."""
    for idx in range(len(adapter.decoder_layers(model))):
        layer_cfg = hf_compat.layer_config(model.config, idx)
        heads = getattr(layer_cfg, "num_attention_heads", None)
        kv = getattr(layer_cfg, "num_key_value_heads", None) or heads
        if heads and kv and heads % kv:
            raise UnsupportedArchitectureError(
                f"layer {idx} has {heads} query heads and {kv} KV heads: query heads must split evenly into "
                f"KV groups (adaptprune removes whole groups: one KV head with its query heads)"
            )


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN: phases without steps report null."""
    return value if value is not None and math.isfinite(value) else None


def _compose_ids(kept_ids: dict, records) -> dict:
    """Map each record's kept (current) unit ids back to ids of the original model."""
    out = {layer: dict(kinds) for layer, kinds in kept_ids.items()}
    for r in records:
        current = out[str(r.layer)][r.kind]
        out[str(r.layer)][r.kind] = [current[k] for k in r.kept]
    return out


def _flat_scalars(tree: dict, prefix: str = "") -> dict:
    """TensorBoard hparams take scalars and strings only."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_scalars(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
