"""``RunPlan`` as a readable text table (``adaptprune plan``; ``--json`` prints ``RunPlan.to_json``)."""

from __future__ import annotations

import itertools

from .core import RunPlan
from .memory import GIB, HEADROOM

MEMORY_ROWS = (
    ("weights", "weights"),
    ("gradients", "gradients"),
    ("adamw", "AdamW moments (2)"),
    ("autocast_copies", "autocast weight copies"),
    ("ddp_buckets", "DDP gradient buckets"),
    ("fsdp_gathered", "FSDP gathered units"),
    ("teacher", "distill teacher"),
    ("activations", "activations"),
    ("optimizer_step", "AdamW step temporary"),
    ("training", "training peak"),
    ("shape_search", "shape search trial"),
    ("shape_choice", "shape choice copy"),
    ("covariance", "calibration Σ (float64)"),
    ("sequential", "sequential pass streams"),
    ("transition", "surgery (any stage)"),
    ("peak", "peak"),
)
MODE_NAMES = {"single": "1 GPU", "ddp": "DDP", "fsdp": "FSDP"}


def format_plan(plan: RunPlan) -> str:
    """The plan as text: header, stage table, uniform per-layer sizes, memory table."""
    parts = [_header(plan), _stage_table(plan)]
    if plan.shape_search is not None:
        parts.append(_search_block(plan))
    elif not plan.final_shape:
        parts.append(
            "final shape: chosen by the width/depth search of every stage (units alone cannot reach the target)"
        )
    else:
        parts += [_final_shape(plan), _walk_block(plan) if plan.walk else _uniform_block(plan)]
    parts += [_memory_table(plan)]
    if plan.dims_shape is not None:
        lines = [f"hidden/depth candidates of a one-step cut to the target (prune.dims {plan.dims_shape['dims']}):"]
        parts.append("\n".join(lines + [f"  {c}" for c in plan.dims_shape["candidates"]]))
    parts += [f"note: {note}" for note in plan.notes]
    return "\n\n".join(parts)


def _header(plan: RunPlan) -> str:
    s = plan.settings
    stages = len(plan.stages) - 1
    gpus = f"{s['gpus']} GPU" + ("s" if s["gpus"] > 1 else "")
    return "\n".join(
        [
            f"{plan.model} ({plan.family} family; config: {plan.config_source})",
            f"{plan.original_params:,} -> {plan.target_params:,} parameters in {stages} stages "
            f"(prune.step_fraction {s['step_fraction']:g}), then recovery",
            f"tokens per optimizer step: {s['batch_size']} batch x {s['grad_accum_steps']} accum x "
            f"{s['seq_len']} seq x {gpus} = {plan.tokens_per_step:,}",
        ]
    )


def _stage_table(plan: RunPlan) -> str:
    timed = plan.settings["tokens_per_s"] is not None
    head = f"{'stage':>8} {'params':>15} {'removed':>13} {'steps':>8} {'tokens':>15} {'PFLOP':>10}"
    lines = [head + (f" {'wall':>9}" if timed else "")]
    for row in plan.stages:
        line = (
            f"{row['stage']!s:>8} {row['params']:>15,} {row['removed']:>13,} {row['steps']:>8,} "
            f"{row['tokens']:>15,} {row['model_flops'] / 1e15:>10.4g}"
        )
        lines.append(line + (f" {_duration(row['wall_s']):>9}" if timed else ""))
    total_flops = sum(row["model_flops"] for row in plan.stages) / 1e15
    steps = sum(row["steps"] for row in plan.stages)
    total = f"{'total':>8} {'':>15} {'':>13} {steps:>8,} {plan.total_tokens:>15,} {total_flops:>10.4g}"
    if timed:
        total += f" {_duration(plan.total_tokens / plan.settings['tokens_per_s']):>9}"
        lines.append(total)
    else:
        lines += [total, "(wall time: pass --tokens-per-s)"]
    return "\n".join(lines)


def _span(pair: list[int]) -> str:
    return f"{pair[0]:,}" if pair[0] == pair[1] else f"{pair[0]:,}-{pair[1]:,}"


