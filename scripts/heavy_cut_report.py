"""The −60% table (issue #22): every schedule of ``docs/budget.json``'s heavy-cut grid at one budget.

Reads the rows ``scripts/bench_budget.py`` wrote at the cut users make (60% of SmolLM2-135M's
non-embedding parameters removed), at one training budget (default 32,768 tokens) and seed 0, and
the final shape of each from its run folder's ``plan.json`` (kept layers, residual channels, KV
groups and neurons per layer). Writes ``heavy_cut.md``, ``heavy_cut.json`` and ``heavy_cut.png``;
ratios are against FLAP + the same distillation and against the best baseline on each text (the lowest
perplexity among FLAP, LLM-Pruner, SliceGPT and Adapt-Pruner, as published or + the same distillation).

    python scripts/heavy_cut_report.py --budget 32768 --runs runs/budget60 --out docs/heavy_cut

Zero-shot columns come from ``--tasks-json``; ``--collect-tasks DIR`` first rewrites it from DIR's
``adaptprune eval MODEL --tasks piqa,arc_easy --limit N --out DIR/<schedule or dense>.json`` files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from budget_report import VERDICT_END, VERDICT_PLACEHOLDER, VERDICT_START, earlier_verdict
from measured import PROBED_60

from adaptprune.run.report import table_head, write_markdown_and_json

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "flap+train-distill"
WHAT = {  # schedule -> what it changes against the default incremental run
    "flap+train-distill": "FLAP one-shot, then the same distillation",
    "oneshot+train-distill": "adaptprune one-shot, then the same distillation",
    "oneshot+train-distill-ls": "the same, least-squares compensation",
    "incremental-distill": "incremental: units, adaptive, mean compensation (the defaults before this stop)",
    "incremental-distill-shape": "+ target shape (walk)",
    "incremental-distill-ls": "+ least-squares compensation (the default since #23)",
    "incremental-distill-shape-ls": "+ least squares + target shape 22x576x2x768",
    "incremental-distill-shape30-ls": "+ least squares + target shape 30x576x2x480",
    "incremental-distill-shape30-ls-accumulating": "+ least squares + target shape 30x576x2x480 + accumulating "
    "(re-scored in the walk's inner steps)",
    "incremental-distill-shape30-ls-uniform": "+ least squares + target shape 30x576x2x480, uniform (plain llama)",
    "incremental-distill-search-ls-accumulating": "+ least squares + accumulating + target shape searched "
    "before stage 1 (prune.target_shape=search)",
    **{f"incremental-distill-shape{text}-ls": f"+ least squares + target shape {text}" for text in PROBED_60},
    "incremental-distill-ls-alldims": "+ least squares + hidden and layers (per-step search)",
    "incremental-distill-ls-accumulating": "+ least squares + accumulating allocation (2% inner re-scoring), "
    "every layer rebuilt from the statistics before the step (prune.calibration=parallel)",
    "incremental-distill-ls-accumulating-sequential-self": "the same, layers rebuilt in order on the pruned model's "
    "inputs (prune.calibration=sequential: the default since 3ec367e)",
    "incremental-distill-ls-accumulating-sequential-dense": "the same, sequential, rebuilt towards the layers as "
    "they were (prune.rebuild_target=dense)",
    "incremental-distill-ls-accumulating-coarse": "+ least squares + accumulating, 5% inner steps",
    "incremental-distill-ls-accumulating-alldims": "+ least squares + accumulating + hidden and layers",
    "adapt-pruner-distill": "Adapt-Pruner as published (Taylor 512x64, 2% steps, no compensation)",
    "llm-pruner+lora": "LLM-Pruner as published: one-shot, its LoRA recovery (LM loss, r 8, lr 1e-4) on the same "
    "tokens and batches",
    "llm-pruner+train-distill": "LLM-Pruner one-shot, then the same distillation",
    "slicegpt": "SliceGPT as published: one-shot slicing (head sliced too), no training",
    "slicegpt+train-distill": "SliceGPT one-shot, then the same distillation",
}
# The methods users compare against, as published or + the same distillation: the rows the best baseline is from.
BASELINES = (
    "flap+train-distill",
    "llm-pruner+lora",
    "llm-pruner+train-distill",
    "slicegpt",
    "slicegpt+train-distill",
    "adapt-pruner-distill",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-json", default=str(ROOT / "docs" / "budget.json"))
    p.add_argument("--budget", type=int, default=32768, help="training tokens of the rows to show")
    p.add_argument("--remove", type=float, default=0.6, help="the grid's cut")
    p.add_argument("--runs", default=str(ROOT / "runs" / "budget60"), help="run folders (for plan.json shapes)")
    p.add_argument("--out", default=str(ROOT / "docs" / "heavy_cut"))
    p.add_argument(
        "--tasks-json",
        default=str(ROOT / "docs" / "heavy_cut_tasks.json"),
        help="zero-shot results by schedule ({'limit': N, 'rows': {schedule or 'dense': {task: metrics}}})",
    )
    p.add_argument("--collect-tasks", help="folder of `adaptprune eval --out` files named <schedule or dense>.json")
    return p.parse_args(argv)


TASKS = {"piqa": "PIQA", "arc_easy": "ARC-E"}  # acc_norm columns, where measured


def final_shape(plan: dict, config: dict | None = None) -> dict:
    """Layers, hidden, KV groups and neurons per layer ([min, max]) from a run's ``plan.json``; a sliced
    model (SliceGPT) keeps every unit, and its residual widths come from the final model's ``slice_dims``."""
    layers = [v for k, v in plan.items() if k.isdigit()]
    groups = [len(v["attention"]) for v in layers if "attention" in v]
    neurons = [len(v["mlp"]) for v in layers if "mlp" in v]
    widths = (config or {}).get("slice_dims")
    hidden = [min(widths), max(widths)] if widths else len(plan["hidden"]) if "hidden" in plan else None
    return {
        "layers": len(plan["layers"]) if "layers" in plan else None,
        "hidden": hidden,
        "kv_groups": [min(groups), max(groups)] if groups else None,
        "neurons": [min(neurons), max(neurons)] if neurons else None,
    }


