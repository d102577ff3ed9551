"""Quality against training tokens: incremental, one-shot and Adapt-Pruner schedules (issue #16).

Adapt-Pruner (arXiv 2502.03460) claims that interleaving ~5% pruning steps with training beats
pruning once and then training, at equal tokens, by a margin that depends on the budget. This runs
every schedule in ``SCHEDULES`` through the real ``Controller`` at several training budgets, all at
one size (30% of the non-embedding parameters removed: SmolLM2-135M -> 102,653,971), with the same
data order, learning-rate curve shape and seed, and scores each final model on held-out text of
the calibration domain and of another one (kjv), plus PIQA and ARC-Easy at the largest budget.
``budget_report.py`` turns the rows into ``budget.md`` and ``budget.png``.

Resumable: each finished run is a row written atomically into ``<out>/budget.json`` at once. A
rerun skips finished rows and continues the running configuration from its stage checkpoints
(``Controller.run(resume=True)``), so a crash loses at most that one configuration.

``--mixed-precision`` defaults to bf16 where the hardware computes it natively (CUDA, or a CPU with AVX512-BF16/AMX) and to fp32 elsewhere: on an AVX2-only AMD EPYC, emulated bf16 trained at about 5 tokens/s against 60-100 for fp32. Measured on a CPU with it (Xeon with AVX512-BF16, 2 cores shared
with other jobs) on the default job's steps (SmolLM2-135M, batch 4x256, lr 5e-5, the same batches,
precisions alternating in fresh processes): bf16 trained at 24-33 tokens/s against 15.7 for fp32;
the loss after 4 steps was 3.644 vs 3.635 while the first step already differed by the same amount
(3.368 vs 3.352: forward rounding, no drift), and held-out perplexity after the steps was 17.57 vs
17.50 on Shakespeare and 17.90 vs 17.90 on kjv. The weights stay fp32 (autocast only), and every
final model is scored in fp32 whatever the training precision.

The full run is long: 54 configurations (9 schedules; 2 seeds at the two smallest budgets), 4.0M
training tokens, lm-eval on 9 models. One configuration (incremental, 8,192 tokens) took 983 s to
prune and train, plus about 2 minutes of perplexity, on 2 cores at load 8; extrapolated, about 4-5
days at that load and roughly 16-30 hours on an idle machine, 60% of it at the 262,144-token budget.

    python scripts/bench_budget.py --out docs                  # the full benchmark (see above)
    python scripts/bench_budget.py --quick --out /tmp/budget   # tiny-random-llama: 1-2 minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from budget_report import write_report
from measured import ADAPTIVE, PARALLEL, PROBED_60

from adaptprune.checkpoint import load_model, load_tokenizer
from adaptprune.config import RunConfig, load_config, to_dict
from adaptprune.evaluation.perplexity import perplexity
from adaptprune.evaluation.tasks import run_tasks
from adaptprune.pruning.surgery import count_parameters, params_after_removing
from adaptprune.run.controller import Controller
from adaptprune.run.run_data import heldout_texts
from adaptprune.run.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
ONESHOT = ("prune.step_fraction=1.0",)
LM = ("train.trainer=full",)  # LM loss, whatever the base config's trainer
DISTILL = ("train.trainer=distill", "train.distill.kd_weight=1.0")  # KL to the unpruned model only
MIX = ("train.trainer=distill", "train.distill.kd_weight=0.5")  # half KL, half LM loss
LEAST_SQUARES = ("prune.compensation=least_squares", "prune.ls_ridge=0.1")  # docs/compensation.md's best λ
ACCUMULATING = ("prune.allocation=accumulating",)
SEQUENTIAL = ("prune.calibration=sequential",)
# Re-scoring half as often: ~5% of each layer per inner step instead of 2% (about half the calibrations).
COARSE = ("prune.inner_step_fraction=0.05",)
# Adapt-Pruner as published (the `adapt_pruner` method of `compare`): Taylor on 512 x 64 tokens per inner step,
# accumulated 2% inner steps, KV heads and neurons at one ratio, no compensation.
ADAPT_PRUNER = (
    "prune.metric=taylor_param_first",
    "prune.allocation=accumulating",
    "prune.amplitude=0.02",
    "prune.inner_step_fraction=0.02",
    "prune.sparsity_scope=stage",
    "prune.same_ratio=true",
    "prune.compensation=none",
    "data.calib_tokens=32768",
)
ALL_DIMS = ('prune.dims=["neurons","groups","hidden","layers"]', "prune.hidden_multiple=32")
# The shape a one-shot probe chose for SmolLM2-135M at -60% (docs/shape_probe.md; the budget's quick mode
# ignores it: the tiny model is smaller than every dimension); layers x hidden x KV groups x neurons.
SHAPE_60 = "prune.target_shape={layers: 22, hidden: 576, kv_groups: 2, neurons: 768}"
# All 30 layers and the full width kept (the units-only rows' depth and width, made uniform): 30x576x2x480.
SHAPE_60_DEEP = "prune.target_shape={layers: 30, hidden: 576, kv_groups: 2, neurons: 480}"


# PROBED_60, each walked to as SHAPE_60_DEEP is (least squares, adaptive): does the search rank them as training does?
def shape_override(text: str) -> str:
    layers, hidden, groups, neurons = text.split("x")
    return f"prune.target_shape={{layers: {layers}, hidden: {hidden}, kv_groups: {groups}, neurons: {neurons}}}"


# No shape given: the run probes the default grid at the comparison's size before stage 1 and walks to the best.
SEARCHED = ("prune.target_shape=search",)
# Everything a full run and a quick run share: the comparison's protocol, not its size.
PROTOCOL = ("eval.every_stage=false", "eval.tasks=[]", "output.tensorboard=false", "data.eval_corpora=[kjv]")
FULL = ("data.eval_tokens=4096", "data.eval_context=1024")
# tiny-random-llama has 2 KV groups per layer; one is 2% of the model, so a one-shot cut and ~10%
# steps would land up to a group apart. Keeping every group (neurons only, 192 parameters each)
# makes every schedule land on one count, which the test checks exactly.
QUICK = (
    "model.name=tiny-random-llama",
    "data.seq_len=64",
    "data.calib_tokens=256",
    "data.eval_tokens=512",
    "data.eval_context=128",
    "prune.step_fraction=0.1",
    "prune.min_groups=2",
    "prune.inner_step_fraction=0.05",  # accumulating: 3 inner steps (calibrations) per stage instead of 6
    "prune.neuron_multiple=1",  # 32-neuron chunks of a 64-wide model are 2% of it: FLAP would land apart
    "data.shuffle_buffer=64",  # each training stream first tokenizes a whole shuffle block
)


@dataclass(frozen=True)
class Schedule:
    """One line of the plot: how the model is pruned and what it recovers with."""

    name: str
    # "incremental", "oneshot", or a baseline of methods.baselines.PRUNERS ("flap", "llm_pruner", "slicegpt"):
    # its one-shot as the controller's single stage, then the same controller training (compare's <name>+full)
    pruning: str
    # "lm", "distill", "mix", "lora" (LLM-Pruner's published LoRA recovery on the run's batches, compare's
    # llm_pruner_lora) or "none" (no training: the one-shot model as published, compare's one-shot rows)
    objective: str
    overrides: tuple[str, ...]


SCHEDULES = {
    s.name: s
    for s in (
        Schedule("oneshot+train", "oneshot", "lm", ONESHOT + LM),
        Schedule("oneshot+train-distill", "oneshot", "distill", ONESHOT + DISTILL),
        Schedule("oneshot+train-mix", "oneshot", "mix", ONESHOT + MIX),
        Schedule("flap+train", "flap", "lm", ONESHOT + LM),
        Schedule("flap+train-distill", "flap", "distill", ONESHOT + DISTILL),
        Schedule("incremental", "incremental", "lm", LM),
        Schedule("incremental-distill", "incremental", "distill", DISTILL),
        Schedule("incremental-mix", "incremental", "mix", MIX),
        Schedule("incremental-accumulating", "incremental", "lm", LM + ("prune.allocation=accumulating",)),
        Schedule("incremental-equal-split", "incremental", "lm", LM + ("schedule.split=uniform",)),
        Schedule("incremental-reset", "incremental", "lm", LM + ("train.optim.after_surgery=reset",)),
    )
}
CORE = list(SCHEDULES)  # what runs unless --schedules names others
# The heavy cut's variants (issues #22, #23): each is one change to incremental-distill or oneshot+train-distill.
# Least squares is named where it is meant: the rows of the core schedules were measured with mean compensation,
# the default before #23, and the variants after it compare against incremental-distill-ls.
SCHEDULES.update(
    (s.name, s)
    for s in (
        Schedule("incremental-distill-ls", "incremental", "distill", DISTILL + LEAST_SQUARES),
        Schedule("oneshot+train-distill-ls", "oneshot", "distill", ONESHOT + DISTILL + LEAST_SQUARES),
        Schedule("incremental-distill-ls-alldims", "incremental", "distill", DISTILL + LEAST_SQUARES + ALL_DIMS),
        Schedule(
            "incremental-distill-ls-accumulating", "incremental", "distill", DISTILL + LEAST_SQUARES + ACCUMULATING
        ),
        Schedule(
            "incremental-distill-ls-accumulating-coarse",
            "incremental",
            "distill",
            DISTILL + LEAST_SQUARES + ACCUMULATING + COARSE,
        ),
        Schedule("adapt-pruner-distill", "incremental", "distill", DISTILL + ADAPT_PRUNER),
        # The user's other baselines beside FLAP (issue #32): each as published and + the same distillation.
        Schedule("llm-pruner+lora", "llm_pruner", "lora", ONESHOT),
        Schedule("llm-pruner+train-distill", "llm_pruner", "distill", ONESHOT + DISTILL),
        Schedule("slicegpt", "slicegpt", "none", ONESHOT + LM),
        Schedule("slicegpt+train-distill", "slicegpt", "distill", ONESHOT + DISTILL),
        Schedule(
            "incremental-distill-ls-accumulating-alldims",
            "incremental",
            "distill",
            DISTILL + LEAST_SQUARES + ACCUMULATING + ALL_DIMS,
        ),
        Schedule("incremental-distill-shape", "incremental", "distill", DISTILL + (SHAPE_60,)),
        Schedule("incremental-distill-shape-ls", "incremental", "distill", DISTILL + (SHAPE_60,) + LEAST_SQUARES),
        Schedule(
            "incremental-distill-shape30-ls", "incremental", "distill", DISTILL + (SHAPE_60_DEEP,) + LEAST_SQUARES
        ),
        Schedule(
            "incremental-distill-shape30-ls-accumulating",
            "incremental",
            "distill",
            DISTILL + (SHAPE_60_DEEP,) + LEAST_SQUARES + ACCUMULATING,
        ),
        Schedule(  # every layer on the shape's sizes: a plain llama config and GGUF
            "incremental-distill-shape30-ls-uniform",
            "incremental",
            "distill",
            DISTILL + (SHAPE_60_DEEP,) + LEAST_SQUARES + ("prune.allocation=uniform",),
        ),
        *(
            Schedule(
                f"incremental-distill-shape{text}-ls",
                "incremental",
                "distill",
                DISTILL + (shape_override(text),) + LEAST_SQUARES,
            )
            for text in PROBED_60
        ),
        Schedule(  # the default job plus one override: the shape searched before stage 1
            "incremental-distill-search-ls-accumulating",
            "incremental",
            "distill",
            DISTILL + SEARCHED + LEAST_SQUARES + ACCUMULATING,
        ),
        *(  # the default job with each layer rebuilt on the pruned layers' outputs (issue #32)
            Schedule(
                f"incremental-distill-ls-accumulating-sequential-{target}",
                "incremental",
                "distill",
                DISTILL + LEAST_SQUARES + ACCUMULATING + SEQUENTIAL + (f"prune.rebuild_target={target}",),
            )
            for target in ("self", "dense")
        ),
    )
)


@dataclass(frozen=True)
class Run:
    """One configuration: a schedule at a budget with a seed (one row of the JSON)."""

    schedule: Schedule
    budget: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.schedule.name}|{self.budget}|{self.seed}"

    @property
    def folder_name(self) -> str:
        return f"{self.schedule.name.replace('+', '_')}-b{self.budget}-s{self.seed}"


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.replace("_", "").split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs", help="folder for budget.json, budget.md and budget.png")
    p.add_argument("--runs", default=None, help="run folders (default: runs/budget, or runs/budget_quick)")
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument(
        "--budgets",
        type=_int_list,
        default=None,
        help="training tokens (default 8192,32768,98304,262144); multiples of batch x seq_len (1,024), or the "
        "remainder is dropped",
    )
    p.add_argument("--seeds", type=_int_list, default=None, help="train.seed values at the smallest budgets")
    p.add_argument("--seeded-budgets", type=int, default=2, help="how many smallest budgets get every seed")
    p.add_argument("--schedules", default=",".join(CORE), help=f"comma-separated, of: {', '.join(SCHEDULES)}")
    p.add_argument(
        "--mixed-precision",
        choices=("no", "bf16"),
        default=default_precision(),
        help="training autocast (default: bf16 where the hardware has it)",
    )
    p.add_argument("--tasks", default="piqa,arc_easy", help="lm-eval tasks at the largest of --budgets ('' = none)")
    p.add_argument("--task-limit", type=int, default=0, help="documents per task (0 = full validation sets)")
    p.add_argument("--remove-fraction", "--remove", type=float, default=0.30, help="of the non-embedding parameters")
    p.add_argument("--keep-models", action="store_true", help="keep each run's final model and last checkpoint")
    p.add_argument("--render-only", action="store_true", help="rewrite budget.md/png from budget.json")
    p.add_argument("--quick", action="store_true", help="tiny-random-llama, tiny budgets, 1 seed, no tasks")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
    args = p.parse_args(argv)
    unknown = [s for s in args.schedules.split(",") if s not in SCHEDULES]
    if unknown:
        p.error(f"unknown schedules {unknown}; choose from: {', '.join(SCHEDULES)}")
    quick = args.quick
    args.budgets = sorted(set(args.budgets or ([1024, 4096] if quick else [8192, 32768, 98304, 262144])))
    args.seeds = args.seeds or ([0] if quick else [0, 1])
    args.tasks = [] if quick else [t for t in args.tasks.split(",") if t]
    args.runs = Path(args.runs or ROOT / "runs" / ("budget_quick" if quick else "budget"))
    return args


def base_overrides(args: argparse.Namespace) -> list[str]:
    """Overrides every run shares (the schedule, budget, seed and folder come on top)."""
    size = QUICK if args.quick else FULL
    return [*PROTOCOL, *size, f'train.mixed_precision="{args.mixed_precision}"', *args.overrides]


def plan(args: argparse.Namespace) -> list[Run]:
    """Every configuration, smallest budget first, so partial results already draw whole curves."""
    seeded = set(args.budgets[: args.seeded_budgets])
    return [
        Run(SCHEDULES[name], budget, seed)
        for budget in args.budgets
        for seed in (args.seeds if budget in seeded else args.seeds[:1])
        for name in args.schedules.split(",")
    ]


def run_config(args: argparse.Namespace, target: int, run: Run) -> RunConfig:
    """The configs/default.yaml job with the comparison's size, this run's schedule, budget and seed."""
    cfg = load_config(args.config, run_overrides(args, target, run))
    if run.schedule.objective == "lora":  # the published recipe in one place: compare's llm_pruner_lora
        from adaptprune.methods.baselines import published_lora

        cfg = dataclasses.replace(cfg, train=published_lora(cfg.train))
    return cfg


def run_overrides(args: argparse.Namespace, target: int, run: Run) -> list[str]:
    untrained = ("schedule.train_tokens=0",) if run.schedule.objective == "none" else ()
    return [
        ADAPTIVE,
        PARALLEL,
        *base_overrides(args),
        f"prune.target_params={target}",
        *run.schedule.overrides,
        f"schedule.train_tokens={run.budget}",
        *untrained,  # the grid's budget names the row; a method published without training gets none
        f"train.seed={run.seed}",
        f"output.dir={args.runs / run.folder_name}",
    ]


# ---- resumable rows ------------------------------------------------------------------------
def settings(args: argparse.Namespace) -> dict:
    """What a row depends on besides its schedule, budget and seed: rows under other settings are ignored."""
    return {
        "quick": args.quick,
        "config": os.path.relpath(args.config, ROOT),
        "overrides": base_overrides(args),
        "remove_fraction": args.remove_fraction,
        "tasks": args.tasks,
        "task_limit": args.task_limit,
    }


def read_grids(path: Path) -> list[dict]:
    """Every grid (one size and protocol each) ``path`` holds; a schema-1 file is one grid."""
    if not path.exists():
        return []
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        return earlier["grids"] if earlier.get("schema") == 2 else [earlier]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        print(f"[budget] {path} is unreadable; recomputing every row", flush=True)
        return []


def finished_rows(grids: list[dict], wanted: dict) -> dict[str, dict]:
    """Rows of the grid run under the same settings, by key; other grids are kept beside it, untouched."""
    for grid in grids:
        if grid.get("settings") == wanted:
            return {row["key"]: row for row in grid["rows"]}
    return {}


def with_grid(grids: list[dict], payload: dict) -> list[dict]:
    """``grids`` with ``payload`` replacing the grid of its settings; the heaviest cut first."""
    others = [g for g in grids if g.get("settings") != payload["settings"]]
    return sorted([*others, payload], key=lambda g: -g["settings"]["remove_fraction"])


def write_json(path: Path, grids: list[dict]) -> None:
    """Atomic, as ``adaptprune.methods.compare``: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"schema": 2, "grids": grids}, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def open_folder(folder: Path, overrides: list[str]) -> int | None:
    """The stage to resume after (None: start fresh). A folder left by other settings is deleted."""
    marker = folder / "bench_overrides.json"
    if folder.exists() and (not marker.exists() or json.loads(marker.read_text()) != overrides):
        print(f"[budget] {folder} was written under other settings; starting it again", flush=True)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(overrides), encoding="utf-8")
    last = RunDir(folder).last_stage()
    return json.loads((last / "state.json").read_text())["stage"] if last else None


