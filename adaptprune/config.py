"""Typed, validated run configuration that maps 1:1 onto YAML.

Nested dataclasses (model, data, prune, schedule, train, eval, output); every field carries its
help text in ``metadata``. Unknown keys, wrong types and out-of-range values raise one
``ConfigError`` line naming the field, the value and what is allowed (with the nearest valid key
for typos). YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message is one line meant for the user."""


def option(default: Any, help: str, **checks: Any) -> Any:
    """A config field with its help text and checks (``min``/``ge``/``gt``/``le``/``lt``, ``pattern``,
    ``choices``: a callable returning the allowed names, e.g. a registry's keys)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


_f = option  # short alias used by the field tables below


def _metric_names() -> list[str]:
    from .importance import METRICS

    return sorted(METRICS)


def _allocator_names() -> list[str]:
    from .allocation import ALLOCATORS

    return list(ALLOCATORS)


def _trainer_names() -> list[str]:
    from trainers import TRAINERS

    return list(TRAINERS)


@dataclass
class ModelConfig:
    name: str = _f("smollm2-135m", "embedded model name, HF model folder or hub id")
    tokenizer: str | None = _f(None, "folder or hub id of the tokenizer (default: the model's own folder)")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "weights dtype for pruning and training")
    trust_remote_code: bool = _f(False, "allow custom modeling code from the checkpoint (off unless you trust it)")


@dataclass
class DataConfig:
    corpus: str = _f(
        "shakespeare",
        "'shakespeare' or 'kjv' (embedded), a .txt/.md file, a folder of .txt/.md, parquet/jsonl/arrow files or "
        "a folder of them, or a datasets hub name (streamed)",
    )
    corpus_config: str = _f("", "datasets config name of the corpus (e.g. 'sample-10BT' for fineweb-edu); '' = default")
    text_field: str = _f("text", "column holding the document text (parquet/jsonl/hub corpora)")
    heldout_docs: int = _f(
        1000,
        "documents reserved from the start of the train split as held-out when a corpus has no "
        "validation/test split (never trained or calibrated on)",
        min=1,
    )
    shuffle_buffer: int = _f(
        1024,
        "packed sequences shuffled together per block, on top of a per-epoch shard order "
        "(memory: shuffle_buffer x seq_len tokens; 1 = stream order)",
        min=1,
    )
    eval_corpora: list[str] = _f(["kjv"], "other-domain corpora whose held-out perplexity is also reported")
    seq_len: int = _f(256, "tokens per packed training/calibration sequence", min=8)
    calib_tokens: int = _f(8192, "calibration tokens per pruning step (drawn from the train split)", min=8)
    eval_tokens: int = _f(4096, "held-out tokens for perplexity", min=16)
    eval_context: int = _f(1024, "context length of the perplexity windows", min=8)


@dataclass
class PruneConfig:
    target_params: str = _f(
        "90M", "final size: a count ('90M', '1.2B', '134515008') or a ratio of the original ('0.7x')", pattern="target"
    )
    step_fraction: float = _f(
        0.05, "parameters removed per pruning step, as a fraction of the original count", gt=0, le=1
    )
    metric: str = _f("stade", "unit importance metric (registry: adaptprune.importance)", choices=_metric_names)
    allocation: str = _f(
        "adaptive", "how sparsity is spread over layers (registry: adaptprune.allocation)", choices=_allocator_names
    )
    amplitude: float = _f(
        0.02,
        "adaptive/accumulating allocation: A in s_l = ... - A * normalised layer influence (Adapt-Pruner's "
        "layer_prune_distribution_amplitude; its scripts use 0.02)",
        ge=0,
        le=1,
    )
    inner_step_fraction: float = _f(
        0.02,
        "accumulating allocation: nominal per-layer sparsity added per inner step (Adapt-Pruner's delta = 1.0/50); "
        "a stage is split into ceil(removal / (delta * prunable params)) inner steps, each on fresh calibration text",
        gt=0,
        le=1,
    )
    sparsity_scope: Literal["stage", "run"] = _f(
        "stage",
        "accumulating allocation: per-layer sparsity restarts every stage at the stage's sizes (upstream: one "
        "pruner per stage) or accumulates over the whole run relative to the original sizes",
    )
    same_ratio: bool = _f(
        False,
        "accumulating allocation: prune a layer's KV groups at its sparsity s (floor(s*G) of its original "
        "groups) and spend the rest of its budget on neurons, as upstream; off = cheapest importance per parameter",
    )
    taylor_samples: int = _f(
        512, "taylor_param_first: calibration windows with a backward pass per pruning step (upstream: 512)", min=1
    )
    taylor_seq_len: int = _f(64, "taylor_param_first: tokens per calibration window (upstream: 64)", min=2)
    mean_compensation: bool = _f(True, "fold removed units' mean contribution into an output bias")
    energy_compensation: bool = _f(False, "rescale kept weights so the output energy matches the dense layer")
    neuron_multiple: int = _f(1, "round kept MLP neurons per layer to a multiple of this", min=1)
    min_neurons: int = _f(8, "floor of MLP neurons kept in any layer", min=0)
    min_groups: int = _f(1, "floor of KV groups kept in any layer", min=1)

    def __post_init__(self) -> None:
        if self.same_ratio and self.allocation != "accumulating":
            raise ConfigError(
                f"prune.same_ratio=true needs prune.allocation=accumulating (got {self.allocation!r}): only the "
                "accumulating allocator keeps the per-layer ratio it applies to groups and neurons"
            )


@dataclass
class ScheduleConfig:
    train_tokens: int = _f(65536, "training tokens over the whole run (all stages plus recovery)", min=0)
    split: Literal["adapt_accel", "uniform"] = _f("adapt_accel", "token split across stages: 2i/(N(N+1)) or equal")
    recovery_fraction: float = _f(0.2, "share of train_tokens for the final recovery phase", ge=0, lt=1)
    warmup_fraction: float = _f(0.05, "share of all steps spent in linear warmup", ge=0, lt=1)
    decay_fraction: float = _f(0.1, "share of all steps spent in the final linear decay", ge=0, le=1)

    def __post_init__(self) -> None:
        if self.warmup_fraction + self.decay_fraction > 1:
            raise ConfigError(
                f"schedule.warmup_fraction + schedule.decay_fraction = "
                f"{self.warmup_fraction + self.decay_fraction:g} must be <= 1 (warmup and decay cannot overlap)"
            )


@dataclass
class OptimArgs:
    """AdamW, used by every trainer (decoupled weight decay on matrices only)."""

    weight_decay: float = _f(0.0, "AdamW weight decay on matrices (norms and biases never decay)", ge=0)
    beta1: float = _f(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = _f(0.95, "AdamW beta2", ge=0, lt=1)
    eps: float = _f(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)", ge=0)
    after_surgery: Literal["carry", "reset"] = _f(
        "carry", "after surgery: slice the AdamW moments of kept units into the new optimizer, or start fresh"
    )


@dataclass
class LoraArgs:
    """The ``lora`` trainer (peft): adapters merged before every surgery, fresh ones after."""

    r: int = _f(8, "LoRA rank", min=1)
    alpha: float = _f(16.0, "LoRA scaling numerator (scale = alpha / r)", gt=0)
    dropout: float = _f(0.05, "dropout on the LoRA branch input", ge=0, lt=1)
    target_modules: list[str] = _f(
        [], "linear module names that get adapters (empty = every linear in the decoder layers, peft's all-linear)"
    )


@dataclass
class DistillArgs:
    """The ``distill`` trainer: KL to the frozen unpruned teacher, optionally mixed with the LM loss."""

    temperature: float = _f(1.0, "softmax temperature T of the KD loss (scaled by T^2)", gt=0)
    kd_weight: float = _f(1.0, "loss = kd_weight * KD + (1 - kd_weight) * LM", ge=0, le=1)


@dataclass
class TrainConfig:
    trainer: str = _f("full", "recovery strategy (registry: trainers)", choices=_trainer_names)
    lr: float = _f(5e-5, "peak learning rate", gt=0)
    min_lr_ratio: float = _f(0.1, "learning rate at the end of decay, as a fraction of lr", ge=0, le=1)
    batch_size: int = _f(4, "sequences per micro-batch per process", min=1)
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step", min=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = _f(
        "no", "autocast for training (fp32 master weights; fp16 adds a loss scaler); handed to the Accelerator"
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (re-enabled after every surgery)")
    on_nonfinite: Literal["rollback", "stop"] = _f(
        "rollback", "NaN/inf loss: reload the last checkpoint at half the lr, or stop"
    )
    seed: int = _f(0, "seed for data order and initialisation")
    optim: OptimArgs = field(default_factory=OptimArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    distill: DistillArgs = field(default_factory=DistillArgs)


@dataclass
class EvalConfig:
    every_stage: bool = _f(True, "held-out perplexity after every stage")
    tasks: list[str] = _f([], "lm-eval tasks at the end (piqa, arc_easy, ...)")
    limit: int = _f(0, "documents per task (0 = all)", min=0)


@dataclass
class OutputConfig:
    dir: str = _f("runs/default", "run folder: checkpoints, TensorBoard events, results")
    tensorboard: bool = _f(True, "write TensorBoard scalars")
    log_every: int = _f(10, "optimizer steps between one-line log records (printed and appended to train.log)", min=1)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ---- YAML <-> dataclasses -------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then a YAML file, then ``section.key=value`` overrides; validated."""
    return load_into(RunConfig, path, overrides)