def _span(pair, default: str = "all") -> str:
    if not pair:
        return default
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}–{pair[1]}"


def rows_at(grid: dict, budget: int, runs: Path, earlier: dict[str, dict]) -> list[dict]:
    """The grid's rows at ``budget``, seed 0, with their final shapes (from the run folders, else the
    shapes an earlier report recorded: run folders are not kept in the repository)."""
    chosen = [r for r in grid["rows"] if r["budget"] == budget and r["seed"] == 0]
    order = list(WHAT)
    chosen.sort(key=lambda r: order.index(r["schedule"]) if r["schedule"] in order else len(order))
    for row in chosen:
        folder = runs / f"{row['schedule'].replace('+', '_')}-b{budget}-s0"
        plan, config = folder / "plan.json", folder / "final" / "config.json"
        if plan.exists():
            row["shape"] = final_shape(json.loads(plan.read_text()), _read(config))
        else:
            row["shape"] = earlier.get(row["schedule"])
    return chosen


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def best_baselines(rows: list[dict], texts: list[str]) -> dict[str, dict]:
    """Per text, the baseline row with the lowest perplexity (none measured: no entry)."""
    measured = [r for r in rows if r["schedule"] in BASELINES]
    return {t: min(measured, key=lambda r: r["ppl"][t]) for t in texts} if measured else {}


def earlier_shapes(earlier: dict) -> dict[str, dict]:
    return {r["schedule"]: r.get("shape") for r in earlier.get("rows", [])}


def collect_tasks(folder: Path) -> dict:
    """``--tasks-json``'s content from ``adaptprune eval`` outputs, one per schedule (all at one limit)."""
    found = {f.stem: json.loads(f.read_text(encoding="utf-8")) for f in sorted(folder.glob("*.json"))}
    if not found:
        raise SystemExit(f"no <schedule>.json files from `adaptprune eval --out` in {folder}")
    limits = {r["task_limit"] for r in found.values()}
    if len(limits) != 1:
        raise SystemExit(f"the files in {folder} were evaluated at different --limit values: {sorted(limits)}")
    (limit,) = limits
    source = (
        f"each row's kept model with `adaptprune eval MODEL --tasks piqa,arc_easy --limit {limit} --out "
        f"{folder}/<schedule>.json`, collected by `python scripts/heavy_cut_report.py --collect-tasks {folder}`"
    )
    return {"limit": limit, "source": source, "rows": {name: r["tasks"] for name, r in found.items()}}