def drop_weights(folder: Path) -> None:
    """A finished row needs no weights: 54 runs of SmolLM2-135M would fill ~90 GB otherwise."""
    for name in ("checkpoints", "final"):
        shutil.rmtree(folder / name, ignore_errors=True)


# ---- one configuration ---------------------------------------------------------------------
def run_one(
    args: argparse.Namespace, target: int, run: Run, texts: dict[str, torch.Tensor], tokenizer: Any, with_tasks: bool
) -> dict:
    """Prune and train ``run`` under the controller (resuming its checkpoints), then score the final model."""
    cfg = run_config(args, target, run)
    folder = Path(cfg.output.dir)
    restored = open_folder(folder, run_overrides(args, target, run))
    print(f"[budget] {run.key}" + (f": resuming after stage {restored}" if restored is not None else ""), flush=True)
    results = Controller(cfg, pruner=baseline_pruner(run.schedule)).run(resume=restored is not None)
    gc.collect()
    start = time.perf_counter()
    model = load_model(str(folder / "final"))
    context = min(cfg.data.eval_context, getattr(model.config, "max_position_embeddings", 10**9))
    ppl = {name: perplexity(model, tokens, context=context).ppl for name, tokens in texts.items()}
    tasks = run_tasks(model, tokenizer, args.tasks, limit=args.task_limit or None) if with_tasks and args.tasks else {}
    row = {
        "key": run.key,
        "schedule": run.schedule.name,
        "pruning": run.schedule.pruning,
        "objective": run.schedule.objective,
        "budget": run.budget,
        "seed": run.seed,
        "params": count_parameters(model),
        "stages": results["stages"],
        "train_tokens": results["history"][-1]["train_tokens"],
        "ppl": ppl,
        "tasks": tasks,
        **timing(results, restored),
        "eval_seconds": round(time.perf_counter() - start, 1),
    }
    shown = ", ".join(f"{name} {value:.2f}" for name, value in ppl.items())
    print(f"[budget] {run.key}: {row['params']:,} params, ppl {shown}, {row['wall_seconds']:.0f} s", flush=True)
    return row


