"""``adaptprune compare``: dense, the baselines and adaptprune side by side, one protocol.

Every method starts from the same dense model, uses the same calibration text (the train
split), is scored on the same held-out text at one stated context length and on the same
lm-eval tasks, lands on the same parameter count (±0.5%) and, where it trains, gets the same
number of training tokens. Writes ``comparison.md``, ``comparison.json`` and ``comparison.png``.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_model, load_tokenizer
from .config import ConfigError, PruneConfig, _f, from_dict, load_config
from .data import load_corpus, pack, token_stream
from .evaluation.perplexity import perplexity
from .profiling import Profile
from .surgery import count_parameters, params_after_removing

TRAIN_BATCH = 4  # sequences per step for every method that trains (the controller's default too)
METHODS = ("dense", "llm_pruner", "llm_pruner_lora", "flap", "slicegpt", "adaptprune_oneshot", "adaptprune_incremental")


@dataclass
class CompareConfig:
    model: str = _f("smollm2-135m", "model every method starts from")
    corpus: str = _f("shakespeare", "calibration/training text (train split) and held-out text")
    remove_non_embedding: float = _f(0.30, "fraction of non-embedding parameters every method removes", gt=0, lt=1)
    methods: list[str] = _f(list(METHODS), "methods to run, in table order")
    calib_tokens: int = _f(8192, "calibration tokens (LLM-Pruner uses its own 10 x 64 of them)", min=64)
    seq_len: int = _f(256, "calibration and training sequence length", min=8)
    train_tokens: int = _f(16384, "training tokens for every method that trains", min=0)
    eval_tokens: int = _f(4096, "held-out tokens for perplexity", min=16)
    eval_context: int = _f(1024, "perplexity context length", min=8)
    tasks: list[str] = _f(["piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa"], "lm-eval tasks")
    limit: int = _f(0, "documents per task (0 = full validation sets)", min=0)
    out: str = _f("runs/compare", "output folder")
    resume: bool = _f(True, "reuse the rows of methods already finished in `out` by a run with the same settings")


# Settings that do not change a method's row: rows computed under other values stay valid.
ROW_NEUTRAL_KEYS = ("methods", "out", "resume")


def load_compare_config(path: str | None, overrides: list[str] | None = None) -> CompareConfig:
    import yaml

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) if path else {}
    for item in overrides or []:
        key, _, raw = item.partition("=")
        data[key] = yaml.safe_load(raw)
    cfg = from_dict(CompareConfig, data or {})
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"methods={unknown} not known; choose from: {', '.join(METHODS)}")
    return cfg


@dataclass
class Context:
    cfg: CompareConfig
    tokenizer: object
    calib: torch.Tensor  # (N, L) from the train split
    train_stream: torch.Tensor
    heldout: torch.Tensor
    target: int
    profile: Profile = field(default_factory=Profile)
    train_tokens: int = 0


# ---- methods: each returns the pruned (and maybe trained) model -----------------------------
def _dense(ctx: Context, model: nn.Module) -> nn.Module:
    return model


def _llm_pruner(ctx: Context, model: nn.Module) -> nn.Module:
    from .baselines.llm_pruner import CALIB_SAMPLES, CALIB_TOKENS, llm_pruner_prune

    samples = pack(ctx.train_stream, CALIB_TOKENS, CALIB_SAMPLES)
    with ctx.profile.phase("prune"):
        llm_pruner_prune(model, samples, ctx.target, progress=False)
    return model


def _llm_pruner_lora(ctx: Context, model: nn.Module) -> nn.Module:
    from .baselines.llm_pruner import LLM_PRUNER_LORA

    model = _llm_pruner(ctx, model)
    # Published recipe (r=8, alpha 16, dropout 0.05, all projections, lr 1e-4), but one micro-batch
    # per step: at a CPU-sized token budget its 64-sequence batches would leave one or two steps.
    return _train(ctx, model, "lora", LLM_PRUNER_LORA.trainer_config(grad_accum_steps=1), LLM_PRUNER_LORA.lr)


def _flap(ctx: Context, model: nn.Module) -> nn.Module:
    from .baselines.flap import flap_prune

    with ctx.profile.phase("prune"):
        flap_prune(model, ctx.calib, ctx.target, progress=False)
    return model


def _slicegpt(ctx: Context, model: nn.Module) -> nn.Module:
    from .baselines.slicegpt import slice_to_params

    with ctx.profile.phase("prune"):
        # The head is sliced too: at equal parameters that is SliceGPT's better setting here.
        return slice_to_params(model, ctx.calib, ctx.target, slice_head=True, progress=False)


def _adaptprune_oneshot(ctx: Context, model: nn.Module) -> nn.Module:
    from .pruning import prune_step

    with ctx.profile.phase("prune"):
        prune_step(model, ctx.calib, ctx.target, PruneConfig(), progress=False)
    return model


def _adaptprune_incremental(ctx: Context, model: nn.Module) -> nn.Module:
    from .controller import Controller

    del model  # the controller loads its own copy
    gc.collect()
    out = Path(ctx.cfg.out) / "incremental_run"
    config = load_config(
        None,
        [
            f"model.name={ctx.cfg.model}",
            f"data.corpus={ctx.cfg.corpus}",
            f"data.seq_len={ctx.cfg.seq_len}",
            f"prune.target_params={ctx.target}",
            f"schedule.train_tokens={ctx.cfg.train_tokens}",
            f"train.batch_size={TRAIN_BATCH}",
            "eval.every_stage=false",
            "output.tensorboard=false",
            f"output.dir={out}",
        ],
    )
    with ctx.profile.phase("prune+train"):
        results = Controller(config).run(resume=(out / "checkpoints").exists())
    ctx.train_tokens = results["history"][-1]["train_tokens"]
    return load_model(str(out / "final"))


def _train(ctx: Context, model: nn.Module, trainer_name: str, trainer_config, lr: float) -> nn.Module:
    from accelerate import Accelerator

    from trainers import get_trainer

    from .schedule import lr_at

    acc = Accelerator(cpu=not torch.cuda.is_available())
    steps = ctx.cfg.train_tokens // (TRAIN_BATCH * ctx.cfg.seq_len * trainer_config.grad_accum_steps)
    if steps == 0:
        return model
    trainer = get_trainer(trainer_name)(model, acc, trainer_config)
    sequences = pack(ctx.train_stream, ctx.cfg.seq_len)
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(0))
    batches = _batches_of(sequences, order, TRAIN_BATCH)
    with ctx.profile.phase("train"):
        result = trainer.run_phase(batches, steps, lambda s: lr_at(s, steps, lr), 0)
    ctx.train_tokens = result.tokens
    return trainer.export_model()


def _batches_of(sequences: torch.Tensor, order: torch.Tensor, batch: int):
    """Endless batches in a fixed shuffled order (the same for every method that trains)."""
    i = 0
    while True:
        idx = torch.stack([order[(i + k) % len(order)] for k in range(batch)])
        yield sequences[idx]
        i += batch


RUNNERS: dict[str, Callable[[Context, nn.Module], nn.Module]] = {
    "dense": _dense,
    "llm_pruner": _llm_pruner,
    "llm_pruner_lora": _llm_pruner_lora,
    "flap": _flap,
    "slicegpt": _slicegpt,
    "adaptprune_oneshot": _adaptprune_oneshot,
    "adaptprune_incremental": _adaptprune_incremental,
}


# ---- the harness ---------------------------------------------------------------------------
def run_compare(cfg: CompareConfig) -> list[dict]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.model)
    corpus = load_corpus(cfg.corpus)
    train_stream = token_stream(corpus["train"], tokenizer)
    dense = load_model(cfg.model)
    target = params_after_removing(dense, cfg.remove_non_embedding)
    del dense
    base = Context(
        cfg,
        tokenizer,
        pack(train_stream, cfg.seq_len, max(1, cfg.calib_tokens // cfg.seq_len)),
        train_stream,
        token_stream(corpus["heldout"], tokenizer, cfg.eval_tokens),
        target,
    )
    finished = finished_rows(cfg, target) if cfg.resume else {}
    rows = []
    for method in cfg.methods:
        if method in finished:
            print(f"[compare] {method}: reused from {out / 'comparison.json'} (resume=false recomputes)", flush=True)
            rows.append(finished[method])
            continue
        print(f"[compare] {method} ...", flush=True)
        ctx = Context(**{**base.__dict__, "profile": Profile(), "train_tokens": 0})
        start = time.perf_counter()
        model = RUNNERS[method](ctx, load_model(cfg.model))
        rows.append(_evaluate(ctx, method, model, time.perf_counter() - start))
        _write_json(cfg, _keeping_finished(rows, finished), target)
        del model
        gc.collect()
    write_outputs(cfg, rows, target, json_rows=_keeping_finished(rows, finished))
    return rows


def _keeping_finished(rows: list[dict], finished: dict[str, dict]) -> list[dict]:
    """``rows`` plus earlier finished rows not among them: a run of fewer methods loses none."""
    done = {r["method"] for r in rows}
    return rows + [r for method, r in finished.items() if method not in done]


def _row_settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ROW_NEUTRAL_KEYS}


def finished_rows(cfg: CompareConfig, target: int) -> dict[str, dict]:
    """Rows an earlier run in ``cfg.out`` finished under the same settings, by method.

    A crash or Ctrl-C then costs only the method that was running. Rows from a run with other
    settings (model, size, tokens, tasks, limit, ...) are ignored, never mixed into one table.
    """
    path = Path(cfg.out) / "comparison.json"
    if not path.exists():
        return {}
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        same = _row_settings(earlier["config"]) == _row_settings(cfg.__dict__) and earlier["target"] == target
        return {r["method"]: r for r in earlier["rows"]} if same else {}
    except (json.JSONDecodeError, KeyError, TypeError):
        print(f"[compare] {path} is unreadable; recomputing every method", flush=True)
        return {}


def _write_json(cfg: CompareConfig, rows: list[dict], target: int) -> None:
    """Written atomically after every method, so a crash never leaves half a file."""
    path = Path(cfg.out) / "comparison.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"config": cfg.__dict__, "target": target, "rows": rows}, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _evaluate(ctx: Context, method: str, model: nn.Module, seconds: float) -> dict:
    from .evaluation.tasks import run_tasks

    model.eval()
    start = time.perf_counter()
    context = min(ctx.cfg.eval_context, getattr(model.config, "max_position_embeddings", 10**9))
    ppl = perplexity(model, ctx.heldout, context=context)
    tasks = run_tasks(model, ctx.tokenizer, ctx.cfg.tasks, limit=ctx.cfg.limit or None) if ctx.cfg.tasks else {}
    phases = ctx.profile.as_dict()
    row = {
        "method": method,
        "params": count_parameters(model),
        "ppl": ppl.ppl,
        "ppl_tokens": ppl.tokens,
        "tasks": tasks,
        "prune_seconds": sum(p["seconds"] for n, p in phases.items() if "prune" in n),
        "method_seconds": round(seconds, 1),
        "eval_seconds": round(time.perf_counter() - start, 1),
        "train_tokens": ctx.train_tokens,
        "peak_rss_mb": max((p["peak_rss_mb"] for p in phases.values()), default=None),
    }
    print(f"[compare] {method}: {row['params']:,} params, ppl {row['ppl']:.2f}", flush=True)
    return row


def write_outputs(cfg: CompareConfig, rows: list[dict], target: int, json_rows: list[dict] | None = None) -> None:
    """The table and plot of ``rows``; the JSON holds ``json_rows`` (default: the same rows)."""
    out = Path(cfg.out)
    _write_json(cfg, rows if json_rows is None else json_rows, target)
    (out / "comparison.md").write_text(comparison_table(cfg, rows, target) + "\n", encoding="utf-8")
    plot_comparison(rows, out / "comparison.png")


def comparison_table(cfg: CompareConfig, rows: list[dict], target: int) -> str:
    tasks = cfg.tasks
    head = ["method", "params", f"ppl (ctx {cfg.eval_context})"]
    for t in tasks:
        head += [f"{t} acc", f"{t} acc_norm"]
    head += ["prune s", "train tokens", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [r["method"], f"{r['params']:,}", f"{r['ppl']:.2f}"]
        for t in tasks:
            m = r["tasks"].get(t, {})
            cells += [_num(m.get("acc")), _num(m.get("acc_norm"))]
        cells += [f"{r['prune_seconds']:.0f}", f"{r['train_tokens']:,}", _num(r["peak_rss_mb"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    limit = f"first {cfg.limit} documents of each validation set" if cfg.limit else "full validation sets"
    lines += [
        "",
        f"Target: {target:,} parameters ({cfg.remove_non_embedding:.0%} of the non-embedding parameters "
        f"removed; every pruned row within ±0.5%). Held-out perplexity on {cfg.eval_tokens:,} tokens of "
        f"'{cfg.corpus}' held-out text; tasks: lm-eval, {limit}; training methods get "
        f"{cfg.train_tokens:,} tokens of the train split. Peak RSS: the compare process's resident memory "
        f"during the method's prune/train phases; one process runs every method in turn, so memory that "
        f"libraries kept from earlier methods counts too (use `adaptprune prune` for a clean figure).",
    ]
    return "\n".join(lines)


def _num(value, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def plot_comparison(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, (ax_ppl, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_ppl.barh(names, [r["ppl"] for r in rows], color="#3a7bd5")
    ax_ppl.set_xscale("log")
    ax_ppl.set_xlabel("held-out perplexity (log scale, lower is better)")
    for y, value in enumerate(r["ppl"] for r in rows):
        ax_ppl.text(value, y, f" {value:.1f}", va="center", fontsize=9)
    ax_ppl.invert_yaxis()
    mean_acc = [sum(m["acc"] for m in r["tasks"].values()) / len(r["tasks"]) if r["tasks"] else 0.0 for r in rows]
    ax_acc.barh(names, mean_acc, color="#2a9d8f")
    if any(mean_acc):  # a zoomed axis with printed values: the methods differ by a few points
        ax_acc.set_xlim(max(0.0, min(mean_acc) - 0.05), max(mean_acc) + 0.03)
        for y, value in enumerate(mean_acc):
            ax_acc.text(value, y, f" {value:.3f}", va="center", fontsize=9)
    ax_acc.set_xlabel("mean zero-shot accuracy (higher is better; zoomed)")
    ax_acc.invert_yaxis()
    fig.suptitle("Equal parameter count, equal training tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
