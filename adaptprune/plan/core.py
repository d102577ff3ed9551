"""``make_plan``: what a run will do and need, from its config alone (a dry run: no weights, no GPU).

The numbers come from the code the run itself uses: ``schedule.stage_targets`` and ``split_budget``
for the stages and their steps, ``feasibility.validated_target`` for the target, the ``uniform``
allocator for per-layer sizes, and ``memory`` for the GPU footprint of each stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from ..allocation import InfeasibleTargetError
from ..arch import ArchAdapter
from ..calibration.activations import CHUNK_BYTES
from ..checkpoint import meta_model, read_model_config
from ..config import ConfigError, RunConfig
from ..pruning.sequential import looks_ahead
from ..pruning.shape.choice import searches, sized_candidates
from ..pruning.shape.target import ShapeWalk, plan_walk
from ..pruning.shape.trial import trial_bytes
from ..pruning.staging import prunes_on_host
from ..pruning.surgery import count_parameters
from ..run.feasibility import validated_target
from ..run.schedule import split_budget, stage_targets, tokens_per_step
from . import memory
from .model import fsdp_gathered_params, largest_layer_params, layer_geometry, lora_params, uniform_sizes


@dataclass(frozen=True)
class PlanOptions:
    """What ``plan`` assumes about the machine (not part of the run config)."""

    gpus: int = 1
    gpu_memory_gib: float = 80.0
    tokens_per_s: float | None = None  # all GPUs together; None: no wall-time estimate

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ConfigError(f"--gpus={self.gpus} must be >= 1")
        if self.gpu_memory_gib <= 0:
            raise ConfigError(f"--gpu-memory={self.gpu_memory_gib} must be > 0 GiB")
        if self.tokens_per_s is not None and self.tokens_per_s <= 0:
            raise ConfigError(f"--tokens-per-s={self.tokens_per_s} must be > 0")


@dataclass
class RunPlan:
    """A run's stages, tokens, per-layer sizes and GPU memory, ready for a table or JSON."""

    model: str
    config_source: str
    family: str
    original_params: int
    target_params: int
    tokens_per_step: int
    stages: list[dict]  # one row per pruning stage, then the recovery phase
    uniform_layers: list[dict]
    uniform_params: int
    memory: dict  # mode -> {"checkpointing" | "no_checkpointing": footprint of the worst stage}
    settings: dict
    dims_shape: dict | None = None
    final_shape: dict = field(default_factory=dict)  # layers, hidden, heads/groups and neurons at the end
    walk: list[dict] | None = None  # prune.target_shape: the shape after every stage
    shape_search: list[dict] | None = None  # prune.target_shape=search: the candidates probed before stage 1
    notes: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(row["tokens"] for row in self.stages)

    def to_json(self) -> dict:
        return {**asdict(self), "total_tokens": self.total_tokens}


def make_plan(cfg: RunConfig, options: PlanOptions | None = None) -> RunPlan:
    """Plan ``cfg`` on the meta device; raises ``ConfigError`` for anything the run itself would refuse."""
    options = options or PlanOptions()
    hf_config, source = read_model_config(cfg.model)
    model, adapter = meta_model(hf_config)
    original = count_parameters(model)
    searching = searches(cfg.prune)
    walk = None if searching else plan_walk(model, cfg.prune, adapter)
    target = walk.final if walk is not None else validated_target(model, adapter, cfg, original)
    targets = stage_targets(original, target, max(1, round(cfg.prune.step_fraction * original)))
    per_step = tokens_per_step(cfg, options.gpus)
    stage_steps, recovery_steps = split_budget(
        cfg.schedule.train_tokens // per_step, len(targets), cfg.schedule.split, cfg.schedule.recovery_fraction
    )
    stages = stage_rows(targets, [*stage_steps, recovery_steps], per_step, original, cfg, options)
    layers, uniform_params = units_only_sizes(model, adapter, cfg.prune, target)
    return RunPlan(
        model=cfg.model.name,
        config_source=source,
        family=adapter.family,
        original_params=original,
        target_params=target,
        tokens_per_step=per_step,
        stages=stages,
        uniform_layers=layers,
        uniform_params=uniform_params,
        memory=memory_table(cfg, options, model, adapter, [row["params"] for row in stages]),
        settings=settings(cfg, options),
        dims_shape=None if walk is not None or searching else chosen_shape(cfg, model, adapter, target),
        final_shape=None if searching or not (walk or layers) else final_shape(model, adapter, walk, layers),
        shape_search=search_candidates(cfg, model, adapter, target) if searching else None,
        walk=[{"stage": i + 1, "params": t, **walk.at(t).as_dict()} for i, t in enumerate(targets)] if walk else None,
        notes=plan_notes(cfg, adapter, model),
    )