def baseline_pruner(schedule: Schedule):
    """A baseline's one-shot as the controller's single stage (the comparison's ``<name>+full``); None: adaptprune's."""
    from adaptprune.methods.baselines import PRUNERS, BaselinePruner

    return BaselinePruner(PRUNERS[schedule.pruning]) if schedule.pruning in PRUNERS else None


def timing(results: dict, restored: int | None) -> dict:
    """Prune, train and wall seconds of the whole run, pruning share and training tokens/s.

    The stage rows carry prune and wall seconds (wall minus prune is training: no per-stage
    evaluation here). A resumed run adds the restored stages' wall seconds to this process's; the
    earlier processes' loading and checkpoint writing are then missing, so the row says ``resumed``.
    """
    stages = [r for r in results["history"] if r["stage"] > 0]
    prune = results["prune_seconds_total"]
    train = sum(r["wall_seconds"] - r["prune_seconds"] for r in stages)
    earlier = sum(r["wall_seconds"] for r in stages if restored is not None and r["stage"] <= restored)
    wall = results["wall_seconds_this_process"] + earlier
    tokens = results["history"][-1]["train_tokens"]
    return {
        "prune_seconds": round(prune, 2),
        "train_seconds": round(train, 2),
        "wall_seconds": round(wall, 2),
        "pruning_share": round(prune / wall, 4) if wall > 0 else None,
        "tokens_per_s": round(tokens / train, 2) if train > 0 and tokens else None,
        "resumed": restored is not None,
    }


