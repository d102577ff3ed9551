"""Scaling benchmarks for issue #13: data memory vs corpus size, bf16 vs fp32 training speed, the 3B plan.

(a) Peak RSS of the streaming data path vs corpus size: parquet shards of random words (about 2.2M
    tiny-BPE tokens each, written by ``tests/test_data_memory.py``'s generator), each corpus opened
    in a fresh subprocess by that test's probe (size check, held-out text, three calibration draws,
    20 training batches). The peak must not grow with the corpus.
(b) Training tokens/s of the default job's training phase on this CPU, fp32 vs bf16 autocast: the
    embedded SmolLM2-135M, micro-batch 4 x 256 Shakespeare tokens, the real ``FullTrainer`` under an
    ``Accelerator(mixed_precision=...)``. Both start from the same weights on the same batches;
    rounds alternate the two so machine-load drift hits both; warm-up steps are not timed.
(c) ``adaptprune plan`` for Llama-3.2-3B -> 1.24B (the recipe), on 1 and on 8 GPUs.

    python scripts/bench_scale.py                    # writes docs/bench_scale.json and docs/bench_scale.md
    python scripts/bench_scale.py --shards 1,10      # skip the ~220M-token corpus
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ holds the corpus generator and memory probe (reused, not copied)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", default="1,10,100", help="corpus sizes in shards of ~2.2M tokens")
    p.add_argument("--rounds", type=int, default=2, help="alternating fp32/bf16 rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of every round")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and precision")
    p.add_argument("--skip", default="", help="comma list of parts to skip: data,precision,plan")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_scale"))
    return p.parse_args(argv)


# ---- (a) data memory -------------------------------------------------------------------------
def tokens_per_char(folder: Path) -> float:
    """Tiny-BPE tokens per character, from the first 40 documents of the first shard."""
    import pyarrow.parquet as pq

    from adaptprune.checkpoint import load_tokenizer

    tok = load_tokenizer("tiny-random-llama")
    sample = pq.read_table(next(iter(sorted(folder.glob("*.parquet"))))).column("text").to_pylist()[:40]
    return sum(len(ids) for ids in tok(sample, add_special_tokens=False)["input_ids"]) / sum(map(len, sample))


def data_memory(shard_counts: list[int]) -> list[dict]:
    """One row per corpus size: shards, estimated tokens, generation and probe seconds, peak RSS."""
    from tests.test_data_memory import _peak_mb, _write_shards

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_scale-") as tmp:
        for shards in shard_counts:
            folder = Path(tmp) / f"corpus-{shards}"
            start = time.perf_counter()
            chars = _write_shards(folder, shards)
            generated = time.perf_counter() - start
            start = time.perf_counter()
            peak = _peak_mb(folder)
            probed = time.perf_counter() - start
            size = sum(f.stat().st_size for f in folder.iterdir())
            row = {"shards": shards, "tokens": round(chars * tokens_per_char(folder)), "bytes_on_disk": size}
            rows.append(row | {"generate_s": round(generated, 1), "probe_s": round(probed, 1), "peak_rss_mb": peak})
            print(f"[bench_scale] corpus of {row['tokens'] / 1e6:.0f}M tokens: peak RSS {peak:.0f} MB", flush=True)
            for f in folder.iterdir():  # free the disk before the next size
                f.unlink()
    return rows


# ---- (b) bf16 vs fp32 ------------------------------------------------------------------------
def shakespeare_batches(count: int, batch_size: int = 4, seq_len: int = 256) -> list:
    """The default job's first training batches (SmolLM2 tokenizer, embedded Shakespeare train split)."""
    from itertools import islice

    from adaptprune.checkpoint import load_tokenizer
    from adaptprune.config import DataConfig
    from adaptprune.data import open_corpus

    corpus = open_corpus(DataConfig(), load_tokenizer("smollm2-135m"), seed=0, batch_size=batch_size)
    return [batch for batch, _ in islice(corpus.train_batches(batch_size, seq_len), count)]


