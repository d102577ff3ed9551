"""Width and depth pruning vs units only on SmolLM2-135M (GitHub issue #14, part 4).

Rows: the dense model, then every target (``--targets``; default: 30% of the non-embedding
parameters removed, the comparison's size, and 70M in all) x dims (``units``: neurons and KV groups;
``all``: also hidden channels and whole layers) x mode (``oneshot``: one ``prune_step``, no training;
``incremental``: the default job's controller with ``--train-tokens``). Each row: parameters, the
depth and width reached, held-out perplexity on the calibration domain and on KJV, PIQA and ARC-Easy
(the first ``--limit`` documents), CPU prefill/decode tokens/s and the speed-up over the dense model
timed alternately in the same call. The JSON is rewritten after every configuration, and a rerun
with the same settings skips the rows already there.

    python scripts/bench_shape.py --out docs/shape                        # the full comparison
    python scripts/bench_shape.py --quick --out /tmp/shape_quick          # tiny-random-llama, schema check
    python scripts/bench_shape.py --compensation --out docs/shape_compensation   # the defaults' ablation
    python scripts/bench_shape.py --render-only --out docs/shape          # md and png from the JSON
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import shape_report
from measured import ADAPTIVE, PARALLEL

from adaptprune.allocation import parse_target
from adaptprune.arch import get_adapter
from adaptprune.checkpoint import load_model, load_tokenizer
from adaptprune.config import RunConfig, load_config
from adaptprune.evaluation.perplexity import perplexity
from adaptprune.evaluation.speed import compare_speed
from adaptprune.pruning.step import prune_step
from adaptprune.pruning.surgery import count_parameters, params_after_removing
from adaptprune.run.controller import Controller
from adaptprune.run.run_data import heldout_texts, shared_calibration

ROOT = Path(__file__).resolve().parents[1]
DIMS = {"units": "[neurons,groups]", "all": "[neurons,groups,hidden,layers]"}
COMPENSATIONS = [(False, False), (True, False), (False, True), (True, True)]  # (layer, norm)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"), help="the incremental rows' job")
    p.add_argument("--targets", default="ne:0.30,70M", help="'ne:F' removes F of the non-embedding parameters")
    p.add_argument("--modes", default="oneshot,incremental")
    p.add_argument("--dims", default="units,all")
    p.add_argument("--train-tokens", type=int, default=65536)
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    p.add_argument("--calib-tokens", type=int, default=8192, help="one-shot calibration tokens")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--tasks", default="piqa,arc_easy")
    p.add_argument("--limit", type=int, default=500, help="documents per task (0: all)")
    p.add_argument("--speed-runs", type=int, default=5)
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides for every row (section.key=value)")
    p.add_argument("--out", default="docs/shape")
    p.add_argument("--quick", action="store_true", help="tiny-random-llama, tiny budgets: the JSON schema only")
    p.add_argument("--compensation", action="store_true", help="one-shot ablation of the layer/norm compensation")
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.targets, args.train_tokens, args.calib_tokens = "tiny-random-llama", "ne:0.30", 256, 512
        args.eval_tokens, args.context, args.limit, args.speed_runs, args.tasks = 256, 128, 1, 1, "piqa"
        args.set = [*args.set, "data.seq_len=64", "data.calib_tokens=512", "prune.step_fraction=0.2"]
        args.set += ["train.batch_size=2", "prune.min_neurons=8"]
    return args


def settings(args: argparse.Namespace) -> dict:
    """What a row depends on: rows saved under other settings are never reused."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "render_only", "modes", "dims")}


# ---- configurations -------------------------------------------------------------------------------
def run_config(args: argparse.Namespace, extra: list[str]) -> RunConfig:
    """The rows' common config: the incremental job's YAML, the evaluation texts and budgets, ``extra``."""
    return load_config(
        args.config,
        [
            ADAPTIVE,
            PARALLEL,
            f"model.name={args.model}",
            "data.eval_corpora=[kjv]",
            f"data.eval_tokens={args.eval_tokens}",
            f"data.eval_context={args.context}",
            f"schedule.train_tokens={args.train_tokens}",
            f"train.mixed_precision='{args.mixed_precision}'",  # quoted: YAML reads a bare no as false
            "eval.every_stage=false",
            "output.tensorboard=false",
            *args.set,
            *extra,
        ],
    )