# ---- the benchmark -------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    json_path = Path(args.out) / "budget.json"
    if args.render_only:
        write_report(read_grids(json_path), Path(args.out))
        return
    if args.quick:
        torch.set_num_threads(1)  # a 0.3M-parameter model: threads only add contention on a shared machine
    base = load_config(args.config, [*base_overrides(args), "output.dir=unused"])
    tokenizer = load_tokenizer(base.model.tokenizer or base.model.name)
    dense = load_model(base.model.name, dtype=base.model.dtype)
    original, target = count_parameters(dense), params_after_removing(dense, args.remove_fraction)
    del dense
    texts = heldout_texts(base, tokenizer)  # the same held-out tokens for every row
    if args.quick:
        gc.freeze()  # accelerate's free_memory runs gc.collect every stage: 0.6 s over the imported libraries
    payload = {
        "settings": settings(args),
        "model": base.model.name,
        "original_params": original,
        "target_params": target,
        "texts": list(texts),
        "text_tokens": {name: int(tokens.numel()) for name, tokens in texts.items()},
        "eval_context": base.data.eval_context,
        "base_config": to_dict(base),
        "rows": [],
    }
    largest = max(args.budgets)
    for run in plan(args):
        folder = args.runs / run.folder_name
        if run.key not in finished_rows(read_grids(json_path), payload["settings"]):
            row = run_one(args, target, run, texts, tokenizer, with_tasks=run.budget == largest)
            record_row(json_path, payload, row)
        if not args.keep_models:
            drop_weights(folder)
    grids = record_row(json_path, payload, None)
    write_report(grids, Path(args.out))


def record_row(json_path: Path, payload: dict, row: dict | None) -> list[dict]:
    """Add ``row`` to its grid in ``json_path`` (None: write the grid as it is) and return every grid.

    The file is read again first: another process may have added rows to the same grid since this one
    started (two schedules of one grid run side by side), and rewriting the rows read at start would drop them.
    """
    grids = read_grids(json_path)
    rows = finished_rows(grids, payload["settings"])
    if row is not None:
        rows[row["key"]] = row
    payload["rows"] = list(rows.values())
    grids = with_grid(grids, payload)
    write_json(json_path, grids)
    return grids


def default_precision() -> str:
    """bf16 on CUDA or a CPU with native bf16; fp32 elsewhere (emulated bf16 is far slower)."""
    import torch

    from adaptprune.compat import cpu_has_native_bf16

    return "bf16" if torch.cuda.is_available() or cpu_has_native_bf16() else "no"


if __name__ == "__main__":
    main()
