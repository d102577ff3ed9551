"""Pruning seconds of a parallel and a sequential least-squares step, alternating in one process (issue #32).

A shared machine's load changes minute to minute, so ``bench_sequential.py``'s per-row seconds compare
badly across rows. This prunes fresh copies of SmolLM2-135M once to −60% (adaptive allocation, units,
least squares λ = 0.1) on one calibration text, the variants taking turns round by round, and reports
each variant's median seconds and its ratio to the parallel step's median. Writes OUT.json.

    python scripts/time_sequential.py --out docs/compensation_sequential_timing
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

from bench_sequential import VARIANTS

from adaptprune.checkpoint import load_model, load_tokenizer
from adaptprune.config import PruneConfig, load_config
from adaptprune.pruning.step import prune_step
from adaptprune.pruning.surgery import params_after_removing
from adaptprune.run.report import table_head
from adaptprune.run.run_data import shared_calibration

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--cut", type=float, default=0.6)
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="docs/compensation_sequential_timing")
    args = p.parse_args()
    overrides = ["prune.allocation=adaptive", "prune.compensation=least_squares", "prune.ls_ridge=0.1"]
    cfg = load_config(args.config, [*overrides, f"data.calib_tokens={args.calib_tokens}", "output.dir=unused"])
    dense = load_model(cfg.model.name, dtype=cfg.model.dtype).eval()
    calibration = shared_calibration(cfg, load_tokenizer(cfg.model.tokenizer or cfg.model.name))
    target = params_after_removing(dense, args.cut)
    fields = {f.name: getattr(cfg.prune, f.name) for f in dataclasses.fields(cfg.prune)}
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        for name, change in VARIANTS.items():
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            prune_step(model, calibration, target, PruneConfig(**{**fields, **change}), progress=False)
            seconds[name].append(round(time.perf_counter() - start, 2))
            print(f"[timing] round {round_ + 1} {name}: {seconds[name][-1]} s", flush=True)
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    rows = [
        {"variant": n, "seconds": s, "median": medians[n], "ratio": medians[n] / medians["parallel"]}
        for n, s in seconds.items()
    ]
    payload = {"command": "python scripts/time_sequential.py", "args": vars(args), "rows": rows}
    Path(args.out).with_suffix(".json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    lines = table_head(["rebuild", "seconds per round", "median s", "× parallel"])
    for r in rows:
        lines.append(f"| {r['variant']} | {', '.join(map(str, r['seconds']))} | {r['median']:.1f} | {r['ratio']:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
