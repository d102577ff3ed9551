"""The family table of the conformance suite: one tiny random model per supported family, the
unit plan each is pruned with, what is specific to its layout, and its parameter count worked out
from the config alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from adaptprune.arch import ATTENTION, MLP, hf_compat

REMOVED = {  # {layer: {kind: unit ids to remove}}
    0: {MLP: [1, 5, 50, 95], ATTENTION: [0]},
    1: {MLP: list(range(0, 96, 3))},
    2: {ATTENTION: [1], MLP: [7]},
}
HIDDEN_REMOVED = [0, 3, 10, 17, 21, 22, 33, 40, 47, 50, 58, 61, 63]  # 64 -> 51 channels: no head count divides it
KEEP_HIDDEN = [c for c in range(64) if c not in HIDDEN_REMOVED]
KEEP_LAYERS = [1, 2]  # drops layer 0: the kept ones move down one index
SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
GQA = dict(intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)


def _llama_like_checks(model: nn.Module) -> None:
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (2 * 16, 64) and attention.k_proj.weight.shape == (16, 64)
    assert model.config.per_layer_config[1].intermediate_size == 64
    assert model.config.per_layer_config[2].num_key_value_heads == 1


def _qwen2_checks(model: nn.Module) -> None:
    _llama_like_checks(model)
    attention = model.model.layers[2].self_attn
    assert attention.q_proj.bias.shape == (32,) and attention.v_proj.bias.shape == (16,)


def _qwen3_checks(model: nn.Module) -> None:
    _llama_like_checks(model)
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (16,)  # one per head_dim, all heads


def _gemma3_checks(model: nn.Module) -> None:
    attention = model.model.layers[2].self_attn
    assert attention.q_proj.weight.shape == (32, 64) and attention.q_norm.weight.shape == (16,)
    assert attention.sliding_window == 8
    assert model.config.per_layer_config[1].intermediate_size == 64


def _opt_checks(model: nn.Module) -> None:
    layer = model.model.decoder.layers[2]
    assert layer.self_attn.num_heads == 2
    assert layer.self_attn.q_proj.bias.shape == (32,) and layer.self_attn.out_proj.bias.shape == (64,)
    assert layer.fc1.bias.shape == (95,) and layer.fc2.weight.shape == (64, 95)
    assert model.config.per_layer_config[2].num_attention_heads == 2
    assert model.config.per_layer_config[1].ffn_dim == 64


def _phi3_checks(model: nn.Module, kv_heads: int = 2, n_rep: int = 2) -> None:
    attention = model.model.layers[2].self_attn
    assert attention.num_key_value_heads == kv_heads - 1
    assert attention.qkv_proj.weight.shape == ((kv_heads - 1) * (n_rep + 2) * 16, 64)
    assert attention.config.num_attention_heads == (kv_heads - 1) * n_rep
    assert model.model.layers[1].mlp.gate_up_proj.weight.shape == (2 * 64, 64)


@dataclass(frozen=True)
class Family:
    """One row of the table: how to build the tiny model and what its pruned layout must show."""

    model_type: str
    family: str  # the adapter's family name
    hetero_class: str
    config: dict
    unit_checks: Callable[[nn.Module], None]
    removed: dict = field(default_factory=lambda: REMOVED)


FAMILIES = {
    f.model_type: f
    for f in (
        Family("llama", "llama", "AdaptLlamaForCausalLM", dict(**GQA, tie_word_embeddings=True), _llama_like_checks),
        Family("qwen2", "qwen2", "AdaptQwen2ForCausalLM", dict(**GQA, tie_word_embeddings=False), _qwen2_checks),
        Family(
            "qwen3",
            "qwen3",
            "AdaptQwen3ForCausalLM",
            dict(**GQA, head_dim=16, tie_word_embeddings=False),
            _qwen3_checks,
        ),
        Family(
            "mistral",
            "mistral",
            "AdaptMistralForCausalLM",
            dict(**GQA, head_dim=16, sliding_window=8, tie_word_embeddings=False),  # window < 12 tokens
            _llama_like_checks,
        ),
        Family(
            "phi3",
            "phi3",
            "AdaptPhi3ForCausalLM",
            dict(**GQA, original_max_position_embeddings=128, tie_word_embeddings=False),
            _phi3_checks,
        ),
        Family(
            "opt",
            "opt",
            "AdaptOPTForCausalLM",
            dict(ffn_dim=96, num_attention_heads=4, word_embed_proj_dim=64, dropout=0.0),  # tied head
            _opt_checks,
            {**REMOVED, 2: {ATTENTION: [1, 3], MLP: [7]}},
        ),
        Family(
            "gemma3_text",
            "gemma3",
            "AdaptGemma3ForCausalLM",
            dict(
                **GQA,
                head_dim=16,
                query_pre_attn_scalar=16,
                sliding_window=8,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            ),  # tied head
            _gemma3_checks,
        ),
    )
}


def hf_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """HF's own class, random weights; biases and norm weights perturbed so every weight counts."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**SIZES, **FAMILIES[model_type].config, **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # HF initialises biases and norms to constants
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


