"""Run reports: the end-of-run summary table and the model card written beside the model."""

from __future__ import annotations

import math
from pathlib import Path


def table_head(head: list[str], left: int = 1) -> list[str]:
    """A markdown table's header and alignment rows: the first ``left`` columns left-aligned, the rest right."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * left + "---:|" * (len(head) - left)]


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def summary_table(history: list[dict]) -> str:
    """A markdown table: one row per stage (0 = dense), one perplexity column per held-out text."""
    texts = list(dict.fromkeys(name for row in history for name in row.get("ppl_by_text", {})))
    ppl_header = " | ".join(f"ppl {t}" for t in texts) if texts else "held-out ppl"
    lines = [
        f"| stage | params | {ppl_header} | train tokens | train loss | prune s | wall s |",
        "|---:|---:|" + "---:|" * max(len(texts), 1) + "---:|---:|---:|---:|",
    ]
    for row in history:
        by_text = row.get("ppl_by_text", {})
        ppl = " | ".join(_fmt(by_text.get(t), ".2f") for t in texts) if texts else _fmt(row["ppl"], ".2f")
        lines.append(
            f"| {row['stage']} | {row['params']:,} | {ppl} | {row['train_tokens']:,} | "
            f"{_fmt(row.get('train_loss'), '.3f')} | {_fmt(row['prune_seconds'], '.1f')} | {_fmt(row['wall_seconds'], '.1f')} |"
        )
    return "\n".join(lines)


def write_summary_table(history: list[dict], path: Path) -> str:
    table = summary_table(history)
    Path(path).write_text(table + "\n", encoding="utf-8")
    return table


def write_model_card(model_dir: Path, config, results: dict) -> Path:
    """README.md in the model folder: what it is, how it was made, how to load it."""
    first, last = results["history"][0], results["history"][-1]
    card = f"""# Pruned with adaptprune

Source model: `{config.model.name}`, {results["original_params"]:,} parameters, pruned to
{results["final_params"]:,} parameters in {results["stages"]} stages
(metric `{config.prune.metric}`, allocation `{config.prune.allocation}`, compensation
`{config.prune.compensation}`, trainer `{config.train.trainer}`, {last["train_tokens"]:,} training tokens).
{_shape_line(config.prune, results.get("shape_choice"))}

Held-out perplexity (context {config.data.eval_context}): dense {_fmt(first["ppl"], ".2f")}, final {_fmt(last["ppl"], ".2f")}.

Layers have different sizes (recorded in `config.json` → `per_layer_config`).

```python
import adaptprune  # registers the heterogeneous classes
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{model_dir}")
# or, without adaptprune installed (the modeling file travels with the checkpoint):
model = AutoModelForCausalLM.from_pretrained("{model_dir}", trust_remote_code=True)
```

## Stages

{summary_table(results["history"])}
"""
    path = Path(model_dir) / "README.md"
    path.write_text(card, encoding="utf-8")
    return path


def _shape_line(prune, choice: dict | None = None) -> str:
    """What the model card says of a target shape: which (searched: among how many) and how the walk set sizes."""
    if prune.target_shape is None:
        return ""
    from ..pruning.shape.reach import walk_allocation  # lazily: writing a card should not load the pruning code

    shape = f"`{prune.target_shape}`"
    if choice is not None:
        c = choice["chosen"]
        shape = (
            f"searched before stage 1: {c['layers']} layers, hidden {c['hidden']}, {c['groups']} KV groups, "
            f"{c['neurons']} MLP neurons (the lowest loss of {len(choice['rows'])} shapes on "
            f"{choice['probe_tokens']:,} training-split tokens)"
        )
    return f"\nTarget shape {shape}: {walk_allocation(prune.allocation)}.\n"


def plot_layer_sizes(dense: dict, pruned: dict, path: Path) -> Path:
    """Bars of MLP neurons and KV heads per layer, dense vs pruned (``inspection.describe``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    layers = [row["layer"] for row in dense["layers"]]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.3 * len(layers) + 2), 6), sharex=True)
    for ax, key, title in ((axes[0], "mlp_neurons", "MLP neurons"), (axes[1], "query_heads", "query heads")):
        ax.bar(layers, [r[key] for r in dense["layers"]], color="#d0d0d0", label="dense")
        ax.bar(layers, [r[key] for r in pruned["layers"]], color="#3a7bd5", label="pruned")
        ax.set_ylabel(title)
        ax.legend(loc="lower right")
    axes[1].set_xlabel("decoder layer")
    axes[1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(f"Kept units per layer: {dense['total_params']:,} → {pruned['total_params']:,} parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_stages(history: list[dict], path: Path) -> Path:
    """Held-out perplexity and training loss against training tokens, and parameters per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [row["train_tokens"] for row in history]
    fig, (ax_ppl, ax_params) = plt.subplots(1, 2, figsize=(11, 4))
    ppl = [(t, r["ppl"]) for t, r in zip(tokens, history) if r.get("ppl") is not None]
    if ppl:
        ax_ppl.plot(*zip(*ppl), marker="o", color="#3a7bd5", label="held-out perplexity")
    loss = [(t, r["train_loss"]) for t, r in zip(tokens, history) if r.get("train_loss") is not None]
    ax_ppl.set_xlabel("training tokens")
    ax_ppl.set_ylabel("held-out perplexity")
    ax_ppl.set_yscale("log")
    handles = ax_ppl.get_lines()
    if loss:
        ax_loss = ax_ppl.twinx()
        handles += ax_loss.plot(*zip(*loss), marker="s", color="#e07b39", label="train loss (end of phase)")
        ax_loss.set_ylabel("train loss")
    ax_ppl.legend(handles=handles, loc="upper right")  # one legend for both axes
    ax_ppl.set_title("quality across stages")
    ax_params.plot([r["stage"] for r in history], [r["params"] / 1e6 for r in history], marker="o", color="#2a9d8f")
    ax_params.set_xlabel("stage (0 = dense, last = recovery)")
    ax_params.set_ylabel("parameters (millions)")
    ax_params.set_title("model size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_run_report(run_dir: Path) -> Path:
    """``adaptprune report RUN_DIR``: report.md with per-layer and per-stage plots."""
    import json

    from ..checkpoint import load_model
    from ..config import load_config
    from ..evaluation.inspection import describe

    run_dir = Path(run_dir)
    if not (run_dir / "results.json").exists():
        raise FileNotFoundError(f"{run_dir} has no results.json: is it a finished adaptprune run folder?")
    results = json.loads((run_dir / "results.json").read_text())
    config = load_config(run_dir / "config.yaml")
    dense, pruned = describe(load_model(config.model.name)), describe(load_model(str(run_dir / "final")))
    plot_layer_sizes(dense, pruned, run_dir / "layer_sizes.png")
    plot_stages(results["history"], run_dir / "stages.png")
    text = f"""# adaptprune run report: {run_dir.name}

`{config.model.name}`: {results["original_params"]:,} → {results["final_params"]:,} parameters in
{results["stages"]} pruning stages (metric `{config.prune.metric}`, allocation `{config.prune.allocation}`,
trainer `{config.train.trainer}`).

{summary_table(results["history"])}

![kept units per layer](layer_sizes.png)

![quality and size across stages](stages.png)
"""
    path = run_dir / "report.md"
    path.write_text(text, encoding="utf-8")
    return path


def write_markdown_and_json(out: Path, markdown: str, payload: dict) -> None:
    """A benchmark's ``OUT.md`` table and ``OUT.json`` data side by side (``out`` without suffix)."""
    import json

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
