"""Tables, verdicts and the plot of ``bench_shape.py`` (``docs/shape.md``, ``docs/shape.png``)."""

from __future__ import annotations

import math
from pathlib import Path

from adaptprune.run.report import table_head

TEXT_LIMIT = 0.02  # perplexity ratios within ±2% read as "no difference"
SPEED_LIMIT = 0.05  # decode speed ratios within ±5% likewise (CPU timing noise on a shared machine)


def _num(value, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _label(row: dict) -> str:
    if row["mode"] == "dense":
        return "dense"
    mode = "one-shot" if row["mode"] == "oneshot" else "incremental"
    return f"{row['target_label']} {mode} {row['dims']}"


def row_line(row: dict) -> str:
    ppl = ", ".join(f"{name} {value:.2f}" for name, value in row["ppl"].items())
    return (
        f"{_label(row)}: {row['params']:,} params, {row['layers']} layers, hidden {row['hidden']}; ppl {ppl}; "
        f"decode {row['speed']['decode_tokens_per_s']:.1f} tok/s ({row['speed']['decode_speedup']:.2f}x dense)"
    )


def table(rows: list[dict]) -> str:
    texts = list(rows[0]["ppl"]) if rows else []
    tasks = list(rows[0]["tasks"]) if rows else []
    head = ["target", "mode", "dims", "params", "layers", "hidden", "neurons/layer", "KV groups/layer"]
    head += [f"ppl {t}" for t in texts] + [f"{t} {m}" for t in tasks for m in ("acc", "acc_norm")]
    head += ["decode tok/s", "decode vs dense", "train tokens", "prune s"]
    lines = table_head(head, left=3)
    for r in rows:
        mode = {"oneshot": "one-shot"}.get(r["mode"], r["mode"])
        cells = [r["target_label"], mode, r["dims"] or "-", f"{r['params']:,}", str(r["layers"]), str(r["hidden"])]
        cells += [f"{r['mean_neurons']:.0f}", f"{r['mean_kv_groups']:.2f}"]
        cells += [_num(r["ppl"].get(t), ".2f") for t in texts]
        cells += [_num(r["tasks"].get(t, {}).get(m)) for t in tasks for m in ("acc", "acc_norm")]
        cells += [f"{r['speed']['decode_tokens_per_s']:.1f}", f"{r['speed']['decode_speedup']:.2f}x"]
        cells += [f"{r['train_tokens']:,}", f"{r['prune_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _compare_ppl(name: str, units: float, reshaped: float) -> str:
    ratio = reshaped / units
    word = "helps" if ratio < 1 - TEXT_LIMIT else "hurts" if ratio > 1 + TEXT_LIMIT else "makes no difference to"
    return f"{word} {name} perplexity ({reshaped:.2f} vs {units:.2f}, {ratio:.2f}x)"


def _compare_task(name: str, units: dict, reshaped: dict) -> str:
    diff = reshaped["acc"] - units["acc"]
    noise = math.hypot(units.get("acc_stderr", 0.0), reshaped.get("acc_stderr", 0.0))
    word = "helps" if diff > noise else "hurts" if diff < -noise else "makes no difference to"
    return f"{word} {name} acc ({reshaped['acc']:.3f} vs {units['acc']:.3f}, ±{noise:.3f})"


def verdicts(rows: list[dict]) -> list[str]:
    """One plain line per (target, mode): width/depth ('all') against units only."""
    lines = []
    pairs = {(r["target_label"], r["mode"], r["dims"]): r for r in rows if r["mode"] != "dense"}
    for (label, mode, dims), units in pairs.items():
        reshaped = pairs.get((label, mode, "all"))
        if dims != "units" or reshaped is None:
            continue
        parts = [_compare_ppl(n, units["ppl"][n], reshaped["ppl"][n]) for n in units["ppl"]]
        parts += [_compare_task(t, units["tasks"][t], reshaped["tasks"][t]) for t in units["tasks"]]
        speed = reshaped["speed"]["decode_speedup"] / units["speed"]["decode_speedup"]  # each timed against dense
        fast = "faster" if speed > 1 + SPEED_LIMIT else "slower" if speed < 1 - SPEED_LIMIT else "as fast"
        shape = f"{reshaped['layers']} layers, hidden {reshaped['hidden']}"
        mode_text = "one-shot" if mode == "oneshot" else "incremental"
        lines.append(
            f"- **{label}, {mode_text}** (all four dims chose {shape}): width/depth pruning "
            + "; ".join(parts)
            + f"; decoding is {fast} ({speed:.2f}x)."
        )
    return lines


def _caption(args) -> str:
    limit = f"first {args.limit} documents" if args.limit else "full validation sets"
    return (
        f"{args.model}; targets {args.targets} ('ne:F' removes F of the non-embedding parameters); 'units' prunes "
        f"MLP neurons and KV groups, 'all' also hidden channels and whole layers (grids: prune.layer_grid, "
        f"prune.hidden_grid defaults). One-shot: {args.calib_tokens:,} calibration tokens, no training. "
        f"Incremental: {Path(args.config).name}'s controller with {args.train_tokens:,} training tokens "
        f"(train.mixed_precision={args.mixed_precision}). Perplexity on {args.eval_tokens:,} held-out tokens per "
        f"text at context {args.context}; tasks: lm-eval, {limit}; decode: greedy, 128-token prompt, 32 new tokens, "
        f"median of {args.speed_runs}, timed alternately with the dense model on the same CPU."
    )


def write(args, rows: list[dict]) -> None:
    out = Path(args.out)
    text = "\n".join([_caption(args), "", table(rows), "", "Where width/depth pruning helps and where not:", ""])
    text += "\n".join(verdicts(rows) or ["- (no pair of units/all rows yet)"]) + "\n"
    out.with_suffix(".md").write_text(text, encoding="utf-8")
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [_label(r) for r in rows]
    texts = list(rows[0]["ppl"])
    fig, axes = plt.subplots(1, len(texts) + 1, figsize=(5 * (len(texts) + 1), 0.45 * len(rows) + 1.5), sharey=True)
    colours = ["#d0d0d0" if r["dims"] is None else "#3a7bd5" if r["dims"] == "units" else "#e07a5f" for r in rows]
    for ax, text in zip(axes, texts, strict=False):
        values = [r["ppl"][text] for r in rows]
        ax.barh(names, values, color=colours)
        ax.set_xscale("log")
        ax.set_xlabel(f"held-out ppl, {text} (log; lower is better)")
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
    speed = [r["speed"]["decode_tokens_per_s"] for r in rows]
    axes[-1].barh(names, speed, color=colours)
    axes[-1].set_xlabel("CPU decode tokens/s (higher is better)")
    for y, (v, r) in enumerate(zip(speed, rows, strict=True)):
        axes[-1].text(v, y, f" {v:.1f} ({r['layers']}L, h{r['hidden']})", va="center", fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("Units only (blue) vs units + hidden + layers (orange), equal parameter targets")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_compensation(args, rows: list[dict], target: int) -> None:
    texts = list(rows[0]["ppl"])
    head = ["layer compensation", "norm compensation", "params", "layers", "hidden", *(f"ppl {t}" for t in texts)]
    lines = [
        f"One-shot {args.model} to {target:,} parameters with all four dims and a fixed share (prune.layer_grid=0.25, "
        f"prune.hidden_grid=0.25), {args.calib_tokens:,} calibration tokens, no training; held-out perplexity on "
        f"{args.eval_tokens:,} tokens per text at context {args.context}.",
        "",
        *table_head(head, left=2),
    ]
    for r in rows:
        cells = [str(r["layer_compensation"]), str(r["norm_compensation"]), f"{r['params']:,}", str(r["layers"])]
        cells += [str(r["hidden"]), *(f"{r['ppl'][t]:.2f}" for t in texts)]
        lines.append("| " + " | ".join(cells) + " |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
