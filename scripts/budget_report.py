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

from adaptprune.run.report import table_head

TITLE = "# Quality against training tokens: incremental pruning, one-shot + train and FLAP + train"
VERDICT_START = "<!-- verdict: written by hand after the full run; kept when this file is rewritten -->"
VERDICT_END = "<!-- end of verdict -->"
VERDICT_PLACEHOLDER = "_To be written after the full run: does incremental beat one-shot + train, at which budgets?_"
SHARE_GOAL = 0.05  # pruning share of wall time the project aims at
SCHEDULE_ORDER = [  # plot colours: one per schedule across every panel
    "incremental-distill", "oneshot+train-distill", "flap+train-distill", "incremental", "oneshot+train",
    "flap+train", "incremental-mix", "oneshot+train-mix", "incremental-accumulating",
]  # fmt: skip
OBJECTIVES = ("lm", "distill", "mix")
FAMILIES = {  # pruning -> {objective: schedule}: the rows that differ only in the recovery objective
    "incremental": {"lm": "incremental", "distill": "incremental-distill", "mix": "incremental-mix"},
    "oneshot": {"lm": "oneshot+train", "distill": "oneshot+train-distill", "mix": "oneshot+train-mix"},
    "flap": {"lm": "flap+train", "distill": "flap+train-distill"},
}


def write_report(grids: list[dict], out: Path) -> None:
    """Write ``budget.md`` (keeping an earlier verdict) and ``budget.png`` into ``out``: one section per grid."""
    out.mkdir(parents=True, exist_ok=True)
    md = out / "budget.md"
    verdict = earlier_verdict(md) if md.exists() else VERDICT_PLACEHOLDER
    md.write_text(render_markdown(grids, verdict) + "\n", encoding="utf-8")
    if any(g["rows"] for g in grids):
        plot([g for g in grids if g["rows"]], out / "budget.png")


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
def render_markdown(grids: list[dict], verdict: str) -> str:
    parts = [TITLE, f"## Verdict\n\n{VERDICT_START}\n{verdict}\n{VERDICT_END}"]
    return "\n\n".join(parts + [render_grid(g) for g in grids])


def render_grid(payload: dict) -> str:
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
        schedule_wall_section(groups, texts),
        share_section(groups, schedules, budgets),
        details_table(payload, texts),
    ]
    return "\n\n".join(p for p in parts if p)