def target_count(text: str, model) -> int:
    if text.startswith("ne:"):
        return params_after_removing(model, float(text[3:]))
    return parse_target(text, count_parameters(model))


def prune_oneshot(args: argparse.Namespace, cfg: RunConfig, target: int, tokenizer) -> tuple:
    """The dense model pruned in one step on ``--calib-tokens`` of the train split; (model, extra row fields)."""
    calib_cfg = load_config(None, [f"data.corpus={cfg.data.corpus}", f"data.calib_tokens={args.calib_tokens}"])
    calibration = shared_calibration(calib_cfg, tokenizer)
    model = load_model(args.model)
    start = time.perf_counter()
    report = prune_step(model, calibration, target, cfg.prune, label="(1/1)")
    extra = {"prune_seconds": round(time.perf_counter() - start, 1), "train_tokens": 0}
    if report.shape is not None:
        extra["shape_search"] = report.shape.as_dict()
    return model, extra


def prune_incremental(cfg: RunConfig, out: Path) -> tuple:
    """The controller's job (resumed if its folder holds a checkpoint); (final model, extra row fields)."""
    resume = (out / "checkpoints").exists() and any((out / "checkpoints").glob("stage-*"))
    results = Controller(cfg).run(resume=resume)
    plan = json.loads((out / "plan.json").read_text())
    extra = {
        "prune_seconds": results["prune_seconds_total"],
        "train_tokens": results["history"][-1]["train_tokens"],
        "stage_params": [row["params"] for row in results["history"]],
        "kept_layers": plan.get("layers"),
    }
    return load_model(str(out / "final")), extra


# ---- evaluation ---------------------------------------------------------------------------------------
def evaluate(args: argparse.Namespace, model, dense, tokenizer, texts: dict) -> dict:
    """Perplexities, tasks, shape and speed of one model (``dense`` is timed alternately with it)."""
    from adaptprune.evaluation.tasks import run_tasks

    model.eval()
    adapter = get_adapter(model)
    shapes = [adapter.layer_shape(model, i) for i in range(len(adapter.decoder_layers(model)))]
    tasks = [t for t in args.tasks.split(",") if t]
    speed = compare_speed(dense, model, tokenizer, runs=args.speed_runs)
    return {
        "params": count_parameters(model),
        "layers": len(shapes),
        "hidden": int(model.config.hidden_size),
        "mean_neurons": sum(s.neurons for s in shapes) / len(shapes),
        "mean_kv_groups": sum(s.groups for s in shapes) / len(shapes),
        "ppl": {name: perplexity(model, tokens, context=args.context).ppl for name, tokens in texts.items()},
        "tasks": run_tasks(model, tokenizer, tasks, limit=args.limit or None) if tasks else {},
        "speed": {
            "prefill_tokens_per_s": speed["pruned"]["prefill_tokens_per_s"],
            "decode_tokens_per_s": speed["pruned"]["decode_tokens_per_s"],
            "prefill_speedup": speed["prefill_speedup"],
            "decode_speedup": speed["decode_speedup"],
            "flop_ratio": speed["flop_ratio"],
        },
    }


# ---- the run -------------------------------------------------------------------------------------------
def plan_rows(args: argparse.Namespace, dense) -> list[dict]:
    """Every configuration to run, in table order (dense first)."""
    rows = [{"key": "dense", "mode": "dense", "dims": None, "target": None, "target_label": "dense"}]
    for label in args.targets.split(","):
        target = target_count(label, dense)
        for mode in args.modes.split(","):
            for dims in args.dims.split(","):
                key = f"{mode}|{dims}|{target}"
                rows.append({"key": key, "mode": mode, "dims": dims, "target": target, "target_label": label})
    return rows


