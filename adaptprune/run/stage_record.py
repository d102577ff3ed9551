"""What the controller records about each stage: its history row, its TensorBoard scalars, the
final results. Pure functions of the model and numbers, so the controller only calls them."""

from __future__ import annotations

import math

from torch import nn

from ..arch import ArchAdapter
from ..evaluation.perplexity import perplexity
from ..pruning.surgery import count_parameters


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN: phases without steps report null."""
    return value if value is not None and math.isfinite(value) else None


def heldout_perplexity(model: nn.Module, heldout: dict, eval_context: int) -> dict[str, dict]:
    """Held-out perplexity on every evaluation text ({name: {ppl, tokens, ...}}; empty when off)."""
    context = min(eval_context, getattr(model.config, "max_position_embeddings", 10**9))
    return {name: perplexity(model, tokens, context=context).as_dict() for name, tokens in heldout.items()}


def history_row(stage: int, model: nn.Module, ppl: dict, prune_s: float, wall_s: float, phase=None, tokens=0) -> dict:
    """One row of ``results.json``'s history (stage 0 = the dense model); ``ppl`` is {text: {ppl, ...}}."""
    phase = phase or {}
    first = next(iter(ppl.values()), None) if ppl else None
    return {
        "stage": stage,
        "params": count_parameters(model),
        "ppl": first["ppl"] if first else None,
        "ppl_by_text": {name: value["ppl"] for name, value in (ppl or {}).items()},
        "train_tokens": tokens,
        "train_loss": finite_or_none(phase.get("loss")),
        "first_step_loss": finite_or_none(phase.get("first_loss")),
        "prune_seconds": round(prune_s, 2),
        "train_seconds": round(phase.get("seconds", 0.0), 2),
        "wall_seconds": round(wall_s, 2),
    }


def pruning_scalars(model: nn.Module, adapter: ArchAdapter, stage: int) -> dict[str, int]:
    """TensorBoard scalars after a stage's surgery: size, depth, width and every layer's kept units."""
    depth, width = len(adapter.decoder_layers(model)), int(model.config.hidden_size)
    scalars = {
        "prune/params": count_parameters(model),
        "prune/stage": stage,
        "prune/layers": depth,
        "prune/hidden_size": width,
    }
    for layer in range(depth):
        shape = adapter.layer_shape(model, layer)
        scalars[f"prune/kept_neurons/layer_{layer:02d}"] = shape.neurons
        scalars[f"prune/kept_groups/layer_{layer:02d}"] = shape.groups
    return scalars


def final_results(original: int, model: nn.Module, stages: int, history: list[dict], final_dir, seconds: float) -> dict:
    """``results.json``: sizes, the stage history, where the model went and the time it took."""
    return {
        "original_params": original,
        "final_params": count_parameters(model),
        "stages": stages,
        "history": history,
        "final_model": str(final_dir),
        "wall_seconds_this_process": round(seconds, 2),
        "prune_seconds_total": round(sum(r["prune_seconds"] for r in history), 2),
    }


def flat_scalars(tree: dict, prefix: str = "") -> dict:
    """TensorBoard hparams take scalars and strings only."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_scalars(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
