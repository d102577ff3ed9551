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
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..checkpoint import load_model, load_tokenizer, meta_model, read_model_config, resolve_model_path
from ..compat import require_safetensors
from ..config import ConfigError, RunConfig, load_into, option, to_dict
from ..evaluation.perplexity import perplexity
from ..pruning.surgery import count_parameters, params_after_removing
from ..run.feasibility import check_reachable
from ..run.report import table_head
from ..run.run_data import heldout_texts, shared_calibration
from .base import METHODS, MethodContext, get_method

DEFAULT_METHODS = [
    "dense",
    "llm_pruner",
    "llm_pruner_lora",
    "flap",
    "slicegpt",
    "adaptprune_oneshot",
    "adaptprune_incremental",
]


@dataclass
class CompareConfig:
    run: RunConfig = field(default_factory=RunConfig)  # model, data, prune, schedule and train shared by every method
    remove_non_embedding: float = option(0.30, "fraction of non-embedding parameters every method removes", gt=0, lt=1)
    methods: list[str] = option(DEFAULT_METHODS, "methods to run, in table order (registry: adaptprune.methods)")
    tasks: list[str] = option(["piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa"], "lm-eval tasks")
    limit: int = option(0, "documents per task (0 = full validation sets)", min=0)
    out: str = option("runs/compare", "output folder")
    resume: bool = option(True, "reuse the rows of methods already finished in `out` by a run with the same settings")

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"methods={unknown} not known; choose from: {', '.join(METHODS)}")


SIZE_TOLERANCE = 0.005  # every pruned row lands within ±0.5% of the target

# Settings that do not change a method's row: rows computed under other values stay valid.
ROW_NEUTRAL_KEYS = ("methods", "out", "resume")


def load_compare_config(path: str | None, overrides: list[str] | None = None) -> CompareConfig:
    """Defaults, then the YAML, then ``key=value`` / ``run.section.key=value`` overrides."""
    return load_into(CompareConfig, path, overrides)


# ---- the harness ---------------------------------------------------------------------------
def run_compare(cfg: CompareConfig) -> list[dict]:
    out = Path(cfg.out)
    model_cfg = cfg.run.model
    target = compare_target(cfg)  # checked before anything is loaded or written
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model_cfg.tokenizer or model_cfg.name)
    calibration = shared_calibration(cfg.run, tokenizer)  # (N, L), the same for every method
    texts = heldout_texts(cfg.run, tokenizer)
    finished = finished_rows(cfg, target) if cfg.resume else {}
    rows = []
    for name in cfg.methods:
        if name in finished:
            print(f"[compare] {name}: reused from {out / 'comparison.json'} (resume=false recomputes)", flush=True)
            rows.append(finished[name])
            continue
        print(f"[compare] {name} ...", flush=True)
        ctx = MethodContext(cfg.run, target, calibration, out / f"{name.replace('+', '_')}_run")
        start = time.perf_counter()
        model = get_method(name)(load_model(model_cfg.name, dtype=model_cfg.dtype), ctx)
        rows.append(_evaluate(cfg, ctx, name, model, tokenizer, texts, time.perf_counter() - start))
        _write_json(cfg, _keeping_finished(rows, finished), target)
        del model
        gc.collect()
    write_outputs(cfg, rows, target, json_rows=_keeping_finished(rows, finished))
    return rows


def compare_target(cfg: CompareConfig) -> int:
    """The count every row lands on, from config.json on the meta device; ``ConfigError`` when adaptprune's
    floors (``run.prune``) cannot reach it or ``out`` is a file."""
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ConfigError(f"out={cfg.out!r} is a file; give a folder for the comparison")
    require_safetensors(resolve_model_path(cfg.run.model.name))
    model, adapter = meta_model(read_model_config(cfg.run.model)[0])
    target = params_after_removing(model, cfg.remove_non_embedding)
    if any(name.startswith("adaptprune") for name in cfg.methods):
        what = f"remove_non_embedding={cfg.remove_non_embedding:g}"
        check_reachable(model, adapter, cfg.run.prune, target, what)
    return target


def _keeping_finished(rows: list[dict], finished: dict[str, dict]) -> list[dict]:
    """``rows`` plus earlier finished rows not among them: a run of fewer methods loses none."""
    done = {r["method"] for r in rows}
    return rows + [r for method, r in finished.items() if method not in done]


def _row_settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ROW_NEUTRAL_KEYS}