def task_cells(measured: dict, schedule: str) -> list[str]:
    metrics = measured.get("rows", {}).get(schedule, {})
    return [f"{metrics[t]['acc_norm']:.3f}" if t in metrics else "-" for t in TASKS]


def markdown(grid: dict, rows: list[dict], budget: int, verdict: str, measured: dict, choice: dict | None) -> str:
    texts = grid["texts"]
    base = next((r for r in rows if r["schedule"] == BASELINE), None)
    best = best_baselines(rows, texts)
    head = ["schedule", "what it changes", "params", "layers", "hidden", "KV groups", "neurons"]
    head += [f"ppl {t}" for t in texts] + [f"× FLAP {t}" for t in texts] + [f"× best baseline {t}" for t in texts]
    head += [f"{name} acc_norm" for name in TASKS.values()] if measured else []
    head += ["prune s", "wall s"]
    lines = [
        f"# SmolLM2-135M at −{grid['settings']['remove_fraction']:.0%} of its non-embedding parameters, "
        f"{budget:,} distillation tokens",
        "",
        f"{grid['model']}: {grid['original_params']:,} → at most {grid['target_params']:,} parameters (±0.5%). Every "
        f"row is one `Controller` run of `{grid['settings']['config']}` with the same data order, learning-rate "
        "curve, seed and tokens, recovering by distillation from the dense model (`train.trainer=distill`, "
        "kd_weight 1), except the two baselines as published: LLM-Pruner with its own LoRA recovery (LM loss) on "
        "the same tokens and batches, and SliceGPT untrained; held-out perplexity at context "
        f"{grid['eval_context']} on "
        + ", ".join(f"{t} ({grid['text_tokens'][t]:,} tokens)" for t in texts)
        + ". Shapes from each run's `plan.json` (`all`: none removed; a sliced model's residual width from its "
        "`slice_dims`). Produced by `python scripts/bench_budget.py` (commands in the README) and "
        "`python scripts/heavy_cut_report.py`.",
        "",
        *_best_note(best),
        *_tasks_note(measured),
        *table_head(head, left=2),
    ]
    for r in rows:
        s = r.get("shape") or {}
        ratio = [f"{r['ppl'][t] / base['ppl'][t]:.3f}" if base else "-" for t in texts]
        ratio += [f"{r['ppl'][t] / best[t]['ppl'][t]:.3f}" if best else "-" for t in texts]
        cells = [r["schedule"], WHAT.get(r["schedule"], ""), f"{r['params']:,}", str(s.get("layers") or 30)]
        cells += [_span(_pair(s.get("hidden")), "576"), _span(s.get("kv_groups")), _span(s.get("neurons"))]
        cells += [f"{r['ppl'][t]:.2f}" for t in texts] + ratio
        cells += task_cells(measured, r["schedule"]) if measured else []
        cells += [f"{r['prune_seconds']:.0f}", f"{r['wall_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += search_section(choice, rows, texts)
    lines += ["", "## Reading", "", VERDICT_START, verdict, VERDICT_END]
    return "\n".join(lines)


def _pair(value) -> list[int] | None:
    """A width as [min, max]: a count from ``plan.json`` is one width, a sliced model's is a span."""
    return [value, value] if isinstance(value, int) else value


def _best_note(best: dict[str, dict]) -> list[str]:
    if not best:
        return []
    named = ", ".join(f"{t}: `{r['schedule']}` ({r['ppl'][t]:.2f})" for t, r in best.items())
    return [f"Best baseline (lowest perplexity among {', '.join(f'`{b}`' for b in BASELINES)}): {named}.", ""]


def _tasks_note(measured: dict) -> list[str]:
    if not measured:
        return []
    dense = ", ".join(f"{name} {cell}" for name, cell in zip(TASKS.values(), task_cells(measured, "dense")))
    return [
        f"Zero-shot: acc_norm on the first {measured['limit']} documents of each task (offline lm-eval; `-`: not "
        f"measured; {measured['source']}). Dense SmolLM2-135M: {dense}.",
        "",
    ]


SEARCH_ROW = "incremental-distill-search-ls-accumulating"


def trained_schedule(shape: dict) -> str:
    """The walk row (least squares, adaptive) that trained a candidate of the search to 32,768 tokens."""
    text = f"{shape['layers']}x{shape['hidden']}x{shape['groups']}x{shape['neurons']}"
    return "incremental-distill-shape30-ls" if text == "30x576x2x480" else f"incremental-distill-shape{text}-ls"


def search_choice(runs: Path, budget: int, earlier: dict | None) -> dict | None:
    """The search row's ``shape_choice`` (its run folder's results.json, else what the last report kept)."""
    results = runs / f"{SEARCH_ROW}-b{budget}-s0" / "results.json"
    if results.exists():
        return json.loads(results.read_text(encoding="utf-8")).get("shape_choice")
    return earlier


def ranks(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    return [order.index(i) + 1 for i in range(len(values))]


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (no ties expected among losses and perplexities)."""
    n, ra, rb = len(a), ranks(a), ranks(b)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def search_section(choice: dict | None, rows: list[dict], texts: list[str]) -> list[str]:
    """Every candidate's probe loss beside its perplexity after the same training, where trained."""
    if not choice:
        return []
    by_schedule = {r["schedule"]: r for r in rows}
    pairs = [(c, by_schedule.get(trained_schedule(c["shape"]))) for c in choice["rows"]]
    lines = [
        "",
        "## Does the search rank shapes as training does?",
        "",
        f"`{SEARCH_ROW}` probed these candidates before stage 1 (mean LM loss on {choice['probe_tokens']:,} "
        "training-split tokens after one one-shot cut each); each was also walked to and trained "
        "(least squares, adaptive allocation, the same 32,768 tokens; `-`: not trained).",
        "",
        *table_head(["shape", "params", "probe loss", *[f"ppl {t}" for t in texts]], left=1),
    ]
    for c, trained in sorted(pairs, key=lambda pair: pair[0]["loss"]):
        s = c["shape"]
        cells = [
            f"{s['layers']} × {s['hidden']} × {s['groups']} × {s['neurons']}",
            f"{c['params']:,}",
            f"{c['loss']:.4f}",
        ]
        cells += [f"{trained['ppl'][t]:.2f}" if trained else "-" for t in texts]
        lines.append("| " + " | ".join(cells) + " |")
    done = [(c["loss"], trained) for c, trained in pairs if trained]
    if len(done) >= 3:
        rho = {t: spearman([loss for loss, _ in done], [r["ppl"][t] for _, r in done]) for t in texts}
        lines += ["", f"Spearman rank correlation, probe loss vs trained perplexity ({len(done)} shapes): "
                  + ", ".join(f"{t} {v:+.2f}" for t, v in rho.items()) + "."]  # fmt: skip
    return lines


def plot(rows: list[dict], texts: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 0.5 * len(rows) + 1.5), squeeze=False)
    names = [r["schedule"] for r in rows]
    for ax, text in zip(axes[0], texts):
        values = [r["ppl"][text] for r in rows]
        ax.barh(names, values, color=["#999999" if n == BASELINE else "#3a7bd5" for n in names])
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"held-out perplexity on {text} (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    saved = json.loads(Path(args.budget_json).read_text(encoding="utf-8"))
    grid = next(g for g in saved["grids"] if g["settings"]["remove_fraction"] == args.remove)
    out = Path(args.out)
    saved_json = out.with_suffix(".json")
    earlier = json.loads(saved_json.read_text(encoding="utf-8")) if saved_json.exists() else {}  # the last report
    rows = rows_at(grid, args.budget, Path(args.runs), earlier_shapes(earlier))
    tasks_path = Path(args.tasks_json)
    if args.collect_tasks:
        tasks_path.write_text(json.dumps(collect_tasks(Path(args.collect_tasks)), indent=1) + "\n", encoding="utf-8")
    measured = json.loads(tasks_path.read_text(encoding="utf-8")) if tasks_path.exists() else {}
    md = out.with_suffix(".md")
    verdict = earlier_verdict(md) if md.exists() else VERDICT_PLACEHOLDER
    payload = {"budget": args.budget, "target_params": grid["target_params"], "texts": grid["texts"], "rows": rows}
    payload["tasks"] = measured
    payload["search"] = search_choice(Path(args.runs), args.budget, earlier.get("search"))
    write_markdown_and_json(out, markdown(grid, rows, args.budget, verdict, measured, payload["search"]), payload)
    plot(rows, grid["texts"], out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