def _apply_override(data: dict, item: str) -> None:
    """``a.b.c=value`` sets data["a"]["b"]["c"] (the value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    path = key.split(".")
    if not sep or not all(path):
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. prune.metric=wanda)")
    node = data
    for depth, name in enumerate(path[:-1]):
        if node.get(name) is None:
            node[name] = {}
        if not isinstance(node[name], dict):
            raise ConfigError(f"'{'.'.join(path[: depth + 1])}' must be a mapping to set '{key}'")
        node = node[name]
    try:
        node[path[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"override '{item}': the value is not valid YAML (quote it)") from None


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from ``path`` (``safe_load`` only); one-line ``ConfigError`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_into(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Defaults of ``cls``, then a YAML file, then ``key.path=value`` overrides; validated."""
    data = read_yaml(path) if path is not None else {}
    for item in overrides or []:
        _apply_override(data, item)
    return from_dict(cls, data)


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, validating every field."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; allowed: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {prefix + str(key)!r}{hint}")  # repr: one line, whatever the key
    values = {}
    for name, f in fields.items():
        if name not in data:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, {} if data[name] is None else data[name], f"{prefix}{name}.")
        else:
            values[name] = _check_value(f"{prefix}{name}", data[name], hint, f.metadata)
    return cls(**values)


