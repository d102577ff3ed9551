"""One-shot structured pruning to an exact size: ``adaptprune prune``.

Loads the model, measures held-out perplexity, runs one ``prune_step`` to the target, measures
again and writes a self-explaining folder: the checkpoint, ``plan.json`` (kept original unit
ids per layer), ``config.yaml``, ``metrics.json`` (sizes, perplexities, seconds and peak memory
per phase) and ``layer_sizes.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .allocation import parse_target
from .checkpoint import atomic_dir, load_model, load_tokenizer, save_checkpoint
from .config import ConfigError, RunConfig, dump_yaml
from .data import load_corpus, pack, token_stream
from .evaluation.perplexity import perplexity
from .inspection import describe
from .pruning import prune_step
from .report import plot_layer_sizes
from .surgery import count_non_embedding_parameters, count_parameters


def run_oneshot(cfg: RunConfig, out_dir: str | Path, progress: bool = True) -> dict:
    out_dir = Path(out_dir)
    model = load_model(cfg.model.name, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    before = count_parameters(model)
    try:
        target = parse_target(cfg.prune.target_params, before)
    except ValueError as err:
        raise ConfigError(f"prune.{err}") from None
    corpus = load_corpus(cfg.data.corpus)
    calib_count = max(1, cfg.data.calib_tokens // cfg.data.seq_len)
    calib = pack(token_stream(corpus["train"], tokenizer, cfg.data.calib_tokens), cfg.data.seq_len, calib_count)
    heldout = token_stream(corpus["heldout"], tokenizer, cfg.data.eval_tokens)
    context = min(cfg.data.eval_context, getattr(model.config, "max_position_embeddings", 10**9))
    dense_info = describe(model)
    ppl_before = perplexity(model, heldout, context=context, progress=progress).as_dict()
    report = prune_step(model, calib, target, cfg.prune, progress=progress, label="(1/1)")
    ppl_after = perplexity(model, heldout, context=context, progress=progress).as_dict()
    metrics = {
        "params_before": before,
        "params_after": count_parameters(model),
        "target_params": target,
        "non_embedding_before": dense_info["non_embedding_params"],
        "non_embedding_after": count_non_embedding_parameters(model),
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "phases": report.profile.as_dict(),
        "calibration_tokens": calib.numel(),
    }
    plan = {str(r.layer): {} for r in report.records}
    for r in report.records:
        plan[str(r.layer)][r.kind] = list(r.kept)
    with atomic_dir(out_dir) as tmp:
        save_checkpoint(model, tmp / "model", tokenizer)
        (tmp / "plan.json").write_text(json.dumps(plan))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        dump_yaml(cfg, tmp / "config.yaml")
        plot_layer_sizes(dense_info, describe(model), tmp / "layer_sizes.png")
    return metrics
