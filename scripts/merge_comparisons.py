"""One cross-domain table from several ``adaptprune compare`` runs at the same target.

A comparison may be run in parts (one-shot rows, then the rows that train); this checks that every
part prunes to the same target, copies each part's ``comparison.json`` beside the table and writes
``OUT.md``: every row's size, training tokens and held-out perplexity per text, plus the ratios the
README quotes (adaptprune one-shot vs the best one-shot baseline, adaptprune's trained rows vs the
best ``<baseline>+full`` row).

    python scripts/merge_comparisons.py runs/compare_xd runs/compare_xd_train --out docs/comparison_crossdomain
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

BASELINES = ("llm_pruner", "flap", "slicegpt")


def load_parts(folders: list[Path]) -> tuple[int, list[dict]]:
    """The common target and every part's rows, in order; a target mismatch is an error."""
    parts = [json.loads((f / "comparison.json").read_text(encoding="utf-8")) for f in folders]
    targets = {p["target"] for p in parts}
    if len(targets) != 1:
        raise SystemExit(f"merge_comparisons: the runs prune to different targets: {sorted(targets)}")
    return targets.pop(), [row for p in parts for row in p["rows"]]


def table(rows: list[dict], texts: list[str]) -> str:
    head = ["method", "params", "train tokens", *(f"ppl {t}" for t in texts), "prune (+ train) s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        ppl = [f"{r['ppl_by_text'][t]:.2f}" for t in texts]
        cells = [r["method"], f"{r['params']:,}", f"{r['train_tokens']:,}", *ppl, f"{r['prune_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict], texts: list[str]) -> str:
    """adaptprune's rows over the best baseline of the same kind (one-shot, or trained ``+full``)."""
    by_name = {r["method"]: r for r in rows}

    def best(names: list[str]) -> dict[str, float]:
        return {t: min(by_name[n]["ppl_by_text"][t] for n in names) for t in texts}

    def against(method: str, ref: dict[str, float]) -> str:
        return " / ".join(f"{by_name[method]['ppl_by_text'][t] / ref[t]:.3f}" for t in texts)

    out = []
    one_shot = [n for n in BASELINES if n in by_name]
    if one_shot and "adaptprune_oneshot" in by_name:
        out.append(f"adaptprune_oneshot vs the best one-shot baseline: {against('adaptprune_oneshot', best(one_shot))}")
    trained = [f"{n}+full" for n in BASELINES if f"{n}+full" in by_name]
    for ours in ("adaptprune_incremental", "adaptprune_oneshot+full", "adapt_pruner"):
        if trained and ours in by_name:
            out.append(f"{ours} vs the best `<baseline>+full` row: {against(ours, best(trained))}")
    return f"Ratios ({' / '.join(texts)}): " + "; ".join(out) + "." if out else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="compare output folders, in table order")
    p.add_argument("--out", type=Path, default=Path("docs/comparison_crossdomain"))
    args = p.parse_args()
    target, rows = load_parts(args.runs)
    texts = list(rows[0]["ppl_by_text"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sources = []
    for folder in args.runs:
        copy = args.out.parent / f"{args.out.name}_{folder.name}.json"
        shutil.copyfile(folder / "comparison.json", copy)
        sources.append(f"`{copy.name}` ({folder})")
    text = (
        "# Cross-domain comparison at equal size and equal training\n\n"
        f"Merged by `python scripts/merge_comparisons.py {' '.join(map(str, args.runs))} --out {args.out}` from "
        f"{', '.join(sources)}. Target {target:,} parameters; held-out perplexity per text at each run's context "
        f"(the first text is the calibration and training domain).\n\n"
        f"{table(rows, texts)}\n\n{ratios(rows, texts)}\n"
    )
    args.out.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