def _final_shape(plan: RunPlan) -> str:
    f = plan.final_shape
    return (
        f"final shape ({f['source']}): {f['layers']} layers, hidden {f['hidden']:,}, {_span(f['kv_groups'])} KV groups "
        f"({_span(f['heads'])} heads x {f['head_dim']}), {_span(f['neurons'])} MLP neurons per layer"
    )


def _walk_block(plan: RunPlan) -> str:
    """The shape after every stage: each dimension moves by the same fraction of its way."""
    lines = [f"shape walk (prune.target_shape; {len(plan.walk)} stages):"]
    lines.append(f"{'stage':>8} {'params':>15} {'layers':>7} {'hidden':>7} {'groups':>7} {'neurons':>8}")
    for row in plan.walk:
        lines.append(
            f"{row['stage']:>8} {row['params']:>15,} {row['layers']:>7} {row['hidden']:>7,} {row['groups']:>7} "
            f"{row['neurons']:>8,}"
        )
    return "\n".join(lines)


def _search_block(plan: RunPlan) -> str:
    """prune.target_shape=search: the candidates; the run probes them before stage 1 and walks to the best."""
    lines = [
        f"final shape: searched before stage 1 (prune.target_shape=search) among {len(plan.shape_search)} "
        "candidates, the MLP width solved to the target; the lowest probe loss is walked to:",
        f"{'layers':>8} {'hidden':>7} {'groups':>7} {'neurons':>8} {'params':>15}",
    ]
    for row in plan.shape_search:
        lines.append(
            f"{row['layers']:>8} {row['hidden']:>7,} {row['groups']:>7} {row['neurons']:>8,} {row['params']:>15,}"
        )
    return "\n".join(lines)


def _uniform_block(plan: RunPlan) -> str:
    """Runs of layers with the same kept sizes, one line each."""
    lines = [
        f"uniform allocation at the final target (neutral scores; {plan.uniform_params:,} parameters "
        f"incl. compensation biases):"
    ]
    key = lambda r: (r["kv_groups"], r["of_groups"], r["neurons"], r["of_neurons"])  # noqa: E731
    for (groups, of_groups, neurons, of_neurons), run in itertools.groupby(plan.uniform_layers, key=key):
        run = list(run)
        first, last = run[0]["layer"], run[-1]["layer"]
        span = f"layer {first}" if first == last else f"layers {first}-{last}"
        lines.append(f"  {span:>14}: {groups}/{of_groups} KV groups, {neurons}/{of_neurons} MLP neurons")
    return "\n".join(lines)


def _memory_table(plan: RunPlan) -> str:
    s = plan.settings
    columns = [(mode, ckpt) for mode in plan.memory for ckpt in ("no_checkpointing", "checkpointing")]
    chosen = "checkpointing" if s["gradient_checkpointing"] else "no_checkpointing"
    gpus = s["gpus"]
    names = [f"{MODE_NAMES[m]}{'' if m == 'single' else f' x{gpus}'}" for m, _ in columns]
    subs = [("ckpt" if c == "checkpointing" else "no ckpt") + ("*" if c == chosen else "") for _, c in columns]
    lines = [
        f"GPU memory per GPU, GiB (worst stage; model.dtype {s['dtype']}, mixed_precision {s['mixed_precision']}, "
        f"micro-batch {s['batch_size']} x {s['seq_len']}, trainer {s['trainer']}):",
        f"{'':<26}" + "".join(f"{n:>13}" for n in names),
        f"{'':<26}" + "".join(f"{n:>13}" for n in subs),
    ]
    for key, label in MEMORY_ROWS:
        values = [plan.memory[m][c][key] / GIB for m, c in columns]
        lines.append(f"{label:<26}" + "".join(f"{v:>13.2f}" for v in values))
    stages = [plan.memory[m][c]["stage"] for m, c in columns]
    lines.append(f"{'worst stage':<26}" + "".join(f"{v:>13}" for v in stages))
    fits = ["yes" if plan.memory[m][c]["fits"] else "NO" for m, c in columns]
    budget = f"fits {s['gpu_memory_gib']:g} GiB ({HEADROOM:.0%})"
    lines.append(f"{budget:<26}" + "".join(f"{v:>13}" for v in fits))
    lines.append("* = train.gradient_checkpointing; formulas: adaptprune/plan/memory.py")
    return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
