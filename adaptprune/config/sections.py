"""Typed, validated run configuration that maps 1:1 onto YAML.

Nested dataclasses (model, data, prune, schedule, train, eval, output; ``train`` and the arguments
each trainer nests are in ``config.training``); every field carries its help text and checks
(``option``). The validation machinery is in ``config.schema``: unknown keys, wrong types and out-of-range values
raise one ``ConfigError`` line naming the field, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .registry import ALLOCATORS, METRICS  # names only: the plug-in packages load on demand
from .schema import (  # noqa: F401  (re-exported by the package)
    ConfigError,
    dump_yaml,
    from_dict,
    load_into,
    option,
    read_yaml,
    to_dict,
)
from .training import TrainConfig

_f = option  # short alias used by the field tables below


def _metric_names() -> list[str]:
    return sorted(METRICS.names())


def _allocator_names() -> list[str]:
    return ALLOCATORS.names()


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
    target_shape: str | dict | None = _f(
        None,
        "final shape instead of a count: a model name, folder or config.json (its reachable projection), a "
        "mapping {layers, hidden, kv_groups or heads, neurons}, or 'search' (probe prune.shape_candidates at "
        "prune.target_params before stage 1 and keep the lowest loss); the walk reaches it in step_fraction steps "
        "and the final size follows from it",
        pattern="shape",
    )
    shape_candidates: str = _f(
        "",
        "target_shape=search: comma-separated LAYERSxHIDDENxKV_GROUPS to probe, MLP width solved to the target "
        "(e.g. '30x576x2, 26x576x2' or a YAML list); '' = the source's sizes and one step down in each (8 shapes)",
        listable=True,
    )
    search_tokens: int = _f(
        16384, "target_shape=search: training-split tokens each candidate is scored on (besides its calibration)", min=1
    )
    step_fraction: float = _f(
        0.05, "parameters removed per pruning step, as a fraction of the original count", gt=0, le=1
    )
    metric: str = _f("stade", "unit importance metric (registry: adaptprune.importance)", choices=_metric_names)
    allocation: str = _f(
        # re-scoring in 2% inner steps won on the other text at both cuts (docs/heavy_cut.md: -60% 32.27 / 70.62
        # vs adaptive 35.50 / 79.17; -30% 22.44 / 30.35 vs 21.70 / 34.53, Shakespeare / KJV); 5% steps lost KJV
        "accumulating",
        "how sparsity is spread over layers (registry: adaptprune.allocation)",
        choices=_allocator_names,
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
    compensation: Literal["none", "mean", "energy", "mean+energy", "least_squares", "least_squares_no_bias"] = _f(
        "least_squares",  # won on both texts one-shot at -30% and -60%, and incremental at -60% (README)
        "closed-form repair of each o/down projection when units go: mean (removed units' mean into an output "
        "bias), energy (rescale kept columns to the dense output energy), mean+energy, least_squares (kept columns "
        "rebuilt from the input covariance, W_K + W_R C_RK (C_KK + lambda I)^-1, mean into the bias; "
        "docs/compensation.md), least_squares_no_bias (the same on raw moments, no bias: for GGUF architectures "
        "without o/down biases, Qwen3 and Gemma 3)",
    )
    ls_ridge: float = _f(
        0.1,  # best of 0.01 / 0.1 / 1 on both texts at -30% and -60% (docs/compensation.md)
        "least_squares: lambda as a fraction of the mean diagonal of C_KK; larger keeps the kept columns closer to "
        "unchanged (lambda -> inf: mean compensation)",
        ge=0,
    )
    calibration: Literal["parallel", "sequential"] = _f(
        "sequential",  # one-shot -30% and -60%: better on both texts, 1.4x the seconds, one layer's Σ (compensation.md)
        "how compensation sees each layer's inputs: parallel (every layer's statistics from one pass over the model "
        "as it was before the step, Σ of every layer held at once) or sequential (layers rebuilt in order, each on "
        "the inputs the already pruned layers give it; one layer's Σ held; docs/compensation.md)",
    )
    rebuild_target: Literal["self", "dense"] = _f(
        "self",
        "calibration=sequential with least_squares: fit each pruned projection to its own unpruned output on the "
        "new inputs (self), or to the output the layer had before the step on the inputs it had then (dense: also "
        "corrects the earlier layers' error; a second cached stream and one layer copy)",
    )
    neuron_multiple: int = _f(
        32,
        "round kept MLP neurons per layer to a multiple of this (32: every GGUF 32-block quant type fits the rows; "
        "1 leaves F16 fallbacks, docs/edge.md)",
        min=1,
    )
    min_neurons: int = _f(8, "floor of MLP neurons kept in any layer", min=0)
    min_groups: int = _f(1, "floor of KV groups kept in any layer", min=1)
    dims: list[str] = _f(
        ["neurons", "groups"],
        "what a pruning step may remove: neurons (MLP), groups (KV groups), hidden (residual channels, every layer "
        "at once), layers (whole decoder layers); neurons or groups must be among them: they fill each step's "
        "exact remainder",
    )
    layer_grid: str = _f(
        "0, 0.5, 1",
        "dims with layers: comma-separated candidate fractions of a step's removal that may go to whole layers "
        "(the least important ones that fit); every (layer, hidden) pair of the grids is tried on a copy and the "
        "lowest calibration loss wins",
        listable=True,
    )
    hidden_grid: str = _f(
        "0, 0.25, 0.5",
        "dims with hidden: comma-separated candidate fractions of a step's removal that may go to residual channels "
        "(the lowest Minitron scores), out of what the layers left",
        listable=True,
    )
    layer_score: Literal["influence", "loss"] = _f(
        "influence",
        "dims with layers: remove the lowest block influence 1 - cos(h_in, h_out) first (free), or the smallest "
        "calibration-loss increase when the layer is bypassed (one extra pass per layer)",
    )
    hidden_multiple: int = _f(
        32, "round the kept hidden size to a multiple of this (32: every GGUF 32-block quant type fits the rows)", min=1
    )
    min_hidden: int = _f(8, "floor of residual channels (hidden size) kept", min=1)
    min_layers: int = _f(1, "floor of decoder layers kept", min=1)
    layer_compensation: bool = _f(
        True, "fold removed layers' mean residual contribution into the down bias of the kept layer before them"
    )
    norm_compensation: bool = _f(
        True, "after removing hidden channels, rescale every stream norm's gain so its normaliser keeps its scale"
    )

    DIMS = ("neurons", "groups", "hidden", "layers")  # not a field: no annotation

    @property
    def mean_compensation(self) -> bool:
        """The removed units' mean goes into an output bias (mean, mean+energy, least_squares)."""
        return self.compensation in ("mean", "mean+energy", "least_squares")

    @property
    def energy_compensation(self) -> bool:
        return self.compensation in ("energy", "mean+energy")

    @property
    def needs_cov(self) -> bool:
        """Compensation that reads Σ = E[x xᵀ] of every layer's o/down inputs from the step's calibration pass
        (collect_cov); a sequential pass collects each layer's Σ itself, one layer at a time."""
        return self.compensation_reads_cov and not self.sequential

    @property
    def compensation_reads_cov(self) -> bool:
        """The compensation reads Σ of the o/down inputs, from whichever pass collects it."""
        return self.compensation in ("energy", "mean+energy", "least_squares", "least_squares_no_bias")

    @property
    def sequential(self) -> bool:
        """Compensation rebuilds the layers in order on the pruned model's own activations."""
        return self.calibration == "sequential" and self.compensation != "none"

    def __post_init__(self) -> None:
        if self.same_ratio and self.allocation != "accumulating":
            raise ConfigError(
                f"prune.same_ratio=true needs prune.allocation=accumulating (got {self.allocation!r}): only the "
                "accumulating allocator keeps the per-layer ratio it applies to groups and neurons"
            )
        check_dims(self.dims, self.DIMS)
        for name in ("layer_grid", "hidden_grid"):
            fractions(f"prune.{name}", getattr(self, name))
        if "layers" in self.dims and self.allocation == "accumulating" and self.sparsity_scope == "run":
            raise ConfigError(
                "prune.dims with layers needs prune.sparsity_scope=stage for prune.allocation=accumulating: "
                "a run-long per-layer state cannot follow layers that are removed"
            )

    @property
    def layer_fractions(self) -> tuple[float, ...]:
        """``layer_grid`` as numbers (only 0 when ``layers`` is not in ``dims``)."""
        return fractions("prune.layer_grid", self.layer_grid) if "layers" in self.dims else (0.0,)

    @property
    def hidden_fractions(self) -> tuple[float, ...]:
        """``hidden_grid`` as numbers (only 0 when ``hidden`` is not in ``dims``)."""
        return fractions("prune.hidden_grid", self.hidden_grid) if "hidden" in self.dims else (0.0,)

    @property
    def reshapes(self) -> bool:
        """Whether a step may change the hidden size or the depth."""
        return "hidden" in self.dims or "layers" in self.dims


def check_dims(dims: list[str], allowed: tuple[str, ...]) -> None:
    """prune.dims: known, non-empty, no repeats, and neurons or groups among them."""
    unknown = [d for d in dims if d not in allowed]
    if unknown or not dims or len(set(dims)) != len(dims):
        what = f"unknown {unknown[0]!r}" if unknown else "empty" if not dims else "repeats a dimension"
        raise ConfigError(f"prune.dims={dims!r}: {what}; choose from: {', '.join(allowed)}")
    if "neurons" not in dims and "groups" not in dims:
        raise ConfigError(f"prune.dims={dims!r} needs neurons or groups: those units fill each step's exact remainder")


def fractions(name: str, text: str) -> tuple[float, ...]:
    """``"0, 0.5, 1"`` -> (0.0, 0.5, 1.0): at least one, each in [0, 1], no repeats; ``ConfigError`` naming ``name``."""
    try:
        values = tuple(float(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        values = ()
    if not values or any(not 0.0 <= v <= 1.0 for v in values) or len(set(values)) != len(values):
        raise ConfigError(
            f"{name}={text!r} must be comma-separated fractions in [0, 1] without repeats, e.g. '0, 0.5, 1'"
        )
    return values


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
