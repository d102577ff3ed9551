"""One-shot structured pruning to an exact size: ``adaptprune prune``.

Loads the model, measures held-out perplexity, runs one step to the target (``shape.reach.prune_once``), measures
again and writes a self-explaining folder: the checkpoint, ``plan.json`` (kept original unit
ids per layer that lost units, plus the original ``layers`` and ``hidden`` channels kept when the
step reshaped the model, see ``kept_ids``), ``config.yaml``, ``metrics.json`` (sizes, depth and
width, perplexities, the shape search, seconds and peak memory per phase) and ``layer_sizes.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..arch import get_adapter
from ..checkpoint import atomic_dir, load_model, load_tokenizer, save_checkpoint
from ..config import ConfigError, RunConfig, dump_yaml
from ..evaluation.inspection import describe
from ..evaluation.perplexity import perplexity
from ..pruning.shape.choice import ShapeChoice, choose_shape
from ..pruning.shape.reach import prune_once
from ..pruning.shape.target import plan_walk
from ..pruning.surgery import count_non_embedding_parameters, count_parameters
from .feasibility import Sizing, size_run
from .kept_ids import changed_kept_ids, compose_kept_ids, initial_kept_ids
from .report import plot_layer_sizes
from .run_data import heldout_texts, shared_calibration, training_chunks


def run_oneshot(cfg: RunConfig, out_dir: str | Path, progress: bool = True) -> dict:
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    m = cfg.model
    sizing = size_run(cfg)  # the target against the floors, on the meta device: before any weights load
    tokenizer = load_tokenizer(m.tokenizer or m.name, trust_remote_code=m.trust_remote_code)
    model = load_model(m.name, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
    before = count_parameters(model)
    choice = _search_shape(model, cfg, tokenizer, sizing, progress) if sizing.candidates is not None else None
    walk = plan_walk(model, cfg.prune, searched=choice.chosen) if choice is not None else sizing.walk
    target = walk.final if walk is not None else sizing.target
    calibration = shared_calibration(cfg, tokenizer)  # (N, L) from the start of the train split
    texts = heldout_texts(cfg, tokenizer)
    dense_info = describe(model)
    dense_ids = initial_kept_ids(model, get_adapter(model))
    ppl_before = _perplexities(model, texts, cfg, progress)
    report = prune_once(model, calibration, target, cfg.prune, walk, progress, "(1/1)")
    ppl_after = _perplexities(model, texts, cfg, progress)
    first = next(iter(texts))
    metrics = {
        "params_before": before,
        "params_after": count_parameters(model),
        "target_params": target,
        "non_embedding_before": dense_info["non_embedding_params"],
        "non_embedding_after": count_non_embedding_parameters(model),
        "ppl_before": ppl_before[first],
        "ppl_after": ppl_after[first],
        "ppl_before_by_text": ppl_before,
        "ppl_after_by_text": ppl_after,
        "phases": report.profile.as_dict(),
        "inner_steps": report.inner_steps,
        "calibration_tokens": calibration.numel(),
        "layers": [dense_info["num_layers"], len(get_adapter(model).decoder_layers(model))],
        "hidden_size": [dense_info["hidden_size"], int(model.config.hidden_size)],
    }
    if choice is not None:
        metrics["shape_choice"] = choice.as_dict()  # every candidate's probe loss and the one walked to
    if report.shape is not None:
        metrics["shape"] = report.shape.as_dict()  # the (layers, hidden) candidates tried and the one kept
    plan = changed_kept_ids(dense_ids, compose_kept_ids(dense_ids, report.records))
    with atomic_dir(out_dir) as tmp:
        save_checkpoint(model, tmp / "model", tokenizer)
        (tmp / "plan.json").write_text(json.dumps(plan))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        dump_yaml(cfg, tmp / "config.yaml")
        plot_layer_sizes(dense_info, _by_original_layer(describe(model), plan, dense_info), tmp / "layer_sizes.png")
    return metrics


def check_out_dir(out_dir: Path) -> None:
    """``--out`` must be a folder to create or replace, under a folder (or a path to one) that is not a file."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; give a folder to write the pruned model into")
    parent = next((p for p in out_dir.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--out {out_dir}: {parent} is a file, not a folder")


def _search_shape(model, cfg: RunConfig, tokenizer, sizing: Sizing, progress: bool) -> ShapeChoice:
    """prune.target_shape=search: probe the candidates at prune.target_params on training-split text."""
    return choose_shape(model, sizing.candidates, training_chunks(cfg, tokenizer), cfg.prune, progress)


def _by_original_layer(pruned: dict, plan: dict, dense: dict) -> dict:
    """``describe`` rows of the pruned model at their original layer ids; removed layers as empty rows."""
    original = plan.get("layers", [row["layer"] for row in dense["layers"]])
    rows = {layer: {**row, "layer": layer} for layer, row in zip(original, pruned["layers"], strict=True)}
    empty = {"query_heads": 0, "kv_heads": 0, "mlp_neurons": 0, "params": 0}
    return {**pruned, "layers": [rows.get(row["layer"], {**empty, "layer": row["layer"]}) for row in dense["layers"]]}


def _perplexities(model, texts: dict, cfg: RunConfig, progress: bool) -> dict[str, dict]:
    context = min(cfg.data.eval_context, getattr(model.config, "max_position_embeddings", 10**9))
    return {name: perplexity(model, t, context=context, progress=progress).as_dict() for name, t in texts.items()}