def header(payload: dict, budgets: list[int]) -> str:
    s, rows = payload["settings"], payload["rows"]
    seeds = ", ".join(str(seed) for seed in sorted({r["seed"] for r in rows}))
    texts = ", ".join(f"{name} ({payload['text_tokens'][name]:,} tokens)" for name in payload["texts"])
    removed = s["remove_fraction"]
    limit = f"first {s['task_limit']} documents" if s["task_limit"] else "full validation sets"
    example = "**Format example from `--quick` (a tiny random model): the numbers mean nothing.**\n\n"
    return (
        f"## {removed:.0%} of the non-embedding parameters removed\n\n"
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


RATIO_PAIRS = (  # (numerator, denominator, what the ratio asks)
    ("incremental", "oneshot+train", "incremental against one-shot + train (LM loss)"),
    ("incremental-distill", "oneshot+train-distill", "incremental against one-shot + train (distillation)"),
    ("incremental-distill", "flap+train-distill", "incremental against FLAP + train (distillation)"),
    ("oneshot+train-distill", "flap+train-distill", "one-shot adaptprune against FLAP, both + train (distillation)"),
)


def ratio_section(groups: dict, budgets: list[int], texts: list[str]) -> str:
    """One ratio table per pair of schedules that both ran: per budget and text, per seed, with seed spreads."""
    parts = []
    for top, bottom, title in RATIO_PAIRS:
        rows = [ratio_rows(groups, top, bottom, b, texts) for b in budgets]
        rows = [line for lines in rows for line in lines]
        if not rows:
            continue
        parts.append(
            "\n".join(
                [
                    f"### {title[0].upper()}{title[1:]}, per budget",
                    "",
                    f"Ratio below 1: {top} wins. Seed spread: (max − min) / mean of each schedule's perplexity.",
                    "",
                    f"| budget | text | {top} | {bottom} | ratio | ratio per seed | seed spread |",
                    "|---:|---|---:|---:|---:|---|---|",
                    *rows,
                ]
            )
        )
    return "\n\n".join(parts)


def ratio_rows(groups: dict, top: str, bottom: str, budget: int, texts: list[str]) -> list[str]:
    inc, one = groups.get((top, budget), []), groups.get((bottom, budget), [])
    if not inc or not one:
        return []
    lines = []
    for text in texts:
        by_seed = {r["seed"]: r["ppl"][text] for r in one}
        ratios = [r["ppl"][text] / by_seed[r["seed"]] for r in inc if r["seed"] in by_seed]
        per_seed = ", ".join(f"{x:.3f}" for x in ratios) if len(ratios) > 1 else "-"
        spread = f"{_spread(inc, text)} / {_spread(one, text)}" if len(inc) > 1 and len(one) > 1 else "-"
        lines.append(
            f"| {budget:,} | {text} | {mean_ppl(inc, text):.2f} | {mean_ppl(one, text):.2f} | "
            f"{_num(statistics.fmean(ratios) if ratios else None, '.3f')} | {per_seed} | {spread} |"
        )
    return lines


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
                " / ".join(f"{mean_ppl(found[o], t):.2f}" for t in texts) if o in found else "-" for o in OBJECTIVES
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
        curves = {o: _wall_curve(groups, objectives[o], texts) if o in objectives else [] for o in OBJECTIVES}
        if sum(1 for curve in curves.values() if curve) < 2:
            continue  # one objective alone has nothing to be compared with
        walls = sorted({w for curve in curves.values() for w, _ in curve})
        for wall in walls:
            values = {o: [at_wall([(w, p[t]) for w, p in curve], wall) for t in texts] for o, curve in curves.items()}
            cells = [" / ".join(_num(v) for v in vs) for vs in values.values()]
            lowest = [(t, _lowest({o: v[i] for o, v in values.items()})) for i, t in enumerate(texts)]
            best = "; ".join(f"{t}: {o}" for t, o in lowest if o != "-") or "-"
            shown = f"{wall:,.0f}" if wall >= 100 else f"{wall:.1f}"
            lines.append(f"| {pruning} | {shown} | " + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines)


WALL_SCHEDULES = ("incremental-distill", "oneshot+train-distill", "flap+train-distill")


def schedule_wall_section(groups: dict, texts: list[str]) -> str:
    """The three distilling schedules at equal wall time: does incremental's extra calibration pay for itself?"""
    curves = {name: _wall_curve(groups, name, texts) for name in WALL_SCHEDULES}
    curves = {name: c for name, c in curves.items() if c}
    if len(curves) < 2:
        return ""
    lines = [
        "### Schedules at equal wall time (distillation)",
        "",
        "Each schedule's perplexity against the wall seconds of its runs (mean over seeds), read at every measured "
        "wall time by log-log interpolation; `-` outside a schedule's measured span. Incremental calibrates once a "
        "stage (~10 stages at this cut), the one-shot schedules once. Cells: perplexity on " + " / ".join(texts) + ".",
        "",
        "| wall s | " + " | ".join(curves) + " | best |",
        "|---:|" + "---:|" * len(curves) + "---|",
    ]
    for wall in sorted({w for curve in curves.values() for w, _ in curve}):
        values = {n: [at_wall([(w, p[t]) for w, p in c], wall) for t in texts] for n, c in curves.items()}
        cells = [" / ".join(_num(v) for v in vs) for vs in values.values()]
        lowest = [(t, _lowest({n: v[i] for n, v in values.items()})) for i, t in enumerate(texts)]
        best = "; ".join(f"{t}: {n}" for t, n in lowest if n != "-") or "-"
        lines.append(f"| {wall:,.0f} | " + " | ".join(cells) + f" | {best} |")
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
def plot(grids: list[dict], path: Path) -> None:
    """Perplexity against training tokens (log x): a row of panels per grid (cut), one panel per text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = grids[0]["texts"]
    fig, axes = plt.subplots(len(grids), len(texts), figsize=(6 * len(texts), 4.4 * len(grids)), squeeze=False)
    for row_axes, payload in zip(axes, grids):
        for ax, text in zip(row_axes, texts):
            plot_panel(ax, payload, text)
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"{grids[0]['model']}: perplexity against training tokens; error bars: seed min–max")
    fig.tight_layout(rect=(0, 0.06 if len(grids) > 1 else 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_panel(ax, payload: dict, text: str) -> None:
    """One grid's schedules on one text; the colour of a schedule is the same in every panel."""
    from matplotlib.ticker import NullLocator

    groups = grouped(payload["rows"])
    all_budgets = sorted({b for _, b in groups})
    for name in dict.fromkeys(r["schedule"] for r in payload["rows"]):
        budgets = sorted(b for s, b in groups if s == name)
        values = [[r["ppl"][text] for r in groups[(name, b)]] for b in budgets]
        means = [statistics.fmean(v) for v in values]
        errors = [[m - min(v) for m, v in zip(means, values)], [max(v) - m for m, v in zip(means, values)]]
        style = "-" if name.startswith("incremental") else "--"
        color = f"C{SCHEDULE_ORDER.index(name) if name in SCHEDULE_ORDER else 9}"
        ax.errorbar(budgets, means, yerr=errors, fmt=style + "o", ms=4, capsize=3, label=name, color=color)
    ax.set_xscale("log")
    ax.set_xticks(all_budgets, [f"{b:,}" for b in all_budgets])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("training tokens (log scale)")
    ax.set_ylabel(f"held-out perplexity on {text}")
    domain = " (calibration domain)" if text == payload["texts"][0] else " (other domain)"
    ax.set_title(f"−{payload['settings']['remove_fraction']:.0%} non-embedding: {text}{domain}")
    ax.grid(True, which="both", alpha=0.3)
