"""The per-step search's candidates measured through hooks against the copies it used to build (issue #22).

One pruning step of ``--remove`` of the dense model's parameters with all four dims, on
``--calib-tokens`` of the train split. For every candidate of the default grid, alternately: the hooked
trial (``pruning.shape.trial``, what the search does now) and a deep copy with the shape, the units
(scored on the copy) and the compensation applied, as the search did before. Each row: the calibration
loss of both, seconds of both and their ratio, and the extra peak bytes over a plain forward pass of
both (torch's CPU profiler, in a second call). The hooked loss equals the copy's where no hidden channel
goes; with channels the units are scored on the full-width weights, so the two may differ a little.

    python scripts/bench_search_trial.py --out docs/search_trial
    python scripts/bench_search_trial.py --quick --out /tmp/search_trial
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import time
from pathlib import Path

import torch
from measured import PARALLEL
from torch.profiler import ProfilerActivity, profile

from adaptprune.arch import get_adapter
from adaptprune.checkpoint import load_model, load_tokenizer
from adaptprune.config import load_config
from adaptprune.importance.residual import calibration_loss
from adaptprune.pruning.shape.search import (
    apply_shape,
    candidate_loss,
    channel_keep,
    search_candidates,
    sub_calibration,
)
from adaptprune.pruning.shape.trial import trial_bytes
from adaptprune.pruning.step import build_allocator, calibrate_for, prune_with_stats, unit_planner
from adaptprune.pruning.surgery import count_parameters, ensure_output_biases
from adaptprune.run.report import table_head
from adaptprune.run.run_data import shared_calibration

ALL_DIMS = 'prune.dims=["neurons","groups","hidden","layers"]'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/search_trial", help="path stem: .json and .md are written")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--remove", type=float, default=0.10, help="fraction of all parameters the one step removes")
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--quick", action="store_true", help="tiny-random-llama, a few tokens (a schema check)")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.calib_tokens, args.remove = "tiny-random-llama", 256, 0.3
    return args


def built_loss(model, chosen, calib, sequences, cfg, adapter, target) -> float:
    """The candidate built on a deep copy, its units scored on the copy (the search before the hooks)."""
    trial = copy.deepcopy(model)
    keep = channel_keep(model, chosen, calib, adapter)
    apply_shape(trial, chosen, calib, cfg, adapter, keep)
    kept = [i for i in range(len(calib.layers)) if i not in set(chosen.removed_layers)]
    try:
        prune_with_stats(trial, sub_calibration(calib, kept), target, cfg, adapter, allocator=build_allocator(cfg))
    except ValueError:
        return math.inf
    return calibration_loss(trial, sequences)


def peak_bytes(fn) -> int:
    """The highest total of bytes allocated and not yet freed while ``fn`` runs (torch's CPU profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = sorted(
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
        for e in prof.events()
    )
    total = peak = 0
    for _, change in changes:
        total += change
        peak = max(peak, total)
    return peak


def timed(fn) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(None, [f"model.name={args.model}", ALL_DIMS, "prune.hidden_multiple=32", PARALLEL]).prune
    run_cfg = load_config(None, [f"model.name={args.model}", f"data.calib_tokens={args.calib_tokens}"])
    if args.quick:
        cfg = load_config(None, [ALL_DIMS, "prune.hidden_multiple=8", "prune.neuron_multiple=1", PARALLEL]).prune
        run_cfg = load_config(None, [f"model.name={args.model}", "data.seq_len=64", "data.calib_tokens=256"])
    torch.manual_seed(0)
    model = load_model(args.model).eval()
    adapter = get_adapter(model)
    ensure_output_biases(model, adapter)
    sequences = shared_calibration(run_cfg, load_tokenizer(args.model))
    calib = calibrate_for(model, sequences, cfg, adapter, progress=False, collect_residual=True)
    target = round((1 - args.remove) * count_parameters(model))
    candidates = search_candidates(model, calib, sequences, target, cfg, adapter)
    plan_units = unit_planner(target, cfg, adapter, build_allocator(cfg))
    plain = peak_bytes(lambda: calibration_loss(model, sequences))
    rows = []
    for chosen in candidates:
        hook = functools.partial(candidate_loss, model, chosen, calib, sequences, cfg, adapter, plan_units)
        build = functools.partial(built_loss, model, chosen, calib, sequences, cfg, adapter, target)
        (hooked, t_hooked), (built, t_built) = timed(hook), timed(build)
        mem_hooked, mem_built = peak_bytes(hook), peak_bytes(build)
        rows.append(
            {
                "removed_layers": list(chosen.removed_layers),
                "removed_channels": chosen.removed_channels,
                "loss_hooked": hooked if math.isfinite(hooked) else None,
                "loss_copy": built if math.isfinite(built) else None,
                "seconds_hooked": round(t_hooked, 2),
                "seconds_copy": round(t_built, 2),
                "extra_bytes_hooked": mem_hooked - plain,
                "extra_bytes_copy": mem_built - plain,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "model": args.model,
        "params": count_parameters(model),
        "remove": args.remove,
        "calib_tokens": int(sequences.numel()),
        "compensation": cfg.compensation,
        "plan_bound_bytes": trial_bytes(model, adapter, cfg.compensation),
        "rows": rows,
    }
    write(Path(args.out), result)
    return 0


def write(stem: Path, result: dict) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, stem.with_suffix(".json"))
    mb = 1e6
    lines = [
        f"# The search's candidates: hooks vs a copy ({result['model']}, one step of "
        f"{result['remove']:.0%}, {result['calib_tokens']:,} calibration tokens, {result['compensation']})",
        "",
        "Produced by `python scripts/bench_search_trial.py`. Extra MB: the peak over a plain forward pass "
        f"(torch's CPU profiler). `plan`'s bound for the hooked trial: {result['plan_bound_bytes'] / mb:.1f} MB.",
        "",
        *table_head(
            [
                "removed layers",
                "removed channels",
                "loss hooked",
                "loss copy",
                "s hooked",
                "s copy",
                "time ratio",
                "extra MB hooked",
                "extra MB copy",
            ],  # fmt: skip
            2,
        ),
    ]
    for r in result["rows"]:
        loss = ["-" if v is None else f"{v:.4f}" for v in (r["loss_hooked"], r["loss_copy"])]
        lines.append(
            f"| {r['removed_layers'] or '-'} | {r['removed_channels']} | {loss[0]} | {loss[1]} | "
            f"{r['seconds_hooked']:.1f} | {r['seconds_copy']:.1f} | {r['seconds_hooked'] / r['seconds_copy']:.2f} | "
            f"{r['extra_bytes_hooked'] / mb:.1f} | {r['extra_bytes_copy'] / mb:.1f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