def run_row(args: argparse.Namespace, row: dict, dense, tokenizer, texts: dict) -> dict:
    start = time.perf_counter()
    if row["mode"] == "dense":
        model, extra = load_model(args.model), {"prune_seconds": 0.0, "train_tokens": 0}
    else:
        out = Path(args.out).parent / "shape_runs" / row["key"].replace("|", "_")
        overrides = [f"prune.target_params={row['target']}", f"prune.dims={DIMS[row['dims']]}", f"output.dir={out}"]
        cfg = run_config(args, overrides)
        if row["mode"] == "oneshot":
            model, extra = prune_oneshot(args, cfg, row["target"], tokenizer)
        else:
            model, extra = prune_incremental(cfg, out)
    result = {**row, **extra, **evaluate(args, model, dense, tokenizer, texts)}
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    del model
    gc.collect()
    return result


def save(args: argparse.Namespace, rows: list[dict]) -> None:
    """The JSON, atomically (an interrupted run keeps every finished row)."""
    path = Path(args.out).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"settings": settings(args), "rows": rows}, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def finished(args: argparse.Namespace) -> dict[str, dict]:
    path = Path(args.out).with_suffix(".json")
    if not path.exists():
        return {}
    saved = json.loads(path.read_text(encoding="utf-8"))
    return {r["key"]: r for r in saved.get("rows", [])} if saved.get("settings") == settings(args) else {}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render_only:
        shape_report.write(args, json.loads(Path(args.out).with_suffix(".json").read_text())["rows"])
        return
    if args.compensation:
        return compensation_ablation(args)
    tokenizer = load_tokenizer(args.model)
    dense = load_model(args.model)
    texts = heldout_texts(run_config(args, []), tokenizer)
    done, rows = finished(args), []
    for row in plan_rows(args, dense):
        if row["key"] in done:
            print(f"[bench_shape] {row['key']}: reused from {Path(args.out).with_suffix('.json')}", flush=True)
            rows.append(done[row["key"]])
            continue
        print(f"[bench_shape] {row['key']} ...", flush=True)
        rows.append(run_row(args, row, dense, tokenizer, texts))
        print(f"[bench_shape] {shape_report.row_line(rows[-1])}", flush=True)
        save(args, rows + [r for k, r in done.items() if k not in {x["key"] for x in rows}])
    save(args, rows)
    shape_report.write(args, rows)


# ---- the compensation defaults ------------------------------------------------------------------------------
def compensation_ablation(args: argparse.Namespace) -> None:
    """One-shot, all four dims with a fixed (layers, hidden) share, each compensation on and off:
    held-out perplexity in and out of the calibration domain decides the defaults."""
    tokenizer = load_tokenizer(args.model)
    dense = load_model(args.model)
    target = target_count(args.targets.split(",")[0], dense)
    texts = heldout_texts(run_config(args, []), tokenizer)
    done, rows = finished(args), []
    for layer_comp, norm_comp in COMPENSATIONS:
        key = f"layer={layer_comp}|norm={norm_comp}"
        if key in done:
            rows.append(done[key])
            continue
        overrides = [f"prune.target_params={target}", f"prune.dims={DIMS['all']}", "prune.layer_grid=0.25"]
        overrides += ["prune.hidden_grid=0.25", f"prune.layer_compensation={layer_comp}"]
        cfg = run_config(args, [*overrides, f"prune.norm_compensation={norm_comp}"])
        model, extra = prune_oneshot(args, cfg, target, tokenizer)
        ppl = {name: perplexity(model, tokens, context=args.context).ppl for name, tokens in texts.items()}
        rows.append({"key": key, "layer_compensation": layer_comp, "norm_compensation": norm_comp, "ppl": ppl,
                     "params": count_parameters(model), "layers": model.config.num_hidden_layers,
                     "hidden": model.config.hidden_size, **extra})  # fmt: skip
        print(f"[bench_shape] {key}: {ppl}", flush=True)
        save(args, rows)
    shape_report.write_compensation(args, rows, target)


if __name__ == "__main__":
    main()
