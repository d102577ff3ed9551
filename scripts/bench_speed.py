"""Generation speed of a dense model vs a uniformly MLP-pruned copy, measured in one run.

The copy drops the same number of MLP neurons in every layer (the lowest-index ones are kept:
only the shapes matter for timing) until about ``--fraction`` of the non-embedding parameters
are gone. Prints a table and writes the full measurement as JSON.

    python scripts/bench_speed.py --out runs/bench_speed.json            # SmolLM2-135M, CPU
    python scripts/bench_speed.py --device cuda --prompt-tokens 512 --out bench_cuda.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
from pathlib import Path

import torch
from torch import nn

from adaptprune.arch import MLP, get_adapter
from adaptprune.checkpoint import load_model, load_tokenizer
from adaptprune.evaluation.speed import compare_speed
from adaptprune.pruning.surgery import apply_plan, count_non_embedding_parameters


def uniform_mlp_plan(model: nn.Module, fraction: float) -> dict[int, dict[str, list[int]]]:
    """Keep the first k neurons of every MLP so that about ``fraction`` of non-embedding params go."""
    adapter = get_adapter(model)
    layers = range(len(adapter.decoder_layers(model)))
    per_neuron = sum(adapter.params_per_unit(model, i, MLP) for i in layers) / len(layers)
    remove = round(fraction * count_non_embedding_parameters(model) / (len(layers) * per_neuron))
    plan = {}
    for i in layers:
        neurons = adapter.count_units(model, i, MLP)
        if not 0 <= remove < neurons:
            raise ValueError(f"cannot remove {remove} of layer {i}'s {neurons} MLP neurons; lower --fraction")
        plan[i] = {MLP: list(range(neurons - remove))}
    return plan


def print_table(result: dict) -> None:
    dense, pruned = result["dense"], result["pruned"]
    rows = [
        (
            "parameters",
            f"{result['params']['dense']:,}",
            f"{result['params']['pruned']:,}",
            f"{result['param_ratio']:.3f}",
        ),
        (
            "non-embedding params",
            f"{result['non_embedding_params']['dense']:,}",
            f"{result['non_embedding_params']['pruned']:,}",
            f"{result['non_embedding_param_ratio']:.3f}",
        ),
        ("FLOPs/token (ratio)", "", "", f"{result['flop_ratio']:.3f}"),
        (
            "prefill tokens/s",
            f"{dense['prefill_tokens_per_s']:.1f}",
            f"{pruned['prefill_tokens_per_s']:.1f}",
            f"x{result['prefill_speedup']:.2f}",
        ),
        (
            "decode tokens/s",
            f"{dense['decode_tokens_per_s']:.1f}",
            f"{pruned['decode_tokens_per_s']:.1f}",
            f"x{result['decode_speedup']:.2f}",
        ),
        ("ideal speed-up (1/FLOPs)", "", "", f"x{result['ideal_speedup']:.2f}"),
    ]
    print(f"{'':26} {'dense':>14} {'pruned':>14} {'pruned/dense':>13}")
    for name, a, b, r in rows:
        print(f"{name:26} {a:>14} {b:>14} {r:>13}")
    print(
        f"({dense['device']}, {dense['threads']} threads, batch {dense['batch_size']}, prompt {dense['prompt_tokens']}, "
        f"{dense['new_tokens']} new tokens, median of {dense['runs']} runs)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name or checkpoint folder")
    parser.add_argument("--fraction", type=float, default=0.3, help="share of non-embedding parameters to remove")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", type=Path, default=None, help="write the measurement here as JSON")
    args = parser.parse_args()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dense = load_model(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    pruned = copy.deepcopy(dense)
    apply_plan(pruned, uniform_mlp_plan(pruned, args.fraction))
    result = compare_speed(
        dense,
        pruned,
        tokenizer,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        runs=args.runs,
        warmup=args.warmup,
        device=device,
        batch_size=args.batch_size,
    )
    result["setup"] = {
        "model": args.model,
        "fraction": args.fraction,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if str(device).startswith("cuda") else None,
        "mlp_neurons": {
            "dense": get_adapter(dense).count_units(dense, 0, MLP),
            "pruned": get_adapter(pruned).count_units(pruned, 0, MLP),
        },
    }
    print_table(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