def units_only_sizes(model: nn.Module, adapter: ArchAdapter, prune, target: int) -> tuple[list[dict], int]:
    """``uniform_sizes``, or no rows when units alone cannot reach ``target`` (prune.dims with layers or
    hidden: the width/depth search at every stage decides the final shape)."""
    try:
        return uniform_sizes(model, adapter, prune, target)
    except InfeasibleTargetError:
        if not prune.reshapes:
            raise
        return [], 0


def final_shape(model: nn.Module, adapter: ArchAdapter, walk: ShapeWalk | None, uniform_layers: list[dict]) -> dict:
    """What the run ends with: the target shape, or (units only) the uniform allocation's per-layer sizes."""
    per_group = adapter.heads_per_group(model.config)
    if walk is not None:
        shape = walk.target
        groups, neurons = [shape.groups, shape.groups], [shape.neurons, shape.neurons]
        layers, hidden = shape.layers, shape.hidden
    else:
        groups = [min(r["kv_groups"] for r in uniform_layers), max(r["kv_groups"] for r in uniform_layers)]
        neurons = [min(r["neurons"] for r in uniform_layers), max(r["neurons"] for r in uniform_layers)]
        layers, hidden = len(uniform_layers), int(model.config.hidden_size)
    return {
        "layers": layers,
        "hidden": hidden,
        "kv_groups": groups,  # [min, max] over layers
        "heads": [g * per_group for g in groups],
        "head_dim": adapter.head_dim(model.config),
        "neurons": neurons,
        "source": "prune.target_shape" if walk is not None else "uniform allocation on neutral scores (units only)",
    }


def search_candidates(cfg: RunConfig, model: nn.Module, adapter: ArchAdapter, target: int) -> list[dict]:
    """The shapes a search probes, each with its size (a dry run cannot probe: the run picks one)."""
    return [
        {**shape.as_dict(), "params": params} for shape, params in sized_candidates(model, cfg.prune, target, adapter)
    ]


def stage_rows(
    targets: list[int], steps: list[int], tokens_per_step: int, original: int, cfg: RunConfig, options: PlanOptions
) -> list[dict]:
    """One row per stage and one for recovery: parameters, steps, tokens, model FLOPs, wall time.

    Model FLOPs follow the usual 6·P per trained token (forward 2·P, backward 4·P; recomputation for
    checkpointing is not counted, as in MFU), plus 2·P₀ per token for the teacher's forward.
    """
    teacher = original if _needs_teacher(cfg) else 0
    rows = []
    for i, n in enumerate(steps):
        params = targets[min(i, len(targets) - 1)] if targets else original
        tokens = n * tokens_per_step
        row = {
            "stage": i + 1 if i < len(targets) else "recovery",
            "params": params,
            "removed": (targets[i - 1] if i else original) - params if i < len(targets) else 0,
            "steps": n,
            "tokens": tokens,
            "model_flops": (6 * params + 2 * teacher) * tokens,
        }
        row["wall_s"] = tokens / options.tokens_per_s if options.tokens_per_s else None
        rows.append(row)
    return rows