def train_round(model, initial: dict, precision: str, batches: list, warmup: int) -> dict:
    """Reset the weights, train len(batches) steps with ``precision``; timed after ``warmup`` steps."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from adaptprune.config import TrainConfig
    from trainers import FullTrainer

    model.load_state_dict(initial)
    AcceleratorState._reset_state(True)  # accelerate keeps one process-wide precision
    acc = Accelerator(cpu=True, mixed_precision=precision)
    trainer = FullTrainer(model, acc, TrainConfig(mixed_precision=precision))
    seconds: list[float] = []
    losses: list[float] = []

    def on_step(m: dict) -> None:
        losses.append(m["loss"])
        if len(losses) > warmup:
            seconds.append(batches[0].numel() / m["tokens_per_s"])

    trainer.run_phase(iter(batches), len(batches), lambda step: 5e-5, 0, on_step)
    trainer.before_surgery()  # release the prepared wrappers
    AcceleratorState._reset_state(True)
    return {"tokens_per_s": batches[0].numel() * len(seconds) / sum(seconds), "losses": losses}


def precision_speed(rounds: int, warmup: int, steps: int) -> dict:
    """fp32 vs bf16 autocast tokens/s (median over rounds) and how far their losses drift apart."""
    import torch

    from adaptprune.checkpoint import load_model

    torch.manual_seed(0)
    model = load_model("smollm2-135m")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    batches = shakespeare_batches(warmup + steps)
    runs: dict[str, list[dict]] = {"no": [], "bf16": []}
    for r in range(rounds):
        for precision in ("no", "bf16") if r % 2 == 0 else ("bf16", "no"):
            runs[precision].append(train_round(model, initial, precision, batches, warmup))
            print(
                f"[bench_scale] round {r + 1} {precision}: {runs[precision][-1]['tokens_per_s']:.0f} tok/s", flush=True
            )
    fp32, bf16 = (statistics.median(x["tokens_per_s"] for x in runs[p]) for p in ("no", "bf16"))
    a, b = runs["no"][0]["losses"], runs["bf16"][0]["losses"]
    return {
        "fp32_tokens_per_s": fp32,
        "bf16_tokens_per_s": bf16,
        "ratio_bf16_over_fp32": bf16 / fp32,
        "fp32_rounds_tokens_per_s": [x["tokens_per_s"] for x in runs["no"]],
        "bf16_rounds_tokens_per_s": [x["tokens_per_s"] for x in runs["bf16"]],
        "rounds": rounds,
        "timed_steps": steps,
        "warmup_steps": warmup,
        "micro_batch": list(batches[0].shape),
        "fp32_losses": a,
        "bf16_losses": b,
        "losses_finite": all(map(math.isfinite, a + b)),
        "max_relative_loss_gap": max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)),
    }


# ---- (c) plan ------------------------------------------------------------------------------
def llama_plan() -> dict:
    from adaptprune.config import load_config
    from adaptprune.plan import PlanOptions, format_plan, make_plan

    cfg = load_config(ROOT / "configs" / "llama-3.2-3b-to-1b.yaml")
    plans = {gpus: make_plan(cfg, PlanOptions(gpus=gpus)) for gpus in (1, 8)}
    return {f"gpus_{g}": {"json": p.to_json(), "text": format_plan(p)} for g, p in plans.items()}


# ---- report --------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    """The tables for the README."""
    lines = [f"Machine: {report['machine']}.", ""]
    if "data" in report:
        lines += [
            "**Data path, peak RSS vs corpus size** (streaming parquet shards; a fresh process per corpus opens it, "
            "reads held-out text, draws three calibration sets and 20 training batches):",
            "",
            "| corpus tokens | shards | on disk | generate s | probe s | peak RSS MB |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["data"]:
            lines.append(
                f"| {r['tokens'] / 1e6:,.0f}M | {r['shards']} | {r['bytes_on_disk'] / 2**20:,.0f} MiB | "
                f"{r['generate_s']:.0f} | {r['probe_s']:.0f} | {r['peak_rss_mb']:.0f} |"
            )
        lines.append("")
    if "precision" in report:
        p = report["precision"]
        lines += [
            f"**Training speed on this CPU**, SmolLM2-135M, micro-batch {p['micro_batch'][0]} x {p['micro_batch'][1]}, "
            f"`FullTrainer` (median of {p['rounds']} alternating rounds of {p['timed_steps']} timed steps after "
            f"{p['warmup_steps']} warm-up steps):",
            "",
            "| precision | tokens/s |",
            "|---|---:|",
            f"| fp32 | {p['fp32_tokens_per_s']:.0f} |",
            f"| bf16 autocast (fp32 master weights) | {p['bf16_tokens_per_s']:.0f} |",
            "",
            f"bf16 / fp32: **{p['ratio_bf16_over_fp32']:.2f}x**. Losses finite: {p['losses_finite']}; largest "
            f"relative gap between the two runs' per-step losses (same weights, same batches): "
            f"{p['max_relative_loss_gap']:.2%}.",
            "",
        ]
    if "plan" in report:
        lines += ["**`adaptprune plan --config configs/llama-3.2-3b-to-1b.yaml --gpus 8`:**", "", "```"]
        lines += [report["plan"]["gpus_8"]["text"], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import os
    import platform

    args = parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    load = os.getloadavg()
    report: dict = {}
    started = time.perf_counter()
    if "data" not in skip:
        report["data"] = data_memory([int(s) for s in args.shards.split(",") if s.strip()])
    if "precision" not in skip:
        report["precision"] = precision_speed(args.rounds, args.warmup, args.steps)
    if "plan" not in skip:
        report["plan"] = llama_plan()
    end_load = os.getloadavg()
    report["machine"] = (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other jobs: "
        f"load average {load[0]:.1f} at the start, {end_load[0]:.1f} at the end; {time.perf_counter() - started:.0f} s"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
