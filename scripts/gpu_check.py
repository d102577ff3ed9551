"""A short bf16 prune-and-train run through the real ``Controller``: tokens/s, MFU and peak memory.

    python scripts/gpu_check.py                          # CUDA: embedded SmolLM2-135M, 2 stages, 300 steps
    python scripts/gpu_check.py --device cpu --quick     # tiny-random-llama, a handful of steps (< 60 s)
    python scripts/gpu_check.py --distill                # the same with the distill trainer: the fused,
                                                         # chunked head + KD loss and the bf16 teacher

It writes a JSON (``--json``, default runs/gpu_check.json) and prints one summary line. Model FLOPs
utilisation is MFU = 6·N·(tokens/s) / peak, with N the parameters of the model each phase trains
(forward 2·N + backward 4·N per token; recomputation, attention and the teacher are not counted, as in
PaLM's definition) and peak the GPU's dense bf16 tensor throughput from ``PEAK_BF16_TFLOPS`` (or
``--peak-tflops``). Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (the process's peak
RSS on CPU), next to what ``adaptprune plan`` predicts for the same config.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core TFLOP/s (no sparsity) from the vendors' data sheets, matched against
# ``torch.cuda.get_device_name()`` in order: the first name contained in it wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)

FULL = {"model": "smollm2-135m", "seq_len": 1024, "batch_size": 8, "steps": 300, "calib_tokens": 16384}
QUICK = {"model": "tiny-random-llama", "seq_len": 64, "batch_size": 4, "steps": 8, "calib_tokens": 512}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny-random-llama and a handful of steps")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps over the whole run")
    p.add_argument("--distill", action="store_true", help="distil from the dense teacher (fused, chunked loss)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak bf16 TFLOP/s (for MFU)")
    p.add_argument("--json", default=str(ROOT / "runs" / "gpu_check.json"), help="where the results go")
    return p.parse_args(argv)


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """``--peak-tflops`` if given, else the table entry whose name ``device_name`` contains (None: unknown)."""
    if override is not None:
        return override
    return next((tflops for name, tflops in PEAK_BF16_TFLOPS if name in device_name), None)


def check_config(args: argparse.Namespace, run_dir: Path):
    """Two stages (0.9x in steps of 5%), bf16 autocast over fp32 master weights, the embedded corpus."""
    from adaptprune.config import load_config

    size = QUICK if args.quick else FULL
    steps = args.steps or size["steps"]
    overrides = [
        f"model.name={size['model']}",
        "model.dtype=float32",
        "data.corpus=shakespeare",
        "data.eval_corpora=[]",
        f"data.seq_len={size['seq_len']}",
        f"data.calib_tokens={size['calib_tokens']}",
        f"data.eval_tokens={4 * size['seq_len']}",
        f"data.eval_context={size['seq_len']}",
        "prune.target_params=0.9x",
        "prune.step_fraction=0.05",
        f"schedule.train_tokens={steps * size['batch_size'] * size['seq_len']}",
        f"train.batch_size={size['batch_size']}",
        "train.mixed_precision=bf16",
        f"output.dir={run_dir}",
        "output.tensorboard=false",
        f"output.log_every={max(1, steps // 10)}",
    ]
    if args.distill:  # train.loss_chunk_tokens keeps its default (chunked); the teacher's dtype is "auto"
        overrides.append("train.trainer=distill")
    return load_config(None, overrides)


def timed_controller(cfg):
    """The real ``Controller``, each training phase timed (CUDA synchronised) with its model's size."""
    import torch

    from adaptprune.pruning.surgery import count_parameters
    from adaptprune.run.controller import Controller

    def sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    class TimedController(Controller):
        def __init__(self, config) -> None:
            super().__init__(config)
            self.phases: list[dict] = []

        def _train_phase(self, state, steps, label):
            sync()
            start = time.perf_counter()
            result = super()._train_phase(state, steps, label)
            sync()
            seconds = time.perf_counter() - start
            params = count_parameters(self.trainer.unwrapped_model())
            self.phases.append({"label": label, "steps": steps, "tokens": result["tokens"], "seconds": seconds})
            self.phases[-1].update(params=params, loss=result["loss"])
            return result

    return TimedController(cfg)


def summarise(phases: list[dict], peak: float | None, num_gpus: int) -> dict:
    """Throughput over every phase and over all but the first (warm-up: kernels, allocator)."""
    steady = phases[1:] or phases
    tokens = sum(p["tokens"] for p in phases)
    seconds = sum(p["seconds"] for p in phases)
    flops = sum(6 * p["params"] * p["tokens"] for p in steady) / sum(p["seconds"] for p in steady)
    return {
        "tokens": tokens,
        "train_seconds": round(seconds, 3),
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_steady": sum(p["tokens"] for p in steady) / sum(p["seconds"] for p in steady),
        "model_tflops_per_s": flops / 1e12,
        "peak_tflops": peak,
        "mfu": flops / (peak * 1e12 * num_gpus) if peak else None,
        "final_loss": phases[-1]["loss"],
        "loss_finite": all(math.isfinite(p["loss"]) for p in phases),
    }


def planned_peak_gib(cfg) -> float:
    """What ``adaptprune plan`` predicts for this config on one GPU (the chosen checkpointing)."""
    from adaptprune.plan import make_plan
    from adaptprune.plan.memory import GIB

    chosen = "checkpointing" if cfg.train.gradient_checkpointing else "no_checkpointing"
    return make_plan(cfg).memory["single"][chosen]["peak"] / GIB


def run_check(args: argparse.Namespace) -> dict:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --device cpu --quick for the CPU check")
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # the Accelerator the controller builds then stays on CPU
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        cfg = check_config(args, Path(tmp) / "run")
        controller = timed_controller(cfg)
        started = time.perf_counter()
        results = controller.run()
        wall = time.perf_counter() - started
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    out = {
        "device": args.device,
        "device_name": name,
        "model": cfg.model.name,
        "mixed_precision": cfg.train.mixed_precision,
        "trainer": cfg.train.trainer,
        "loss_chunk_tokens": cfg.train.loss_chunk_tokens,
        "micro_batch": [cfg.train.batch_size, cfg.data.seq_len],
        "params_dense": results["original_params"],
        "params_final": results["final_params"],
        "stages": results["stages"],
        "phases": controller.phases,
        "wall_seconds": round(wall, 2),
        **summarise(controller.phases, peak_tflops(name, args.peak_tflops), controller.acc.num_processes),
        "planned_peak_gib": planned_peak_gib(cfg),
    }
    if args.device == "cuda":
        out.update(peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30, memory_kind="cuda_max_allocated")
    else:
        out.update(peak_memory_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, memory_kind="max_rss")
    out["peak_over_plan"] = out["peak_memory_gib"] / out["planned_peak_gib"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = run_check(args)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1), encoding="utf-8")
    mfu = f"{out['mfu']:.1%}" if out["mfu"] is not None else "n/a (pass --peak-tflops)"
    print(
        f"gpu_check {out['device_name']}: {out['params_dense']:,} -> {out['params_final']:,} params, "
        f"{out['tokens_per_s_steady']:,.0f} tokens/s (steady), MFU {mfu}, peak memory {out['peak_memory_gib']:.2f} GiB "
        f"({out['memory_kind']}; plan predicts {out['planned_peak_gib']:.2f} GiB), final loss {out['final_loss']:.3f}; "
        f"written {path}"
    )
    return 0 if out["loss_finite"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
