"""The default job with the fused, chunked LM head + loss vs the unfused one: tokens/s, peak RSS, perplexity.

Each run is a child process (its own peak RSS), fused and unfused alternate within one invocation (the order
flips every round), so the ratios compare runs that shared the machine's load; each round's fused/unfused ratio is reported, and the
headline is their median. Each finished run is written to ``--json`` at once, and a rerun with the same arguments
resumes from it. The job is the default config shortened by ``--overrides`` (fewer stages and tokens): about
15 minutes a run on 2 cores.

    python scripts/bench_fused_loss.py --json docs/fused_loss.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["schedule.train_tokens=16384", "prune.target_params=120M", "data.eval_tokens=4096"]
METHODS = {"fused": 256, "unfused": 0}  # train.loss_chunk_tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--overrides", nargs="*", default=SHORT, help="config overrides shortening the default job")
    p.add_argument("--rounds", type=int, default=2, help="fused/unfused pairs")
    p.add_argument("--json", default=str(ROOT / "docs" / "fused_loss.json"))
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # loss_chunk_tokens of one run
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> None:
    """One run in this process; prints one JSON line: tokens/s of training, peak RSS, final perplexity."""
    from adaptprune.config import load_config
    from adaptprune.run.controller import Controller

    overrides = [*args.overrides, f"train.loss_chunk_tokens={args.child}", f"output.dir={args.out}"]
    result = Controller(load_config(args.config, overrides)).run()
    history = [row for row in result["history"] if row.get("train_tokens")]
    tokens = sum(row["train_tokens"] for row in history)
    seconds = sum(row["train_seconds"] for row in history)
    final = result["history"][-1]
    print(
        "RESULT "
        + json.dumps(
            {
                "tokens_per_s": tokens / seconds,
                "train_tokens": tokens,
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
                "ppl": final["ppl"],
                "final_params": result["final_params"],
                "stages": result["stages"],
            }
        )
    )


def run_one(args: argparse.Namespace, chunk: int, out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, __file__, "--child", str(chunk), "--out", str(out), "--config", args.config]
    done = subprocess.run([*command, "--overrides", *args.overrides], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def finished_runs(args: argparse.Namespace) -> dict[str, list[dict]]:
    """The runs an earlier invocation with the same config and overrides finished, to resume from."""
    path = Path(args.json)
    empty: dict[str, list[dict]] = {name: [] for name in METHODS}
    if not path.exists():
        return empty
    old = json.loads(path.read_text(encoding="utf-8"))
    same = old.get("overrides") == args.overrides and old.get("config") == os.path.relpath(args.config, ROOT)
    return {name: old["runs"].get(name, [])[: args.rounds] for name in METHODS} if same else empty


def report_of(args: argparse.Namespace, runs: dict[str, list[dict]]) -> dict:
    done = [name for name in METHODS if runs[name]]
    median = {name: {k: statistics.median(r[k] for r in runs[name]) for k in ("tokens_per_s", "peak_rss_gib", "ppl")}
              for name in done}  # fmt: skip
    paired = range(min(len(runs[name]) for name in METHODS))
    round_ratios = [runs["fused"][i]["tokens_per_s"] / runs["unfused"][i]["tokens_per_s"] for i in paired]
    report = {"config": os.path.relpath(args.config, ROOT), "overrides": args.overrides, "rounds": args.rounds,
              "loss_chunk_tokens": METHODS, "runs": runs, "median": median,
              "tokens_per_s_round_ratios": round_ratios}  # fmt: skip
    if round_ratios:
        report["tokens_per_s_ratio"] = statistics.median(round_ratios)
        report["peak_rss_ratio"] = median["fused"]["peak_rss_gib"] / median["unfused"]["peak_rss_gib"]
    return report


def write_atomically(path: Path, report: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main() -> None:
    args = parse_args()
    if args.child is not None:
        return child(args)
    runs = finished_runs(args)
    with tempfile.TemporaryDirectory(prefix="bench_fused_loss_") as tmp:
        for i in range(args.rounds):
            order = list(METHODS) if i % 2 == 0 else list(reversed(METHODS))
            for name in (name for name in order if len(runs[name]) <= i):
                runs[name].append(run_one(args, METHODS[name], Path(tmp) / f"{name}{i}"))
                print(f"round {i + 1} {name}: {runs[name][-1]}", flush=True)
                write_atomically(Path(args.json), report_of(args, runs))
    report = report_of(args, runs)
    print("| loss | tokens/s | peak RSS GiB | final ppl |\n|---|---:|---:|---:|")
    for name, m in report["median"].items():
        print(f"| {name} (loss_chunk_tokens={METHODS[name]}) | {m['tokens_per_s']:.1f} | {m['peak_rss_gib']:.2f} | "
              f"{m['ppl']:.3f} |")  # fmt: skip
    ratios = ", ".join(f"{r:.3f}" for r in report["tokens_per_s_round_ratios"])
    print(f"fused/unfused tokens/s by round: {ratios}; median {report['tokens_per_s_ratio']:.3f}; "
          f"peak RSS {report['peak_rss_ratio']:.3f}")  # fmt: skip
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
