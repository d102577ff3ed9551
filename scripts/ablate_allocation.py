"""How should sparsity be spread over layers? Allocation ablation, one-shot and incremental, across domains.

At the comparison's size (30% of SmolLM2-135M's non-embedding parameters removed) each row changes
only the allocation (or, in the last one-shot rows, the metric) of adaptprune's default path and
reports held-out perplexity on the calibration domain (Shakespeare) and on another (KJV). Defaults
are chosen by the cross-domain figure; no task set is used (they are evaluation data).

- ``uniform``: every layer loses the same fraction.
- ``adaptive`` (A): one offset −A·Ĩ_l per pruning step, no state (adaptprune's default until now).
- ``accumulating`` (A): Adapt-Pruner's per-layer sparsity state, grown in inner steps of Δ = 2% with
  Ĩ re-estimated on fresh text every inner step (``allocation/accumulating.py``).
- ``global``: FLAP's z-scored global ranking.

Incremental rows run the default job's controller (about 5% per stage) on ``--train-tokens``.
Rows are saved after every variant; a rerun with the same arguments computes only missing ones.

    python scripts/ablate_allocation.py --out docs/ablate_allocation
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import shutil
import time
from pathlib import Path

from adaptprune.checkpoint import load_model, load_tokenizer
from adaptprune.config import load_config
from adaptprune.data import open_corpus
from adaptprune.evaluation.perplexity import perplexity
from adaptprune.pruning.step import prune_step
from adaptprune.pruning.surgery import count_parameters, params_after_removing
from adaptprune.run.controller import Controller
from adaptprune.run.report import table_head, write_markdown_and_json
from adaptprune.run.run_data import heldout_texts

PUBLISHED = [
    "prune.metric=taylor_param_first",
    "prune.allocation=accumulating",
    "prune.same_ratio=true",
    "prune.compensation=none",
]
# (label, prune.* overrides); the first row is adaptprune's default path
ONESHOT: tuple[tuple[str, list[str]], ...] = (
    ("adaptive A=0.02 (default)", []),
    ("uniform", ["prune.allocation=uniform"]),
    ("adaptive A=0.05", ["prune.amplitude=0.05"]),
    ("adaptive A=0.10", ["prune.amplitude=0.10"]),
    ("accumulating A=0.02", ["prune.allocation=accumulating"]),
    ("accumulating A=0.05", ["prune.allocation=accumulating", "prune.amplitude=0.05"]),
    ("accumulating A=0.10", ["prune.allocation=accumulating", "prune.amplitude=0.10"]),
    ("accumulating A=0.02, same ratio", ["prune.allocation=accumulating", "prune.same_ratio=true"]),
    ("global (FLAP's)", ["prune.allocation=global"]),
    ("metric taylor_param_first, adaptive", ["prune.metric=taylor_param_first"]),
    ("Adapt-Pruner as published (taylor_param_first, accumulating, same ratio, no compensation)", PUBLISHED),
)
INCREMENTAL: tuple[tuple[str, list[str]], ...] = (
    ("adaptive A=0.02 (default)", []),
    ("uniform", ["prune.allocation=uniform"]),
    ("accumulating A=0.02, per-stage state (upstream)", ["prune.allocation=accumulating"]),
    ("accumulating A=0.02, one state for the run", ["prune.allocation=accumulating", "prune.sparsity_scope=run"]),
    ("global (FLAP's)", ["prune.allocation=global"]),
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml", help="base run config")
    p.add_argument("--remove-fraction", type=float, default=0.30, help="of non-embedding parameters")
    p.add_argument("--calib-tokens", type=int, default=8192, help="per (inner) pruning step")
    p.add_argument("--train-tokens", type=int, default=16384, help="incremental rows")
    p.add_argument(
        "--mixed-precision", default=default_precision(), choices=["no", "bf16"], help="incremental rows' training"
    )
    p.add_argument("--modes", default="oneshot,incremental")
    p.add_argument("--runs", default="runs/ablate_allocation", help="controller run folders (deleted when done)")
    p.add_argument("--out", default="docs/ablate_allocation")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    base = load_config(args.config, [f"data.calib_tokens={args.calib_tokens}"])
    tokenizer = load_tokenizer(base.model.name)
    texts = heldout_texts(base, tokenizer)
    target = params_after_removing(load_model(base.model.name), args.remove_fraction)
    done = finished_rows(args)
    rows = []
    for mode in args.modes.split(","):
        for label, overrides in ONESHOT if mode == "oneshot" else INCREMENTAL:
            key = f"{mode}: {label}"
            if key not in done:
                run = oneshot_row if mode == "oneshot" else incremental_row
                done[key] = {"key": key, "mode": mode, "variant": label, "overrides": overrides}
                done[key].update(run(args, overrides, target, tokenizer, texts))
                print(_line(done[key], texts), flush=True)
            rows.append(done[key])
            write(args, rows, target, texts)  # after every variant: an interrupted run keeps what it measured
            gc.collect()
    print(Path(args.out).with_suffix(".md").read_text(encoding="utf-8"))


def oneshot_row(args, overrides: list[str], target: int, tokenizer, texts: dict) -> dict:
    cfg = load_config(args.config, [f"data.calib_tokens={args.calib_tokens}", *overrides])
    if cfg.prune.metric == "taylor_param_first":  # upstream's 512 x 64 Taylor tokens per inner step
        cfg = load_config(args.config, [f"data.calib_tokens={max(args.calib_tokens, 32768)}", *overrides])
    corpus = open_corpus(cfg.data, tokenizer, seed=cfg.train.seed)
    chunks = itertools.count()  # fresh calibration text for every inner step
    model = load_model(cfg.model.name)
    start = time.perf_counter()
    report = prune_step(
        model, lambda: corpus.calibration(next(chunks), cfg.data.calib_tokens, cfg.data.seq_len), target, cfg.prune,
        progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    return {"params": count_parameters(model), "seconds": round(seconds, 1), "inner_steps": report.inner_steps,
            "ppl": _ppl(model, texts, cfg.data.eval_context)}  # fmt: skip


def incremental_row(args, overrides: list[str], target: int, tokenizer, texts: dict) -> dict:
    folder = Path(args.runs) / _slug(overrides)
    cfg = load_config(
        args.config,
        [
            f"prune.target_params={target}", f"schedule.train_tokens={args.train_tokens}",
            f"train.mixed_precision={args.mixed_precision}", "eval.every_stage=false", "output.tensorboard=false",
            f"output.dir={folder}", *overrides,
        ],
    )  # fmt: skip
    results = Controller(cfg).run(resume=(folder / "checkpoints").exists())
    model = load_model(str(folder / "final"))
    row = {
        "params": count_parameters(model), "seconds": results["wall_seconds_this_process"],
        "train_tokens": results["history"][-1]["train_tokens"], "ppl": _ppl(model, texts, cfg.data.eval_context),
    }  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)
    return row


def _ppl(model, texts: dict, context: int) -> dict[str, float]:
    return {name: round(perplexity(model, tokens, context=context).ppl, 3) for name, tokens in texts.items()}


def _slug(overrides: list[str]) -> str:
    return "-".join(o.split(".", 1)[-1].replace("=", "_") for o in overrides) or "default"


def finished_rows(args: argparse.Namespace) -> dict[str, dict]:
    path = Path(args.out).with_suffix(".json")
    if not path.exists():
        return {}
    saved = json.loads(path.read_text(encoding="utf-8"))
    same = {k: v for k, v in saved["args"].items() if k != "modes"} == {
        k: v for k, v in vars(args).items() if k != "modes"
    }
    return {r["key"]: r for r in saved["rows"]} if same else {}


def _line(row: dict, texts: dict) -> str:
    cells = [row["mode"], row["variant"], f"{row['params']:,}", *(f"{row['ppl'][t]:.2f}" for t in texts)]
    return "| " + " | ".join(cells) + f" | {row['seconds']:.0f} |"


def write(args: argparse.Namespace, rows: list[dict], target: int, texts: dict) -> None:
    head = ["mode", "allocation", "params", *(f"ppl {t}" for t in texts), "seconds"]
    text = "\n".join(
        [
            f"Allocation ablation, {args.remove_fraction:.0%} of SmolLM2-135M's non-embedding parameters removed "
            f"(target {target:,}); STADE + mean compensation unless the row says otherwise; {args.calib_tokens:,} "
            f"calibration tokens per (inner) pruning step; incremental rows train {args.train_tokens:,} tokens "
            f"({args.mixed_precision}). Held-out perplexity, context 1024, 4,096 tokens per text.",
            "",
            *table_head(head, left=2),
            *(_line(r, texts) for r in rows),
        ]
    )
    write_markdown_and_json(Path(args.out), text, {"args": vars(args), "target": target, "rows": rows})


def default_precision() -> str:
    """bf16 on CUDA or a CPU with native bf16; fp32 elsewhere (emulated bf16 is far slower)."""
    import torch

    from adaptprune.compat import cpu_has_native_bf16

    return "bf16" if torch.cuda.is_available() or cpu_has_native_bf16() else "no"


if __name__ == "__main__":
    main()
