"""``budget.md`` and ``budget.png`` from the rows of ``scripts/bench_budget.py`` (issue #16).

Kept apart from the runner so the report can be rebuilt from ``budget.json`` alone
(``bench_budget.py --render-only``). The hand-written verdict between the two markers survives
every rewrite. Where a budget has several seeds, a value is their mean and ``±`` is half their
range (with two seeds: the distance of each from the mean).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from adaptprune.report import table_head

VERDICT_START = "<!-- verdict: written by hand after the full run; kept when this file is rewritten -->"
VERDICT_END = "<!-- end of verdict -->"
VERDICT_PLACEHOLDER = "_To be written after the full run: does incremental beat one-shot + train, at which budgets?_"
SHARE_GOAL = 0.05  # pruning share of wall time the project aims at
FAMILIES = {  # pruning -> {objective: schedule}: the rows that differ only in the recovery objective
    "incremental": {"lm": "incremental", "distill": "incremental-distill", "mix": "incremental-mix"},
    "oneshot": {"lm": "oneshot+train", "distill": "oneshot+train-distill", "mix": "oneshot+train-mix"},
}


def write_report(payload: dict, out: Path) -> None:
    """Write ``budget.md`` (keeping an earlier verdict) and ``budget.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md = out / "budget.md"
    verdict = earlier_verdict(md) if md.exists() else VERDICT_PLACEHOLDER
    md.write_text(render_markdown(payload, verdict) + "\n", encoding="utf-8")
    if payload["rows"]:
        plot(payload, out / "budget.png")


