"""OPT: biased multi-head attention and ReLU fc1/fc2 prune exactly, with biases cut, and the
fixed ``num_heads`` HF's forward reads follows the weights through surgery and reload."""

from __future__ import annotations

import torch
from transformers import OPTConfig, OPTForCausalLM

from adaptprune.arch import ATTENTION, MLP, get_adapter
from adaptprune.checkpoint import save_checkpoint, to_heterogeneous
from adaptprune.surgery import apply_plan, count_parameters

from .surgery_helpers import (
    assert_generates,
    assert_hetero_matches_hf,
    assert_reload_is_exact,
    assert_removal_equals_masking,
    keep_plan,
    logits,
    remote_logits,
)

REMOVED = {
    0: {MLP: [1, 5, 50, 95], ATTENTION: [0]},
    1: {MLP: list(range(0, 96, 3))},
    2: {ATTENTION: [1, 3], MLP: [7]},
}


def hf_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=128,
        hidden_size=64,
        ffn_dim=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=64,
        dropout=0.0,
        pad_token_id=1,
    )
    model = OPTForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises biases to zero; make them count
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.1)
    return model


def pruned_opt() -> OPTForCausalLM:
    model = to_heterogeneous(hf_opt()).eval()
    apply_plan(model, keep_plan(model, REMOVED))
    return model


def test_hetero_class_matches_hf(input_ids):
    model = hf_opt()
    assert get_adapter(model).family == "opt"
    assert type(assert_hetero_matches_hf(model, input_ids)).__name__ == "AdaptOPTForCausalLM"


def test_removal_equals_masking_and_cuts_biases(input_ids):
    model = to_heterogeneous(hf_opt()).eval()
    assert_removal_equals_masking(model, REMOVED, input_ids)
    layer = model.model.decoder.layers[2]
    assert layer.self_attn.num_heads == 2
    assert layer.self_attn.q_proj.bias.shape == (32,) and layer.self_attn.out_proj.bias.shape == (64,)
    assert layer.fc1.bias.shape == (95,) and layer.fc2.weight.shape == (64, 95)
    assert model.config.per_layer_config[2].num_attention_heads == 2
    assert model.config.per_layer_config[1].ffn_dim == 64


def test_parameter_count_per_unit_includes_biases():
    model = to_heterogeneous(hf_opt()).eval()
    adapter = get_adapter(model)
    assert adapter.params_per_unit(model, 0, MLP) == 64 + 1 + 64  # fc1 row + bias, fc2 column
    assert adapter.params_per_unit(model, 0, ATTENTION) == 3 * 16 * (64 + 1) + 16 * 64
    before = count_parameters(model)
    apply_plan(model, {0: {ATTENTION: [0, 1, 2]}})
    assert count_parameters(model) == before - 3 * 16 * 65 - 16 * 64


def test_pruned_checkpoint_reloads_exactly(tmp_path, input_ids):
    model = pruned_opt()
    assert_reload_is_exact(model, tmp_path / "ckpt", input_ids)


def test_pruned_checkpoint_reloads_without_adaptprune(tmp_path, input_ids):
    model = pruned_opt()
    save_checkpoint(model, tmp_path / "ckpt")
    (remote,) = remote_logits([tmp_path / "ckpt"], input_ids, tmp_path)
    assert torch.equal(logits(model, input_ids), remote)


def test_generate_on_pruned_model(input_ids):
    assert_generates(pruned_opt(), input_ids)