def memory_table(
    cfg: RunConfig, options: PlanOptions, model: nn.Module, adapter: ArchAdapter, trained: list[int]
) -> dict:
    """Per mode and checkpointing setting, the footprint (bytes) of the stage with the highest peak; its
    ``transition`` is the heaviest surgery of any stage."""
    precision = memory.Precision.of(cfg.model.dtype, cfg.train.mixed_precision)
    geometry = layer_geometry(model, adapter)
    vocab = model.get_input_embeddings().num_embeddings
    layers = len(adapter.decoder_layers(model))
    lora = cfg.train.trainer == "lora"
    adapters = lora_params(model, adapter, cfg.train.lora) if lora else 0
    carries = not lora and cfg.train.optim.after_surgery == "carry"
    teacher = count_parameters(model) if _needs_teacher(cfg) else 0
    teacher_bytes = teacher_weight_bytes(cfg)
    gathered, layer = fsdp_gathered_params(model, adapter), largest_layer_params(model, adapter)
    on_host = prunes_on_host(cfg.prune)
    dense_bytes = count_parameters(model) * precision.weight_bytes
    stages = []
    for i, params in enumerate(trained):
        before = trained[i - 1] if 0 < i < len(trained) - 1 else 0  # the recovery phase has no surgery
        stages.append(
            memory.StageSizes(
                params, adapters or params, before, carries, teacher, gathered, teacher_bytes, layer, on_host
            )
        )
    table: dict = {}
    for mode in ["single"] if options.gpus == 1 else ["ddp", "fsdp"]:
        table[mode] = {}
        for ckpt in (False, True):
            tokens = cfg.train.batch_size * cfg.data.seq_len
            act = memory.activation_bytes(
                tokens, layers, geometry, vocab, precision, ckpt, _needs_teacher(cfg), cfg.train.loss_chunk_tokens
            )
            prints = [memory.footprint(sizes, act, precision, mode, options.gpus) for sizes in stages]
            worst = max(range(len(prints)), key=lambda i: prints[i].peak)
            entry = {"stage": worst + 1, **prints[worst].as_dict()}
            entry["transition"] = max(fp.transition for fp in prints)  # the heaviest surgery, whichever stage
            # the per-step width/depth search measures each candidate through hooks on the model itself:
            # it holds one projection's compensation temporaries at a time (the dense model's largest)
            entry["shape_search"] = search_trial_bytes(cfg, model, adapter)
            entry["covariance"] = covariance_bytes(cfg, model, adapter)  # held from calibration to surgery
            entry["sequential"] = sequential_bytes(cfg, model, adapter, precision.weight_bytes)
            entry["transition"] += entry["shape_search"] + entry["covariance"] + entry["sequential"]
            entry["shape_choice"] = shape_choice_bytes(cfg, model, adapter, dense_bytes)
            search_peak = dense_bytes + entry["shape_choice"] + entry["covariance"] if entry["shape_choice"] else 0
            entry["peak"] = max(entry["peak"], entry["transition"], search_peak)
            entry["fits"] = memory.fits(entry["peak"], options.gpu_memory_gib)
            table[mode]["checkpointing" if ckpt else "no_checkpointing"] = entry
    return table


def teacher_weight_bytes(cfg: RunConfig) -> int:
    """Bytes per teacher weight: ``train.distill.teacher_dtype``, ``auto`` planned as bf16 (GPUs compute it)."""
    setting = cfg.train.distill.teacher_dtype
    return memory.DTYPE_BYTES["bfloat16" if setting == "auto" else setting]


def search_trial_bytes(cfg: RunConfig, model: nn.Module, adapter: ArchAdapter) -> int:
    """Bytes a candidate of the per-step search holds beside the model (0 without the search)."""
    searching = cfg.prune.target_shape is None and any(d in ("hidden", "layers") for d in cfg.prune.dims)
    return trial_bytes(model, adapter, cfg.prune.compensation) if searching else 0


def shape_choice_bytes(cfg: RunConfig, model: nn.Module, adapter: ArchAdapter, dense_bytes: int) -> int:
    """What ``prune.target_shape=search`` holds beside the dense model while it cuts a candidate (0 otherwise).

    Before any training state exists: one copy of the dense model at a time, the surgery's compensation
    temporaries for one projection and the calibration's float64 row chunk (its Σ is counted apart)."""
    if not searches(cfg.prune):
        return 0
    return dense_bytes + trial_bytes(model, adapter, cfg.prune.compensation) + CHUNK_BYTES


def covariance_bytes(cfg: RunConfig, model: nn.Module, adapter: ArchAdapter) -> int:
    """Float64 Σ = E[x xᵀ] of o/down inputs held for compensation: every layer's at once from calibration to
    surgery (parallel), or one projection's at a time (sequential; with the dense target its cross moment too)."""
    prune = cfg.prune
    if not prune.compensation_reads_cov and not prune.sequential:
        return 0
    squares = [w * w for w in _output_widths(model, adapter)]
    if not prune.sequential or (search_trial_bytes(cfg, model, adapter) and prune.compensation_reads_cov):
        return 8 * sum(squares)  # every layer's; the per-step search compensates its candidates from them
    return 8 * max(squares) * (2 if _rebuilds_towards_dense(prune) else 1)


