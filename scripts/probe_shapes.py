"""Choose a target shape up front: cut the dense model once to each candidate and compare training-split loss.

Every candidate is reached in one ``shape.reach.reach_shape`` (layers by influence, hidden by Minitron
scores, units by importance; ``shape.choice.probe_shape``, the adaptive allocation whatever an override
says, as ``prune.target_shape=search`` cuts) from one calibration batch, then scored by its mean LM loss on
``--probe-tokens`` tokens of the *training* split that were not used to calibrate: more text than one
calibration batch, and never the held-out text the results are reported on. Prints a table and writes
JSON; the lowest loss is the shape to hand to ``prune.target_shape``.

    python scripts/probe_shapes.py --out docs/shape_probe \\
        --shapes 22x384x3x1536,20x448x2x1472,22x448x2x1312,20x512x2x1152,22x576x2x768
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from adaptprune.checkpoint import load_model, load_tokenizer
from adaptprune.config import load_config
from adaptprune.pruning.shape.choice import probe_shape
from adaptprune.pruning.shape.target import ModelShape
from adaptprune.pruning.surgery import params_after_removing
from adaptprune.run.report import table_head, write_markdown_and_json
from adaptprune.run.run_data import RunData

ROOT = Path(__file__).resolve().parents[1]


def parse_shape(text: str) -> ModelShape:
    layers, hidden, groups, neurons = (int(v) for v in text.lower().split("x"))
    return ModelShape(layers, hidden, groups, neurons)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--shapes", required=True, help="comma list of LAYERSxHIDDENxKV_GROUPSxNEURONS")
    p.add_argument("--remove", type=float, default=0.6, help="the comparison's cut, for the size column")
    p.add_argument("--probe-tokens", type=int, default=16384, help="training-split tokens each candidate is scored on")
    p.add_argument("--out", default="docs/shape_probe")
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, [*args.overrides, "output.dir=unused"])
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
    dense = load_model(cfg.model.name, dtype=cfg.model.dtype).eval()
    target = params_after_removing(dense, args.remove)
    data = RunData(cfg, tokenizer, 0, 1)
    source = data.calibration_source(1, {})
    calib, probe = source.next(), torch.cat([source.next() for _ in range(args.probe_tokens // cfg.data.calib_tokens)])
    rows = []
    for text in args.shapes.split(","):
        rows.append(probe_shape(dense, parse_shape(text), calib, probe, cfg.prune))  # a copy each: dense stays
        print(f"[probe] {text}: {rows[-1]['params']:,} params, loss {rows[-1]['loss']:.4f}", flush=True)
    lines = [
        f"# Target shapes probed one-shot at −{args.remove:.0%} ({target:,} parameters ±0.5%)",
        "",
        f"{cfg.model.name}; each candidate cut once from the dense model (`prune.compensation={cfg.prune.compensation}`,"
        f" `prune.allocation=adaptive`, as `prune.target_shape=search` cuts) on {calib.numel():,} calibration tokens, scored by mean LM loss on {probe.numel():,} other "
        f"training-split tokens (not the held-out text). Produced by `python scripts/probe_shapes.py --shapes "
        f"{args.shapes}`.",
        "",
        *table_head(["layers", "hidden", "KV groups", "neurons", "params", "vs target", "probe loss", "s"], left=0),
    ]
    for r in sorted(rows, key=lambda r: r["loss"]):
        s = r["shape"]
        lines.append(
            f"| {s['layers']} | {s['hidden']} | {s['groups']} | {s['neurons']} | {r['params']:,} | "
            f"{r['params'] / target - 1:+.2%} | {r['loss']:.4f} | {r['seconds']:.0f} |"
        )
    payload = {"target": target, "remove": args.remove, "probe_tokens": int(probe.numel()), "rows": rows}
    write_markdown_and_json(Path(args.out), "\n".join(lines), payload)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
