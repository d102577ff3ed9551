"""Training benchmarks for the controller (issue: prune-train controller).

1. Throughput: tokens/s of our trainer (``trainers.FullTrainer.run_phase``) vs a plain
   accelerate loop (forward, backward, AdamW step) on the same model and batches, measured
   alternately in one run; the ratio is what to quote.
2. Pruning overhead: the share of a run's wall time spent in calibration + scoring + surgery.
3. Incremental vs one-shot: the default incremental schedule vs pruning to the same size in
   one step followed by the same number of training tokens; final held-out perplexity.

    python scripts/bench_train.py --out docs/bench_train
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from adaptprune.checkpoint import load_model
from adaptprune.config import TrainConfig, from_dict, load_config
from adaptprune.run.controller import Controller
from trainers import FullTrainer

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round and method")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-runs", action="store_true", help="only the throughput comparison")
    p.add_argument("--out", default="docs/bench_train")
    return p.parse_args()


def plain_loop_tokens_per_s(model, acc: Accelerator, batches: list[torch.Tensor]) -> float:
    """The reference: the simplest accelerate training loop there is."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model, optimizer = acc.prepare(model, optimizer)
    model.train()
    start = time.perf_counter()
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    acc.free_memory()
    return sum(b.numel() for b in batches) / elapsed


def ours_tokens_per_s(model, acc: Accelerator, batches: list[torch.Tensor]) -> float:
    trainer = FullTrainer(model, acc, from_dict(TrainConfig, {"optim": {"weight_decay": 0.0, "grad_clip": 0.0}}))
    result = trainer.run_phase(iter(batches), len(batches), lambda step: 1e-5, 0)
    trainer.before_surgery()  # release the prepared wrappers
    acc.free_memory()
    return result.tokens / result.seconds


def throughput(args) -> dict:
    acc = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    vocab = 49152
    batches = [torch.randint(0, vocab, (args.batch_size, args.seq_len)) for _ in range(args.steps)]
    ours, plain = [], []
    model_ours, model_plain = load_model("smollm2-135m"), load_model("smollm2-135m")
    ours_tokens_per_s(model_ours, acc, batches[:1])  # warm-up both paths
    plain_loop_tokens_per_s(model_plain, acc, batches[:1])
    for _ in range(args.rounds):  # alternate so drift in machine load hits both alike
        plain.append(plain_loop_tokens_per_s(model_plain, acc, batches))
        ours.append(ours_tokens_per_s(model_ours, acc, batches))
    result = {
        "ours_tokens_per_s": statistics.median(ours),
        "plain_tokens_per_s": statistics.median(plain),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "batch": [args.batch_size, args.seq_len],
    }
    result["ratio"] = result["ours_tokens_per_s"] / result["plain_tokens_per_s"]
    return result


def run(config_path: str, out: Path, extra: list[str]) -> dict:
    config = load_config(config_path, [f"output.dir={out}", *extra])
    return Controller(config).run()


def main() -> None:
    args = parse_args()
    report = {"throughput": throughput(args)}
    t = report["throughput"]
    lines = [
        "| trainer | tokens/s |",
        "|---|---:|",
        f"| plain accelerate loop | {t['plain_tokens_per_s']:.1f} |",
        f"| adaptprune FullTrainer | {t['ours_tokens_per_s']:.1f} |",
        "",
        f"Ratio ours/plain: **{t['ratio']:.3f}** (median of {t['rounds']} alternating rounds of "
        f"{t['steps_per_round']} steps, batch {t['batch'][0]}x{t['batch'][1]}, SmolLM2-135M fp32).",
    ]
    if not args.skip_runs:
        runs_dir = ROOT / "runs" / "bench_train"  # checkpoints stay out of docs/
        incremental = run(args.config, runs_dir / "incremental", [])
        oneshot = run(args.config, runs_dir / "oneshot", ["prune.step_fraction=1.0"])
        report["incremental"], report["oneshot"] = incremental, oneshot
        share = incremental["prune_seconds_total"] / incremental["wall_seconds_this_process"]
        report["pruning_share_of_wall_time"] = share
        final = lambda r: r["history"][-1]  # noqa: E731
        lines += [
            "",
            "| schedule | stages | final params | train tokens | final held-out ppl | wall s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in (("incremental (default)", incremental), ("one-shot, then train", oneshot)):
            lines.append(
                f"| {name} | {r['stages']} | {r['final_params']:,} | {final(r)['train_tokens']:,} | "
                f"{final(r)['ppl']:.2f} | {r['wall_seconds_this_process']:.0f} |"
            )
        lines += [
            "",
            f"Calibration + scoring + surgery: {incremental['prune_seconds_total']:.1f} s of "
            f"{incremental['wall_seconds_this_process']:.0f} s wall time in the default run (**{share:.1%}**).",
        ]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
