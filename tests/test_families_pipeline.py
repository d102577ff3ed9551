"""Every supported family runs the whole pipeline: one-shot prune and a 2-stage controller run.

Tiny random models (vocab 512, the BPE of the embedded tiny model) are saved as ordinary HF
folders and given to the same entry points a user calls.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from adaptprune.checkpoint import load_model, load_tokenizer
from adaptprune.config import load_config
from adaptprune.controller import Controller
from adaptprune.inspection import describe
from adaptprune.oneshot import run_oneshot

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
)
FAMILIES = {
    "llama": dict(intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "mistral": dict(intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32),
    "opt": dict(ffn_dim=96, num_attention_heads=4, word_embed_proj_dim=64, dropout=0.0),
    "phi3": dict(
        intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, original_max_position_embeddings=256
    ),
    "gemma3_text": dict(
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=32,
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-random-llama")


@pytest.fixture(params=sorted(FAMILIES))
def model_dir(request, tmp_path, tokenizer) -> Path:
    torch.manual_seed(0)
    config = AutoConfig.for_model(request.param, **COMMON, **FAMILIES[request.param])
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path / request.param
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _config(model_dir: Path, out: Path, extra: list[str] = ()):
    return load_config(
        None,
        [
            f"model.name={model_dir}",
            "prune.target_params=0.9x",
            "prune.step_fraction=0.06",
            "prune.min_neurons=8",
            "data.seq_len=64",
            "data.calib_tokens=512",
            "data.eval_tokens=256",
            "data.eval_context=64",
            "schedule.train_tokens=1024",
            "train.batch_size=2",
            "output.tensorboard=false",
            f"output.dir={out}",
            *extra,
        ],
    )


def test_oneshot_prune_then_inspect(model_dir, tmp_path):
    metrics = run_oneshot(_config(model_dir, tmp_path / "unused"), tmp_path / "oneshot", progress=False)
    assert metrics["params_after"] <= metrics["target_params"]
    assert metrics["ppl_after"]["ppl"] < float("inf")
    info = describe(load_model(str(tmp_path / "oneshot" / "model")))
    assert info["total_params"] == metrics["params_after"]
    for name in ("plan.json", "metrics.json", "config.yaml", "layer_sizes.png"):
        assert (tmp_path / "oneshot" / name).exists()


def test_two_stage_controller_run(model_dir, tmp_path):
    results = Controller(_config(model_dir, tmp_path / "run", ["eval.every_stage=false"])).run()
    assert results["stages"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert sum(p.numel() for p in {id(p): p for p in reloaded.parameters()}.values()) == results["final_params"]
