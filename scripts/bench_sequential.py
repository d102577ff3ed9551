"""Parallel against sequential least squares at one-shot cuts (issue #32), beside FLAP in the same process.

SmolLM2-135M pruned once to 30% and 60% fewer non-embedding parameters (stade, units, least squares,
λ = 0.1) on one shared calibration text (``data.calib_tokens``, as ``adaptprune prune``): each row
prunes a fresh copy of the dense model with ``prune_step`` and differs only in
``prune.calibration`` (parallel | sequential) and ``prune.rebuild_target`` (self | dense), per
allocation. FLAP (its own calibration, mean compensation) is the reference. Held-out perplexity on
the calibration domain and on KJV; pruning seconds (calibration, scoring, surgery) per row.

Resumable: every finished row goes into ``OUT.json`` at once (atomically); a rerun skips it.
The order runs the cheap rows first: adaptive at both cuts, then accumulating (30 inner steps at −60%).

    python scripts/bench_sequential.py --out docs/compensation_sequential               # see OUT.md for times
    python scripts/bench_sequential.py --quick --out /tmp/sequential                    # tiny-random-llama
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import time
from pathlib import Path

import torch
from budget_report import VERDICT_END, VERDICT_PLACEHOLDER, VERDICT_START, earlier_verdict

from adaptprune.baselines.flap import flap_prune
from adaptprune.checkpoint import load_model, load_tokenizer
from adaptprune.config import PruneConfig, load_config
from adaptprune.evaluation.perplexity import perplexity
from adaptprune.pruning.step import prune_step
from adaptprune.pruning.surgery import count_parameters, params_after_removing
from adaptprune.run.report import table_head, write_markdown_and_json
from adaptprune.run.run_data import heldout_texts, shared_calibration

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # row name -> prune overrides
    "parallel": {"calibration": "parallel"},
    "sequential self": {"calibration": "sequential", "rebuild_target": "self"},
    "sequential dense": {"calibration": "sequential", "rebuild_target": "dense"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"), help="model, data and prune defaults")
    p.add_argument("--cuts", default="0.6,0.3", help="fractions of the non-embedding parameters removed")
    p.add_argument("--allocations", default="adaptive,accumulating", help="prune.allocation values, in order")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of: {', '.join(VARIANTS)}")
    p.add_argument("--calib-tokens", type=int, default=8192, help="one-shot calibration (as `adaptprune prune`)")
    p.add_argument("--out", default="docs/compensation_sequential", help="OUT.md and OUT.json")
    p.add_argument("--quick", action="store_true", help="tiny-random-llama and short texts: a format check")
    args = p.parse_args(argv)
    args.cuts = [float(c) for c in args.cuts.split(",")]
    args.allocations = args.allocations.split(",")
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    return args


def run_config(args: argparse.Namespace):
    quick = ["model.name=tiny-random-llama", "data.seq_len=64", "data.eval_tokens=512", "data.eval_context=128"]
    fixed = ["prune.compensation=least_squares", "prune.ls_ridge=0.1", f"data.calib_tokens={args.calib_tokens}"]
    return load_config(args.config, [*fixed, *(quick if args.quick else []), "output.dir=unused"])


def rows_done(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def save_rows(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    tmp.replace(path)


def measure(dense, prune_fn, texts: dict, context: int) -> dict:
    """Prune a fresh copy of ``dense`` with ``prune_fn``; seconds, size and perplexity on every text."""
    model = copy.deepcopy(dense)
    gc.collect()
    start = time.perf_counter()
    inner = prune_fn(model)
    seconds = time.perf_counter() - start
    ppl = {name: perplexity(model, tokens, context=context).ppl for name, tokens in texts.items()}
    return {"params": count_parameters(model), "ppl": ppl, "prune_seconds": round(seconds, 1), "inner_steps": inner}


def row_plan(args: argparse.Namespace) -> list[tuple[float, str, str]]:
    """(cut, allocation, variant) in running order; FLAP once per cut, before that cut's rows."""
    plan = []
    for allocation in args.allocations:
        for cut in args.cuts:
            if allocation == args.allocations[0]:
                plan.append((cut, "-", "flap"))
            plan += [(cut, allocation, v) for v in args.variants]
    return plan


