"""One-shot compensation benchmark (issue #23): none, mean, mean+energy and least squares at two cuts.

SmolLM2-135M pruned once (stade, adaptive allocation, units) to 30% and to 60% of its non-embedding
parameters removed; every compensation mode prunes a fresh copy of the dense model from one shared
calibration (with Σ = E[x xᵀ], which energy and least squares read), so the rows differ only in how
each o/down projection is repaired. Held-out perplexity on the calibration domain and on KJV.

Also measured per mode: the resident-memory increase of the surgery phase above the memory held
when it starts (the statistics are already there), against the size of one layer's largest Σ: least
squares solves one (layer, kind) at a time, so its extra memory should stay within that.

    python scripts/bench_compensation.py --out docs/compensation              # ~8 minutes on 2 cores
    python scripts/bench_compensation.py --quick --out /tmp/compensation      # tiny-random-llama, seconds
"""

from __future__ import annotations

import argparse
import copy
import gc
import time
from pathlib import Path

import psutil
import torch
from budget_report import VERDICT_END, VERDICT_PLACEHOLDER, VERDICT_START, earlier_verdict
from measured import ADAPTIVE, PARALLEL

from adaptprune.arch import get_adapter
from adaptprune.checkpoint import load_model, load_tokenizer
from adaptprune.config import PruneConfig, load_config
from adaptprune.evaluation.perplexity import perplexity
from adaptprune.pruning.profiling import Profile
from adaptprune.pruning.step import calibrate_for, prune_with_stats
from adaptprune.pruning.surgery import count_parameters, params_after_removing
from adaptprune.run.report import table_head, write_markdown_and_json
from adaptprune.run.run_data import heldout_texts, shared_calibration

ROOT = Path(__file__).resolve().parents[1]
MODES = ("none", "mean", "mean+energy", "least_squares")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"), help="model, data and prune defaults")
    p.add_argument("--cuts", default="0.3,0.6", help="fractions of the non-embedding parameters removed")
    p.add_argument("--ridges", default="0.001,0.01,0.1", help="least_squares: prune.ls_ridge values")
    p.add_argument("--calib-tokens", type=int, default=8192, help="one-shot calibration (as `adaptprune prune`)")
    p.add_argument("--out", default="docs/compensation", help="OUT.md and OUT.json")
    p.add_argument("--quick", action="store_true", help="tiny-random-llama and short texts: a format check")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to the run config")
    args = p.parse_args(argv)
    args.cuts = [float(c) for c in args.cuts.split(",")]
    args.ridges = [float(r) for r in args.ridges.split(",")]
    return args


def run_config(args: argparse.Namespace):
    quick = ["model.name=tiny-random-llama", "data.seq_len=64", "data.eval_tokens=512", "data.eval_context=128"]
    overrides = [
        ADAPTIVE,
        PARALLEL,
        f"data.calib_tokens={args.calib_tokens}",
        *(quick if args.quick else []),
        *args.overrides,
    ]
    return load_config(args.config, [*overrides, "output.dir=unused"])


def variants(ridges: list[float]) -> list[tuple[str, float]]:
    """(mode, ridge) of every row: least squares once per ridge."""
    return [(m, r) for m in MODES for r in (ridges if m == "least_squares" else [0.0])]


def largest_sigma_mb(model: torch.nn.Module) -> float:
    """MB of the largest (C, C) float64 Σ among the layers' o/down inputs (the MLP's, for these models)."""
    adapter = get_adapter(model)
    width = max(
        adapter.decoder_layers(model)[i].get_submodule(adapter.mlp_output).in_features
        for i in range(len(adapter.decoder_layers(model)))
    )
    return width * width * 8 / 2**20


def prune_row(dense, calib, target: int, prune: PruneConfig, texts: dict, context: int) -> dict:
    """Prune a copy of ``dense`` with ``prune`` from ``calib``; its perplexities and surgery memory."""
    model = copy.deepcopy(dense)
    gc.collect()
    rss_before = psutil.Process().memory_info().rss / 2**20
    profile = Profile()
    start = time.perf_counter()
    prune_with_stats(model, calib, target, prune, profile=profile)
    seconds = time.perf_counter() - start
    surgery_peak = profile.phases["surgery"].peak_rss_mb
    ppl = {name: perplexity(model, tokens, context=context).ppl for name, tokens in texts.items()}
    row = {
        "compensation": prune.compensation,
        "ls_ridge": prune.ls_ridge if prune.compensation == "least_squares" else None,
        "params": count_parameters(model),
        "ppl": ppl,
        "prune_seconds": round(seconds, 2),
        "surgery_extra_mb": round(max(0.0, surgery_peak - rss_before), 1),
    }
    del model
    return row