def _config_dict(cfg: CompareConfig) -> dict:
    return to_dict(cfg)


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
        same = _row_settings(earlier["config"]) == _row_settings(_config_dict(cfg)) and earlier["target"] == target
        return {r["method"]: r for r in earlier["rows"]} if same else {}
    except (json.JSONDecodeError, KeyError, TypeError):
        print(f"[compare] {path} is unreadable; recomputing every method", flush=True)
        return {}


def _write_json(cfg: CompareConfig, rows: list[dict], target: int) -> None:
    """Written atomically after every method, so a crash never leaves half a file."""
    path = Path(cfg.out) / "comparison.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps({"config": _config_dict(cfg), "target": target, "rows": rows}, indent=1), encoding="utf-8"
    )
    os.replace(tmp, path)


def _evaluate(cfg: CompareConfig, ctx: MethodContext, method: str, model: nn.Module, tokenizer, texts, seconds) -> dict:
    from ..evaluation.tasks import run_tasks

    model.eval()
    start = time.perf_counter()
    context = min(cfg.run.data.eval_context, getattr(model.config, "max_position_embeddings", 10**9))
    ppl = {name: perplexity(model, tokens, context=context) for name, tokens in texts.items()}
    tasks = run_tasks(model, tokenizer, cfg.tasks, limit=cfg.limit or None) if cfg.tasks else {}
    phases = ctx.profile.as_dict()
    first = next(iter(ppl.values()))
    row = {
        "method": method,
        "params": count_parameters(model),
        "ppl": first.ppl,
        "ppl_tokens": first.tokens,
        "ppl_by_text": {name: result.ppl for name, result in ppl.items()},
        "tasks": tasks,
        "prune_seconds": sum(p["seconds"] for n, p in phases.items() if "prune" in n),
        "method_seconds": round(seconds, 1),
        "eval_seconds": round(time.perf_counter() - start, 1),
        "train_tokens": ctx.train_tokens,
        "peak_rss_mb": max((p["peak_rss_mb"] for p in phases.values()), default=None),
    }
    shown = ", ".join(f"{name} {value:.2f}" for name, value in row["ppl_by_text"].items())
    print(f"[compare] {method}: {row['params']:,} params, ppl {shown}", flush=True)
    if method != "dense" and abs(row["params"] / ctx.target - 1) > SIZE_TOLERANCE:
        print(  # e.g. a prune.target_shape whose size is not the comparison's: the row is not a fair one
            f"[compare] warning: {method} has {row['params']:,} parameters, outside ±{SIZE_TOLERANCE:.1%} of the "
            f"target {ctx.target:,}; its row is not at equal size",
            flush=True,
        )
    return row


def write_outputs(cfg: CompareConfig, rows: list[dict], target: int, json_rows: list[dict] | None = None) -> None:
    """The table and plot of ``rows``; the JSON holds ``json_rows`` (default: the same rows)."""
    out = Path(cfg.out)
    _write_json(cfg, rows if json_rows is None else json_rows, target)
    (out / "comparison.md").write_text(comparison_table(cfg, rows, target) + "\n", encoding="utf-8")
    plot_comparison(rows, out / "comparison.png")


def comparison_table(cfg: CompareConfig, rows: list[dict], target: int) -> str:
    tasks, data = cfg.tasks, cfg.run.data
    texts = list(rows[0].get("ppl_by_text", {})) if rows else []
    head = ["method", "params", *(f"ppl {t}" for t in texts)]
    for t in tasks:
        head += [f"{t} acc", f"{t} acc_norm"]
    head += ["prune s", "train tokens", "peak RSS MB"]
    lines = table_head(head)
    for r in rows:
        by_text = r.get("ppl_by_text", {})
        cells = [r["method"], f"{r['params']:,}", *(_num(by_text.get(t), ".2f") for t in texts)]
        for t in tasks:
            m = r["tasks"].get(t, {})
            cells += [_num(m.get("acc")), _num(m.get("acc_norm"))]
        cells += [f"{r['prune_seconds']:.0f}", f"{r['train_tokens']:,}", _num(r["peak_rss_mb"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    limit = f"first {cfg.limit} documents of each validation set" if cfg.limit else "full validation sets"
    lines += [
        "",
        f"Target: {target:,} parameters ({cfg.remove_non_embedding:.0%} of the non-embedding parameters "
        f"removed; every pruned row within ±0.5%). Held-out perplexity on {data.eval_tokens:,} tokens of each "
        f"text's held-out split at context {data.eval_context} ('{data.corpus}' is the calibration and training "
        f"domain); tasks: lm-eval, {limit}; training methods get {cfg.run.schedule.train_tokens:,} tokens of the "
        f"train split with trainer '{cfg.run.train.trainer}'. Peak RSS: the compare process's resident memory "
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