def earlier_verdict(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if VERDICT_START not in text or VERDICT_END not in text:
        return VERDICT_PLACEHOLDER
    return text.split(VERDICT_START, 1)[1].split(VERDICT_END, 1)[0].strip() or VERDICT_PLACEHOLDER


# ---- grouping ------------------------------------------------------------------------------
def grouped(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """{(schedule, budget): rows of every seed}."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["schedule"], row["budget"])].append(row)
    return groups


def mean_ppl(group: list[dict], text: str) -> float:
    return statistics.fmean(r["ppl"][text] for r in group)


def cell(values: list[float], spec: str = ".2f") -> str:
    """``mean`` or ``mean ± half range`` over seeds; ``-`` when there is nothing."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return format(mean, spec)
    return f"{format(mean, spec)} ± {format((max(values) - min(values)) / 2, spec)}"


def _num(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


# ---- sections ------------------------------------------------------------------------------
def render_markdown(payload: dict, verdict: str) -> str:
    rows, texts = payload["rows"], payload["texts"]
    budgets = sorted({r["budget"] for r in rows})
    schedules = list(dict.fromkeys(r["schedule"] for r in rows))
    groups = grouped(rows)
    parts = [header(payload, budgets)]
    for text in texts:
        parts.append(ppl_table(groups, schedules, budgets, text))
    parts += [
        ratio_section(groups, budgets, texts),
        objective_section(groups, budgets, texts),
        wall_section(groups, texts),
        share_section(groups, schedules, budgets),
        details_table(payload, texts),
        f"## Verdict\n\n{VERDICT_START}\n{verdict}\n{VERDICT_END}",
    ]
    return "\n\n".join(parts)


def header(payload: dict, budgets: list[int]) -> str:
    s, rows = payload["settings"], payload["rows"]
    seeds = ", ".join(str(seed) for seed in sorted({r["seed"] for r in rows}))
    texts = ", ".join(f"{name} ({payload['text_tokens'][name]:,} tokens)" for name in payload["texts"])
    removed = s["remove_fraction"]
    limit = f"first {s['task_limit']} documents" if s["task_limit"] else "full validation sets"
    example = "**Format example from `--quick` (a tiny random model): the numbers mean nothing.**\n\n"
    return (
        "# Quality against training tokens: incremental, one-shot and Adapt-Pruner schedules\n\n"
        + (example if s.get("quick") else "")
        + f"{payload['model']} pruned from {payload['original_params']:,} to at most "
        f"{payload['target_params']:,} parameters ({removed:.0%} of the non-embedding parameters removed), "
        f"then trained: {', '.join(f'{b:,}' for b in budgets)} training tokens. Every schedule is one "
        f"`Controller` run of `{s['config']}` with the overrides `{' '.join(s['overrides'])}` plus its own; "
        f"all share the data order, learning-rate curve shape and seed (seeds: {seeds}). Held-out perplexity "
        f"at context {payload['eval_context']} on {texts}; the first text is the calibration and training "
        f"domain. Cells with several seeds: mean ± half the seed-to-seed range."
        + (f" Tasks ({', '.join(s['tasks'])}, lm-eval, {limit}) at the largest budget only." if s["tasks"] else "")
    )


def ppl_table(groups: dict, schedules: list[str], budgets: list[int], text: str) -> str:
    lines = [
        f"### Held-out perplexity on {text}",
        "",
        "| schedule | " + " | ".join(f"{b:,} tokens" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for name in schedules:
        cells = [cell([r["ppl"][text] for r in groups.get((name, b), [])]) for b in budgets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_section(groups: dict, budgets: list[int], texts: list[str]) -> str:
    """incremental / oneshot+train per budget and text, per seed, with each schedule's seed spread."""
    lines = [
        "### Incremental against one-shot + train (LM loss), per budget",
        "",
        "Ratio below 1: incremental wins. Seed spread: (max − min) / mean of each schedule's perplexity.",
        "",
        "| budget | text | incremental | oneshot+train | ratio | ratio per seed | seed spread incr. / one-shot |",
        "|---:|---|---:|---:|---:|---|---|",
    ]
    for budget in budgets:
        inc, one = groups.get(("incremental", budget), []), groups.get(("oneshot+train", budget), [])
        if not inc or not one:
            continue
        for text in texts:
            by_seed = {r["seed"]: r["ppl"][text] for r in one}
            ratios = [r["ppl"][text] / by_seed[r["seed"]] for r in inc if r["seed"] in by_seed]
            per_seed = ", ".join(f"{x:.3f}" for x in ratios) if len(ratios) > 1 else "-"
            spread = f"{_spread(inc, text)} / {_spread(one, text)}" if len(inc) > 1 else "-"
            lines.append(
                f"| {budget:,} | {text} | {mean_ppl(inc, text):.2f} | {mean_ppl(one, text):.2f} | "
                f"{_num(statistics.fmean(ratios) if ratios else None, '.3f')} | {per_seed} | {spread} |"
            )
    return "\n".join(lines)


def _spread(group: list[dict], text: str) -> str:
    values = [r["ppl"][text] for r in group]
    return f"{(max(values) - min(values)) / statistics.fmean(values):.1%}"


def objective_section(groups: dict, budgets: list[int], texts: list[str]) -> str:
    """Which recovery objective reaches the lowest perplexity at equal training tokens."""
    lines = [
        "### Recovery objective at equal training tokens",
        "",
        f"Cells: perplexity on {' / '.join(texts)}. lm: LM loss; distill: KL to the unpruned model "
        "(`train.distill.kd_weight=1.0`); mix: half each (`kd_weight=0.5`).",
        "",
        "| pruning | budget | lm | distill | mix | best |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for pruning, objectives in FAMILIES.items():
        for budget in budgets:
            found = {o: groups[(name, budget)] for o, name in objectives.items() if (name, budget) in groups}
            if not found:
                continue
            cells = [
                " / ".join(f"{mean_ppl(found[o], t):.2f}" for t in texts) if o in found else "-" for o in objectives
            ]
            best = "; ".join(f"{t}: {min(found, key=lambda o: mean_ppl(found[o], t))}" for t in texts)
            lines.append(f"| {pruning} | {budget:,} | " + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines)


def at_wall(points: list[tuple[float, float]], wall: float) -> float | None:
    """Perplexity at ``wall`` seconds, interpolated linearly in log-log between measured runs; None outside them."""
    points = sorted(points)
    for (w0, p0), (w1, p1) in zip(points, points[1:]):
        if w0 <= wall <= w1:
            t = 0.0 if w1 == w0 else (math.log(wall) - math.log(w0)) / (math.log(w1) - math.log(w0))
            return math.exp((1 - t) * math.log(p0) + t * math.log(p1))
    return points[0][1] if len(points) == 1 and points[0][0] == wall else None


def wall_section(groups: dict, texts: list[str]) -> str:
    """The objectives compared at equal wall time: each objective's curve read at the others' wall seconds."""
    lines = [
        "### Recovery objective at equal wall time",
        "",
        "Each objective's perplexity against the wall seconds of its runs (mean over seeds), read at every "
        "measured wall time of the family by log-log interpolation; `-` where that objective has no runs "
        "that short or that long. Cells: perplexity on " + " / ".join(texts) + ".",
        "",
        "| pruning | wall s | lm | distill | mix | best |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for pruning, objectives in FAMILIES.items():
        curves = {o: _wall_curve(groups, name, texts) for o, name in objectives.items()}
        walls = sorted({w for curve in curves.values() for w, _ in curve})
        for wall in walls:
            values = {o: [at_wall([(w, p[t]) for w, p in curve], wall) for t in texts] for o, curve in curves.items()}
            cells = [" / ".join(_num(v) for v in vs) for vs in values.values()]
            lowest = [(t, _lowest({o: v[i] for o, v in values.items()})) for i, t in enumerate(texts)]
            best = "; ".join(f"{t}: {o}" for t, o in lowest if o != "-") or "-"
            shown = f"{wall:,.0f}" if wall >= 100 else f"{wall:.1f}"
            lines.append(f"| {pruning} | {shown} | " + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines)


def _lowest(values: dict[str, float | None]) -> str:
    """The objective with the lowest perplexity, or ``-`` unless at least two can be compared."""
    known = {o: v for o, v in values.items() if v is not None}
    return min(known, key=known.get) if len(known) > 1 else "-"


def _wall_curve(groups: dict, schedule: str, texts: list[str]) -> list[tuple[float, dict]]:
    """[(mean wall seconds, {text: mean ppl})] of ``schedule``, one point per budget."""
    return [
        (statistics.fmean(r["wall_seconds"] for r in group), {t: mean_ppl(group, t) for t in texts})
        for (name, _), group in sorted(groups.items(), key=lambda item: item[0][1])
        if name == schedule
    ]


def share_section(groups: dict, schedules: list[str], budgets: list[int]) -> str:
    """Calibration + scoring + surgery as a share of the run's wall time, at the largest budget."""
    largest = budgets[-1] if budgets else 0
    lines = [
        f"### Pruning share of wall time at {largest:,} tokens (goal ≤ {SHARE_GOAL:.0%})",
        "",
        "| schedule | prune s | wall s | share | goal |",
        "|---|---:|---:|---:|---|",
    ]
    for name in schedules:
        for r in groups.get((name, largest), []):
            share = r["pruning_share"]
            goal = "-" if share is None else "met" if share <= SHARE_GOAL else "not met"
            lines.append(
                f"| {name} (seed {r['seed']}) | {r['prune_seconds']:.0f} | {r['wall_seconds']:.0f} | "
                f"{_num(share, '.1%')} | {goal} |"
            )
    return "\n".join(lines)


def details_table(payload: dict, texts: list[str]) -> str:
    rows = sorted(payload["rows"], key=lambda r: (r["budget"], r["schedule"], r["seed"]))
    tasks = list(dict.fromkeys(t for r in rows for t in r["tasks"]))
    head = ["schedule", "budget", "seed", "params", "train tokens", "stages", *(f"ppl {t}" for t in texts)]
    head += [f"{t} {m}" for t in tasks for m in ("acc", "acc_norm")]
    head += ["prune s", "train s", "wall s", "prune share", "train tokens/s"]
    lines = ["### Every run", "", *table_head(head)]
    for r in rows:
        cells = [r["schedule"], f"{r['budget']:,}", str(r["seed"]), f"{r['params']:,}", f"{r['train_tokens']:,}"]
        cells += [str(r["stages"]), *(f"{r['ppl'][t]:.2f}" for t in texts)]
        cells += [_num(r["tasks"].get(t, {}).get(m), ".3f") for t in tasks for m in ("acc", "acc_norm")]
        cells += [f"{r['prune_seconds']:.0f}", f"{r['train_seconds']:.0f}", f"{r['wall_seconds']:.0f}"]
        cells += [_num(r["pruning_share"], ".1%"), _num(r["tokens_per_s"], ".1f")]
        lines.append("| " + " | ".join(cells) + (" (resumed) |" if r.get("resumed") else " |"))
    counts = sorted({r["params"] for r in rows})
    if counts:
        lines += [
            "",
            f"Final sizes: {counts[0]:,} to {counts[-1]:,} parameters (target {payload['target_params']:,}; "
            f"spread {(counts[-1] - counts[0]) / payload['target_params']:.2%}). Wall seconds of a resumed run "
            "leave out its earlier processes' loading and checkpoint writing.",
        ]
    return "\n".join(lines)


# ---- the plot ------------------------------------------------------------------------------
def plot(payload: dict, path: Path) -> None:
    """Perplexity against training tokens (log x), one panel per text, one line per schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    texts, groups = payload["texts"], grouped(payload["rows"])
    schedules = list(dict.fromkeys(r["schedule"] for r in payload["rows"]))
    all_budgets = sorted({b for _, b in groups})
    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 4.8), squeeze=False)
    for ax, text in zip(axes[0], texts):
        for i, name in enumerate(schedules):
            budgets = sorted(b for s, b in groups if s == name)
            values = [[r["ppl"][text] for r in groups[(name, b)]] for b in budgets]
            means = [statistics.fmean(v) for v in values]
            errors = [[m - min(v) for m, v in zip(means, values)], [max(v) - m for m, v in zip(means, values)]]
            style = "--" if name.startswith("oneshot") else "-"
            ax.errorbar(budgets, means, yerr=errors, fmt=style + "o", ms=4, capsize=3, label=name, color=f"C{i}")
        ax.set_xscale("log")
        ax.set_xticks(all_budgets, [f"{b:,}" for b in all_budgets])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("training tokens (log scale)")
        ax.set_ylabel(f"held-out perplexity on {text}")
        ax.set_title(text + (" (calibration domain)" if text == texts[0] else " (other domain)"))
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"{payload['model']}: {payload['target_params']:,} parameters; error bars: seed min–max")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
