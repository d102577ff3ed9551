"""Which one-shot component costs zero-shot accuracy? (issue: baselines + comparison)

The comparison table shows adaptprune's one-shot model winning on held-out perplexity but not
on lm-eval tasks. This script changes one component of the default one-shot path at a time
(allocation, compensation, metric) at the comparison's parameter count and reports held-out
perplexity with task accuracies on full validation sets. It diagnoses; it does not pick
defaults (the task sets here are evaluation data, not tuning data). Rows are saved after every variant; a rerun with the same arguments
reuses them and computes only variants not yet in the JSON.

    python scripts/ablate_tasks.py --out docs/ablate_tasks
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

from adaptprune.checkpoint import load_model, load_tokenizer
from adaptprune.config import PruneConfig
from adaptprune.data import load_corpus, pack, token_stream
from adaptprune.evaluation.perplexity import perplexity
from adaptprune.evaluation.tasks import run_tasks
from adaptprune.pruning.step import prune_step
from adaptprune.pruning.surgery import count_parameters, params_after_removing
from adaptprune.run.report import table_head, write_markdown_and_json

# (label, PruneConfig overrides); the first row is the default path
VARIANTS: tuple[tuple[str, dict], ...] = (
    ("default: stade + adaptive + mean", {}),
    ("allocation uniform", {"allocation": "uniform"}),
    ("allocation global (FLAP's)", {"allocation": "global"}),
    ("no compensation", {"compensation": "none"}),
    ("metric wanda", {"metric": "wanda"}),
    ("metric taylor (LLM-Pruner's kind)", {"metric": "taylor"}),
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--remove-fraction", type=float, default=0.30, help="of non-embedding parameters")
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--tasks", default="piqa,arc_easy")
    p.add_argument("--limit", type=int, default=0, help="documents per task (0 = full validation sets)")
    p.add_argument("--out", default="docs/ablate_tasks")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    tok = load_tokenizer(args.model)
    corpus = load_corpus()
    calib = pack(token_stream(corpus["train"], tok), args.seq_len, max(1, args.calib_tokens // args.seq_len))
    heldout = token_stream(corpus["heldout"], tok, args.eval_tokens)
    done = finished_rows(args)
    rows = []
    for label, overrides in VARIANTS:
        if label in done:  # same settings, already measured: a rerun only adds new variants
            rows.append(done[label])
            continue
        model = load_model(args.model)
        target = params_after_removing(model, args.remove_fraction)
        start = time.perf_counter()
        prune_step(model, calib, target, PruneConfig(**overrides), progress=False)
        row = {
            "variant": label,
            "overrides": overrides,
            "params": count_parameters(model),
            "prune_seconds": round(time.perf_counter() - start, 1),
            "ppl": perplexity(model, heldout, context=args.context).ppl,
            "tasks": run_tasks(model, tok, tasks, limit=args.limit or None),
        }
        rows.append(row)
        print(_line(row, tasks), flush=True)
        write(args, tasks, rows)  # after every variant: an interrupted run keeps what it measured
        del model
        gc.collect()
    write(args, tasks, rows)
    print(Path(args.out).with_suffix(".md").read_text(encoding="utf-8"))


def finished_rows(args: argparse.Namespace) -> dict[str, dict]:
    path = Path(args.out).with_suffix(".json")
    if not path.exists():
        return {}
    saved = json.loads(path.read_text(encoding="utf-8"))
    return {r["variant"]: r for r in saved["rows"]} if saved["args"] == vars(args) else {}


def _line(row: dict, tasks: list[str]) -> str:
    cells = [row["variant"], f"{row['params']:,}", f"{row['ppl']:.2f}"]
    for t in tasks:
        m = row["tasks"][t]
        cells += [f"{m['acc']:.3f}", f"{m['acc_norm']:.3f}" if "acc_norm" in m else "-"]
    return "| " + " | ".join(cells) + " |"


def write(args: argparse.Namespace, tasks: list[str], rows: list[dict]) -> None:
    head = ["variant", "params", f"ppl (ctx {args.context})"] + [f"{t} {m}" for t in tasks for m in ("acc", "acc_norm")]
    limit = f"first {args.limit} documents" if args.limit else "full validation sets"
    text = "\n".join(
        [
            f"One-shot ablation on {args.model}, {args.remove_fraction:.0%} of non-embedding parameters removed, "
            f"{args.calib_tokens:,} calibration tokens; held-out perplexity on {args.eval_tokens:,} tokens; "
            f"tasks: lm-eval, {limit}. One component changed per row.",
            "",
            *table_head(head),
            *(_line(r, tasks) for r in rows),
        ]
    )
    write_markdown_and_json(Path(args.out), text, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
