"""One-shot pruning benchmark on the embedded SmolLM2-135M (issue: importance + allocation).

Every metric x allocation, with and without compensation, at the same parameter count
(about 30% of the non-embedding parameters removed), scored on held-out text. Calibration is
done once (with everything every variant needs) and each variant prunes a fresh copy; the
default path (stade + adaptive + mean compensation) is also timed on its own, phase by phase,
with peak RSS. Prints a markdown table and writes it with the JSON.

    python scripts/bench_oneshot.py --out docs/bench_oneshot
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from pathlib import Path

import psutil

from adaptprune.checkpoint import load_model, load_tokenizer
from adaptprune.config import PruneConfig, load_config
from adaptprune.evaluation.perplexity import perplexity
from adaptprune.importance import METRICS
from adaptprune.pruning.step import calibrate_for, prune_step, prune_with_stats
from adaptprune.pruning.surgery import count_parameters, params_after_removing
from adaptprune.run.run_data import heldout_texts, shared_calibration

ALLOCATIONS = ("uniform", "adaptive", "global")
COMPENSATIONS = {"none": "none", "mean": "mean", "mean+EC": "mean+energy"}  # row label -> prune.compensation


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--remove-fraction", type=float, default=0.30, help="of non-embedding parameters")
    p.add_argument(
        "--metrics",
        default=",".join(m for m in METRICS if m != "taylor_param_first"),
        help="taylor_param_first is left out: it calibrates on its own 512 x 64 tokens (ablate_allocation.py)",
    )
    p.add_argument("--out", default="docs/bench_oneshot")
    p.add_argument("--render-only", action="store_true", help="rewrite the markdown from an existing JSON")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.render_only:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        write(
            argparse.Namespace(**saved["args"]),
            saved["rows"],
            saved["timing"],
            saved["dense_ppl"],
            saved["total_params"],
            saved["target"],
        )
        return
    tok = load_tokenizer(args.model)
    run = load_config(None, [f"model.name={args.model}", f"data.calib_tokens={args.calib_tokens}",
                             f"data.seq_len={args.seq_len}", f"data.eval_tokens={args.eval_tokens}"])  # fmt: skip
    calib = shared_calibration(run, tok)  # (N, L) from the start of the train split
    texts = heldout_texts(run, tok)  # the calibration domain and another (kjv)
    timing, target = time_default_path(args, calib)

    model = load_model(args.model)
    total = count_parameters(model)
    dense_ppl = _ppl(model, texts, args.context)
    print(f"dense: {total:,} params, held-out ppl {dense_ppl}; target {target:,}", flush=True)

    # Shared statistics for all variants (covariance for EC, gradients for Taylor).
    everything = PruneConfig(metric="taylor", compensation="mean+energy")
    stats = calibrate_for(model, calib, everything, report_adapter(model), progress=True)
    rows = []
    for metric in args.metrics.split(","):
        for allocation in ALLOCATIONS:
            for comp, mode in COMPENSATIONS.items():
                cfg = PruneConfig(metric=metric, allocation=allocation, compensation=mode)
                pruned = copy.deepcopy(model)
                t0 = time.perf_counter()
                prune_with_stats(pruned, stats, target, cfg)
                seconds = time.perf_counter() - t0
                ppl = _ppl(pruned, texts, args.context)
                rows.append(
                    {
                        "metric": metric,
                        "allocation": allocation,
                        "compensation": comp,
                        "params": count_parameters(pruned),
                        "ppl": ppl,
                        "score_surgery_seconds": round(seconds, 2),
                    }
                )
                print(f"{metric:>9} {allocation:>8} {comp:>7}: {rows[-1]['params']:,} params, ppl {ppl}", flush=True)
                del pruned
    write(args, rows, timing, dense_ppl, total, target)


def _ppl(model, texts: dict, context: int) -> dict[str, float]:
    return {name: perplexity(model, tokens, context=context).ppl for name, tokens in texts.items()}


def time_default_path(args, calib) -> tuple[dict, int]:
    """Calibration + scoring + surgery of the default config on a freshly loaded model, with
    the process RSS before loading (libraries only) as the baseline for the memory target."""
    rss_libs = psutil.Process().memory_info().rss / 2**20
    model = load_model(args.model)
    target = params_after_removing(model, args.remove_fraction)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    default = PruneConfig(target_params=str(target), metric="stade", allocation="adaptive")
    start = time.perf_counter()
    report = prune_step(model, calib, target, default, progress=False)
    phases = report.profile.as_dict()
    peak = max(p["peak_rss_mb"] for p in phases.values())
    timing = {
        "total_seconds": round(time.perf_counter() - start, 2),
        "phases": phases,
        "model_fp32_mb": round(model_mb, 1),
        "rss_libraries_mb": round(rss_libs, 1),
        "peak_rss_mb": peak,
        "peak_over_libraries_mb": round(peak - rss_libs, 1),
    }
    del model
    gc.collect()
    return timing, target


def report_adapter(model):
    from adaptprune.arch import get_adapter

    return get_adapter(model)


def _find(rows, metric: str, allocation: str, compensation: str) -> dict | None:
    return next(
        (r for r in rows if (r["metric"], r["allocation"], r["compensation"]) == (metric, allocation, compensation)),
        None,
    )


def _best_sentence(rows, text: str) -> str:
    best = min(rows, key=lambda r: r["ppl"][text])
    line = f"Best on {text}: {best['metric']} + {best['allocation']} + {best['compensation']} compensation, "
    line += f"ppl {best['ppl'][text]:.2f}"
    plain, mean = _find(rows, "magnitude", "uniform", "none"), _find(rows, "magnitude", "uniform", "mean")
    if plain and mean:  # only when magnitude was among --metrics
        line += (
            f" ({best['ppl'][text] / plain['ppl'][text]:.1e}x of magnitude + uniform without compensation, "
            f"{plain['ppl'][text]:.2f}; {best['ppl'][text] / mean['ppl'][text]:.3f}x of magnitude + uniform with mean "
            f"compensation, {mean['ppl'][text]:.2f})"
        )
    return line + "."


def write(args, rows, timing, dense_ppl, total, target) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "dense_ppl": dense_ppl,
                "target": target,
                "timing": timing,
                "total_params": total,
                "rows": rows,
                "args": vars(args),
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    texts = list(dense_ppl)
    lines = [
        f"Held-out perplexity ({args.eval_tokens} tokens of each text's held-out split, context {args.context}; "
        f"'{texts[0]}' is the calibration domain) of {args.model} pruned one-shot from {total:,} to ≤{target:,} "
        f"parameters ({args.remove_fraction:.0%} of non-embedding parameters removed), {args.calib_tokens} calibration "
        "tokens, no training. Dense: " + ", ".join(f"{t} {v:.2f}" for t, v in dense_ppl.items()) + ".",
        "",
        "| metric | allocation | " + " | ".join(f"{t} ({c})" for c in COMPENSATIONS for t in texts) + " |",
        "|---|---|" + "---:|" * (len(COMPENSATIONS) * len(texts)),
    ]
    for metric in dict.fromkeys(r["metric"] for r in rows):
        for allocation in ALLOCATIONS:
            cells = [_find(rows, metric, allocation, c)["ppl"][t] for c in COMPENSATIONS for t in texts]
            lines.append(f"| {metric} | {allocation} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
    ph = timing["phases"]
    lines += [
        "",
        *(_best_sentence(rows, t) for t in texts),
        "",
        f"Default path (stade + adaptive + mean compensation) timed alone: calibration {ph['calibration']['seconds']:.1f} s, "
        f"scoring {ph['scoring']['seconds']:.1f} s, surgery {ph['surgery']['seconds']:.1f} s "
        f"(total {timing['total_seconds']:.1f} s); peak RSS {timing['peak_rss_mb']:.0f} MB, of which "
        f"{timing['peak_over_libraries_mb']:.0f} MB above the libraries' own {timing['rss_libraries_mb']:.0f} MB "
        f"(fp32 model: {timing['model_fp32_mb']:.0f} MB, so {timing['peak_over_libraries_mb'] / timing['model_fp32_mb']:.2f}x). "
        "Peak RSS by phase: " + ", ".join(f"{name} {p['peak_rss_mb']:.0f} MB" for name, p in ph.items()) + ".",
    ]
    table = "\n".join(lines)
    print(table)
    out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