def sequential_bytes(cfg: RunConfig, model: nn.Module, adapter: ArchAdapter, weight_bytes: int) -> int:
    """What a sequential pass holds beside Σ: the cached stream of the calibration tokens (two with the dense
    target, and then one decoder layer as it was before the step; one more where inner steps look ahead, the
    next step's text) and one projection's solve temporaries
    (float64: its weight, Δ, the right-hand side and the removed columns, 4 × out × C, and the C×C blocks it
    copies, one for self and three for dense: C̃_KK, C_xK and the rebuilt C̃_KK)."""
    if not cfg.prune.sequential:
        return 0
    dense = _rebuilds_towards_dense(cfg.prune)
    ahead = cfg.prune.allocation == "accumulating" and looks_ahead(cfg.prune)
    streams = (2 if dense else 1) + (1 if ahead else 0)
    held = streams * cfg.data.calib_tokens * model.config.hidden_size * weight_bytes
    if dense:
        held += max(count_parameters(layer) for layer in adapter.decoder_layers(model)) * weight_bytes
    squares = 3 if dense else 1
    projections = [layer.get_submodule(p) for layer in adapter.decoder_layers(model) for p in _outputs(adapter)]
    solve = max(8 * (4 * p.out_features * p.in_features + squares * p.in_features**2) for p in projections)
    return held + solve


def _rebuilds_towards_dense(prune) -> bool:
    return prune.rebuild_target == "dense" and prune.compensation.startswith("least_squares")


def _outputs(adapter: ArchAdapter) -> tuple[str, str]:
    return (adapter.mlp_output, adapter.attention_output)


def _output_widths(model: nn.Module, adapter: ArchAdapter) -> list[int]:
    return [
        layer.get_submodule(path).in_features for layer in adapter.decoder_layers(model) for path in _outputs(adapter)
    ]


def settings(cfg: RunConfig, options: PlanOptions) -> dict:
    """The knobs the numbers depend on, echoed in the output."""
    t = cfg.train
    return {
        "batch_size": t.batch_size,
        "grad_accum_steps": t.grad_accum_steps,
        "seq_len": cfg.data.seq_len,
        "gpus": options.gpus,
        "gpu_memory_gib": options.gpu_memory_gib,
        "usable_fraction": memory.HEADROOM,
        "tokens_per_s": options.tokens_per_s,
        "dtype": cfg.model.dtype,
        "mixed_precision": t.mixed_precision,
        "gradient_checkpointing": t.gradient_checkpointing,
        "trainer": t.trainer,
        "train_tokens": cfg.schedule.train_tokens,
        "step_fraction": cfg.prune.step_fraction,
        "allocation": cfg.prune.allocation,
    }


def chosen_shape(cfg: RunConfig, model: nn.Module, adapter: ArchAdapter, target: int) -> dict | None:
    """The depth and width candidates of a one-step cut to ``target`` when ``prune.dims`` holds hidden or
    layers (None otherwise): what ``shape.dry_run.shape_candidates_for`` computes on the meta device.

    A run measures each candidate's calibration loss at every step and keeps the best; a dry run cannot,
    so it lists them all, units-only first (the choice on a tie).
    """
    from ..pruning.shape.dry_run import shape_candidates_for

    reshaping = [d for d in cfg.prune.dims if d in ("hidden", "layers")]
    if not reshaping:
        return None
    plans = shape_candidates_for(model.config, target, cfg.prune)
    return {"dims": reshaping, "candidates": [p.summary() for p in plans]}


def plan_notes(cfg: RunConfig, adapter: ArchAdapter, model: nn.Module) -> list[str]:
    """Caveats that apply to this config's estimate."""
    notes = []
    if adapter.family not in ("llama", "qwen2", "mistral"):  # the same layer layout (biases save nothing more)
        notes.append(f"the activation formula is derived for Llama-style layers; {adapter.family} is approximate")
    if cfg.train.trainer == "lora":
        notes.append("LoRA: activations omit the adapter branches' inputs (up to ~7·c·h bytes per token and layer)")
    if prunes_on_host(cfg.prune):
        gib = count_parameters(model) * memory.DTYPE_BYTES[cfg.model.dtype] / memory.GIB
        notes.append(f"FSDP: every process prunes a host copy of the model (up to {gib:.1f} GiB of host memory each)")
    if cfg.model.dtype != "float32" and cfg.train.trainer != "lora":
        notes.append(
            f"model.dtype={cfg.model.dtype}: AdamW updates the {cfg.model.dtype} weights directly (no fp32 master)"
        )
    return notes


def _needs_teacher(cfg: RunConfig) -> bool:
    from trainers import get_trainer

    return get_trainer(cfg.train.trainer).needs_teacher
