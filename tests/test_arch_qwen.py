"""Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms) and Mistral (sliding window): each gets its
own heterogeneous class, prunes exactly and reloads exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from adaptprune.arch import ATTENTION, MLP, get_adapter
from adaptprune.checkpoint import save_checkpoint, to_heterogeneous
from adaptprune.surgery import apply_plan

from .surgery_helpers import (
    assert_generates,
    assert_hetero_matches_hf,
    assert_reload_is_exact,
    assert_removal_equals_masking,
    keep_plan,
    logits,
    remote_logits,
)

SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
FAMILIES = {
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SIZES)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(head_dim=16, **SIZES)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(head_dim=16, sliding_window=8, **SIZES)),  # window < 12 tokens
}
REMOVED = {
    0: {MLP: [1, 5, 50, 95], ATTENTION: [0]},
    1: {MLP: list(range(0, 96, 3))},
    2: {ATTENTION: [1], MLP: [7]},
}
HETERO_CLASSES = {
    "qwen2": "AdaptQwen2ForCausalLM",
    "qwen3": "AdaptQwen3ForCausalLM",
    "mistral": "AdaptMistralForCausalLM",
}


def hf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    with torch.no_grad():  # HF initialises biases and norms to constants; make every weight count
        for name, param in model.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def pruned(family: str):
    model = to_heterogeneous(hf_model(family)).eval()
    apply_plan(model, keep_plan(model, REMOVED))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_each_type_has_its_own_class_that_matches_hf(family, input_ids):
    model = hf_model(family)
    assert get_adapter(model).family == family
    hetero = assert_hetero_matches_hf(model, input_ids)
    assert type(hetero).__name__ == HETERO_CLASSES[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_removal_equals_masking(family, input_ids):
    model = to_heterogeneous(hf_model(family)).eval()
    assert_removal_equals_masking(model, REMOVED, input_ids)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (2 * 16, 64) and attention.k_proj.weight.shape == (16, 64)
    assert model.config.per_layer_config[1].intermediate_size == 64
    assert model.config.per_layer_config[2].num_key_value_heads == 1


def test_qwen2_biases_are_cut_and_qwen3_norms_are_shared(input_ids):
    qwen2 = pruned("qwen2")
    attention = qwen2.model.layers[2].self_attn
    assert attention.q_proj.bias.shape == (32,) and attention.v_proj.bias.shape == (16,)
    qwen3 = pruned("qwen3")
    assert qwen3.model.layers[0].self_attn.q_norm.weight.shape == (16,)  # one per head_dim, all heads


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_checkpoint_reloads_exactly(family, tmp_path, input_ids):
    assert_reload_is_exact(pruned(family), tmp_path / family, input_ids)


def test_pruned_checkpoints_reload_without_adaptprune(tmp_path, input_ids):
    models = {family: pruned(family) for family in FAMILIES}
    for family, model in models.items():
        save_checkpoint(model, tmp_path / family)
    remote = remote_logits([tmp_path / f for f in models], input_ids, tmp_path)
    for (family, model), got in zip(models.items(), remote, strict=True):
        assert torch.equal(logits(model, input_ids), got), family


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_on_pruned_model(family, input_ids):
    assert_generates(pruned(family), input_ids)