def _check_value(name: str, value: Any, hint: Any, meta: typing.Mapping) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        if value is None:
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{name}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")
        return value
    if origin in (list, types.GenericAlias) or hint is list or origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}={value!r} must be a list of strings")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} must be an integer")
    elif hint is float:
        value = _number_from_text(value)  # YAML 1.1 reads 1e-4 as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}={value!r} must be a number")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{name}={value!r} must be a finite number")
    elif hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be a string")
        value = str(value)
        if meta.get("pattern") == "target":
            _check_target_text(name, value)
        if "choices" in meta:
            _check_choice(name, value, meta["choices"]())
    _check_range(name, value, meta)
    return value


def _check_choice(name: str, value: str, allowed: list[str]) -> None:
    if value not in allowed:
        near = difflib.get_close_matches(value, allowed, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"{name}={value!r} is not known{hint}; choose one of: {', '.join(allowed)}")


def _number_from_text(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


_TARGET = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([kmbx]?)$", re.IGNORECASE)  # as allocation.parse_target


def _check_target_text(name: str, value: str) -> None:
    """The model-independent part of a size: its form, and a ratio strictly inside (0, 1).

    Whether a count fits the model (and its floors) is checked when the model is loaded.
    """
    match = _TARGET.match(value.strip().replace("_", ""))
    if not match:
        raise ConfigError(
            f"{name}={value!r} is not a size; use a count like '90M', '1.2B', '134515008' or a ratio like '0.7x'"
        )
    number, suffix = float(match.group(1)), match.group(2).lower()
    if suffix == "x" and not 0.0 < number < 1.0:
        raise ConfigError(f"{name}={value!r} is out of range; a ratio must lie strictly between 0x and 1x")
    if suffix != "x" and number <= 0:
        raise ConfigError(f"{name}={value!r} is out of range; a count must be at least 1")


def _check_range(name: str, value: Any, meta: typing.Mapping) -> None:
    checks = {
        "min": (lambda v, b: v >= b, ">="),
        "ge": (lambda v, b: v >= b, ">="),
        "gt": (lambda v, b: v > b, ">"),
        "le": (lambda v, b: v <= b, "<="),
        "lt": (lambda v, b: v < b, "<"),
    }
    for key, (ok, sign) in checks.items():
        if key in meta and not ok(value, meta[key]):
            raise ConfigError(f"{name}={value!r} is out of range; it must be {sign} {meta[key]}")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def dump_yaml(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config (the run's own record of what it did)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