def prune_fn(cfg, calibration: torch.Tensor, target: int, allocation: str, variant: str):
    if variant == "flap":
        return lambda model: flap_prune(model, calibration, target, progress=False) and 1
    fields = {f.name: getattr(cfg.prune, f.name) for f in dataclasses.fields(cfg.prune)}
    prune = PruneConfig(**{**fields, "allocation": allocation, **VARIANTS[variant]})
    return lambda model: prune_step(model, calibration, target, prune, progress=False).inner_steps


def markdown(payload: dict) -> str:
    texts = payload["texts"]
    head = ["cut", "allocation", "rebuild", "params", *(f"ppl {t}" for t in texts)]
    head += [*(f"× FLAP {t}" for t in texts), "prune s", "× parallel s"]
    lines = [
        "# Parallel against sequential least squares, one-shot",
        "",
        f"{payload['model']}, one pruning step (`stade`, units, least squares λ = 0.1) on {payload['calib_tokens']:,} "
        f"calibration tokens shared by every row; held-out perplexity at context {payload['eval_context']}. "
        f"FLAP ran in the same process. Produced by `{payload['command']}`.",
        "",
        *table_head(head, left=3),
    ]
    rows = payload["rows"]
    for r in rows:
        flap = next((f for f in rows if f["variant"] == "flap" and f["cut"] == r["cut"]), None)
        base = next(
            (
                p
                for p in rows
                if p["variant"] == "parallel" and (p["cut"], p["allocation"]) == (r["cut"], r["allocation"])
            ),
            None,
        )
        ratios = [f"{r['ppl'][t] / flap['ppl'][t]:.3f}" if flap else "-" for t in texts]
        speed = f"{r['prune_seconds'] / base['prune_seconds']:.2f}" if base else "-"
        cells = [f"−{r['cut']:.0%}", r["allocation"], r["variant"], f"{r['params']:,}"]
        cells += [f"{r['ppl'][t]:.2f}" for t in texts] + ratios + [f"{r['prune_seconds']:.1f}", speed]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = run_config(args)
    out = Path(args.out).with_suffix(".json")
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
    dense = load_model(cfg.model.name, dtype=cfg.model.dtype).eval()
    texts, calibration = heldout_texts(cfg, tokenizer), shared_calibration(cfg, tokenizer)
    payload = {
        "command": "python scripts/bench_sequential.py " + " ".join(argv if argv is not None else _argv()),
        "model": cfg.model.name,
        "calib_tokens": int(calibration.numel()),
        "eval_context": cfg.data.eval_context,
        "texts": list(texts),
        "rows": rows_done(out),
    }
    for cut, allocation, variant in row_plan(args):
        if any((r["cut"], r["allocation"], r["variant"]) == (cut, allocation, variant) for r in payload["rows"]):
            continue
        target = params_after_removing(dense, cut)
        row = measure(dense, prune_fn(cfg, calibration, target, allocation, variant), texts, cfg.data.eval_context)
        payload["rows"].append({"cut": cut, "allocation": allocation, "variant": variant, "target": target, **row})
        save_rows(out, payload)
        shown = ", ".join(f"{n} {v:.2f}" for n, v in row["ppl"].items())
        print(f"[sequential] -{cut:.0%} {allocation} {variant}: {shown}, {row['prune_seconds']} s", flush=True)
    md = out.with_suffix(".md")
    verdict = earlier_verdict(md) if md.exists() else VERDICT_PLACEHOLDER
    text = markdown(payload) + f"\n\n## Reading\n\n{VERDICT_START}\n{verdict}\n{VERDICT_END}"
    write_markdown_and_json(out.with_suffix(""), text, payload)
    print(text)


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