# ---- parameter count from the config alone ---------------------------------------------------------
def _layer_params(model_type: str, cfg, hidden: int, head_dim: int) -> int:
    heads = cfg.num_attention_heads
    if model_type == "opt":
        width, ffn = heads * head_dim, cfg.ffn_dim
        return 3 * (hidden * width + width) + width * hidden + hidden + 2 * hidden * ffn + ffn + hidden + 4 * hidden
    kv, inter = cfg.num_key_value_heads, cfg.intermediate_size
    q, kv_width = heads * head_dim, kv * head_dim
    attention = hidden * (q + 2 * kv_width) + q * hidden
    attention += q + 2 * kv_width if model_type == "qwen2" else 0  # q/k/v biases
    attention += 2 * head_dim if model_type in ("qwen3", "gemma3_text") else 0  # shared q/k norms
    norms = (4 if model_type == "gemma3_text" else 2) * hidden
    return attention + 3 * hidden * inter + norms


def expected_params(model_type: str, config) -> int:
    """Every parameter of the family's layout, counted from ``config`` (per-layer sizes included)."""
    hidden, vocab, head_dim = config.hidden_size, config.vocab_size, config.head_dim
    layers = sum(
        _layer_params(model_type, hf_compat.layer_config(config, i), hidden, head_dim)
        for i in range(config.num_hidden_layers)
    )
    if model_type == "opt":
        proj = config.word_embed_proj_dim
        projections = 2 * proj * hidden if proj != hidden else 0
        return vocab * proj + (config.max_position_embeddings + 2) * hidden + projections + 2 * hidden + layers
    head = 0 if config.tie_word_embeddings else vocab * hidden
    return vocab * hidden + head + hidden + layers


# ---- logits without adaptprune -------------------------------------------------------------------
REMOTE_SCRIPT = """
import json, sys, traceback

class BlockAdaptprune:
    def find_spec(self, name, path=None, target=None):
        if name == "adaptprune" or name.startswith("adaptprune."):
            raise ImportError("adaptprune is blocked in this interpreter")
        return None

sys.meta_path.insert(0, BlockAdaptprune())
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

folders, inputs, output = sys.argv[1:-2], sys.argv[-2], sys.argv[-1]
ids = load_file(inputs)["input_ids"]
results, errors = {}, {}
for i, folder in enumerate(folders):
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            results[f"logits{i}"] = model(ids).logits.contiguous()
    except Exception:
        errors[i] = traceback.format_exc()
assert not any(name.split(".")[0] == "adaptprune" for name in sys.modules)
save_file(results, output, metadata={"errors": json.dumps(errors)})
"""


def remote_logits(folders: Sequence[Path], input_ids: torch.Tensor, work: Path) -> list[torch.Tensor | str]:
    """Logits of saved checkpoints loaded with ``trust_remote_code=True`` in one fresh interpreter
    where importing adaptprune fails; a folder that fails gives its traceback instead."""
    import json

    from safetensors import safe_open

    save_file({"input_ids": input_ids.contiguous()}, str(work / "inputs.safetensors"))
    env = {**os.environ, "HF_HOME": str(work / "hf_home"), "HF_HUB_OFFLINE": "1"}
    args = [str(f) for f in folders] + [str(work / "inputs.safetensors"), str(work / "remote.safetensors")]
    subprocess.run([sys.executable, "-c", textwrap.dedent(REMOTE_SCRIPT), *args], check=True, env=env, cwd=work)
    with safe_open(str(work / "remote.safetensors"), "pt") as f:
        errors = json.loads(f.metadata()["errors"])
    out = load_file(str(work / "remote.safetensors"))
    return [errors[str(i)] if str(i) in errors else out[f"logits{i}"] for i in range(len(folders))]