def measure_cut(args, cfg, dense, calib, texts: dict, cut: float) -> list[dict]:
    target = params_after_removing(dense, cut)
    rows = []
    for mode, ridge in variants(args.ridges):
        prune = PruneConfig(**{**_prune_fields(cfg.prune), "compensation": mode, "ls_ridge": ridge})
        row = {"cut": cut, "target": target, **prune_row(dense, calib, target, prune, texts, cfg.data.eval_context)}
        shown = ", ".join(f"{n} {v:.2f}" for n, v in row["ppl"].items())
        print(f"[compensation] -{cut:.0%} {mode} {ridge or ''}: ppl {shown}, {row['prune_seconds']:.1f} s", flush=True)
        rows.append(row)
    return rows


def _prune_fields(prune: PruneConfig) -> dict:
    import dataclasses

    return {f.name: getattr(prune, f.name) for f in dataclasses.fields(prune)}


def markdown(payload: dict) -> str:
    texts = payload["texts"]
    lines = [
        "# Compensation at one-shot cuts: none, mean, mean+energy, least squares",
        "",
        f"{payload['model']} ({payload['original_params']:,} parameters), one pruning step (`{payload['metric']}`, "
        f"`{payload['allocation']}` allocation, units only) on {payload['calib_tokens']:,} calibration tokens "
        f"shared by every row; held-out perplexity at context {payload['eval_context']} on "
        + ", ".join(f"{t} ({n:,} tokens)" for t, n in payload["text_tokens"].items())
        + f". Produced by `{payload['command']}`.",
        "",
        *table_head(["cut", "compensation", "λ (ls_ridge)", "params", *(f"ppl {t}" for t in texts),
                     *(f"× mean on {t}" for t in texts), "prune s", "surgery +MB"], left=2),
    ]  # fmt: skip
    for row in payload["rows"]:
        base = next(r for r in payload["rows"] if r["cut"] == row["cut"] and r["compensation"] == "mean")
        cells = [f"−{row['cut']:.0%}", row["compensation"], "-" if row["ls_ridge"] is None else f"{row['ls_ridge']:g}"]
        cells += [f"{row['params']:,}", *(f"{row['ppl'][t]:.2f}" for t in texts)]
        cells += [f"{row['ppl'][t] / base['ppl'][t]:.3f}" for t in texts]
        cells += [f"{row['prune_seconds']:.1f}", f"{row['surgery_extra_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"surgery +MB: resident memory above the start of the surgery phase (the calibration statistics, all "
        f"layers' Σ included, are held before it starts). One layer's largest Σ is {payload['sigma_mb']:.1f} MB; "
        f"collecting Σ for every layer (energy and least squares need it) holds {payload['all_sigma_mb']:.0f} MB "
        "during the step, as mean+energy always has.",
    ]
    return "\n".join(lines)


def all_sigma_mb(model: torch.nn.Module) -> float:
    adapter = get_adapter(model)
    total = 0
    for layer in adapter.decoder_layers(model):
        for path in (adapter.mlp_output, adapter.attention_output):
            total += layer.get_submodule(path).in_features ** 2
    return total * 8 / 2**20


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        torch.set_num_threads(1)
    cfg = run_config(args)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
    dense = load_model(cfg.model.name, dtype=cfg.model.dtype).eval()
    texts = heldout_texts(cfg, tokenizer)
    sequences = shared_calibration(cfg, tokenizer)
    stats_cfg = PruneConfig(**{**_prune_fields(cfg.prune), "compensation": "least_squares"})
    calib = calibrate_for(dense, sequences, stats_cfg, get_adapter(dense), progress=not args.quick)
    rows = [row for cut in args.cuts for row in measure_cut(args, cfg, dense, calib, texts, cut)]
    payload = {
        "command": "python scripts/bench_compensation.py " + " ".join(argv if argv is not None else _argv()),
        "model": cfg.model.name,
        "original_params": count_parameters(dense),
        "metric": cfg.prune.metric,
        "allocation": cfg.prune.allocation,
        "calib_tokens": int(sequences.numel()),
        "eval_context": cfg.data.eval_context,
        "texts": list(texts),
        "text_tokens": {n: int(t.numel()) for n, t in texts.items()},
        "sigma_mb": round(largest_sigma_mb(dense), 2),
        "all_sigma_mb": round(all_sigma_mb(dense), 1),
        "rows": rows,
    }
    md = Path(args.out).with_suffix(".md")
    verdict = earlier_verdict(md) if md.exists() else VERDICT_PLACEHOLDER
    text = markdown(payload) + f"\n\n## Reading\n\n{VERDICT_START}\n{verdict}\n{VERDICT_END}"
    write_markdown_and_json(Path(args.out), text, payload)
    print(text)


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
