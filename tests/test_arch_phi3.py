"""Phi-3: fused ``qkv_proj`` and ``gate_up_proj`` are cut in each fused part, and HF's split
points (read from the config and a fixed int) follow the pruned sizes."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM

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

REMOVED = {
    0: {MLP: [1, 5, 50, 95], ATTENTION: [0]},
    1: {MLP: list(range(0, 96, 3))},
    2: {ATTENTION: [1], MLP: [7]},
}


def hf_phi3(heads: int = 4, kv_heads: int = 2, seed: int = 0) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    config = Phi3Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        original_max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return Phi3ForCausalLM(config).eval()


def pruned_phi3() -> Phi3ForCausalLM:
    model = to_heterogeneous(hf_phi3()).eval()
    apply_plan(model, keep_plan(model, REMOVED))
    return model


def test_hetero_class_matches_hf(input_ids):
    model = hf_phi3()
    assert get_adapter(model).family == "phi3"
    assert type(assert_hetero_matches_hf(model, input_ids)).__name__ == "AdaptPhi3ForCausalLM"


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_removal_equals_masking(heads, kv_heads, input_ids):
    model = to_heterogeneous(hf_phi3(heads, kv_heads)).eval()
    assert_removal_equals_masking(model, REMOVED, input_ids)
    attention = model.model.layers[2].self_attn
    n_rep = heads // kv_heads
    assert attention.num_key_value_heads == kv_heads - 1
    assert attention.qkv_proj.weight.shape == ((kv_heads - 1) * (n_rep + 2) * 16, 64)
    assert attention.config.num_attention_heads == (kv_heads - 1) * n_rep
    assert model.model.layers[1].mlp.gate_up_proj.weight.shape == (2 * 64, 64)


def test_fused_rows_of_each_part_are_cut():
    model = to_heterogeneous(hf_phi3()).eval()
    qkv = model.model.layers[0].self_attn.qkv_proj.weight.detach().clone()  # (q 64 | k 32 | v 32, 64)
    gate_up = model.model.layers[0].mlp.gate_up_proj.weight.detach().clone()  # (gate 96 | up 96, 64)
    apply_plan(model, {0: {ATTENTION: [1], MLP: [0, 2, 95]}})
    kept_q, kept_k, kept_v = qkv[32:64], qkv[64 + 16 : 96], qkv[96 + 16 : 128]  # group 1: q heads 2-3, kv head 1
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.weight, torch.cat([kept_q, kept_k, kept_v]))
    rows = torch.tensor([0, 2, 95])
    assert torch.equal(model.model.layers[0].mlp.gate_up_proj.weight, torch.cat([gate_up[rows], gate_up[96 + rows]]))


def test_pruned_checkpoint_reloads_exactly(tmp_path, input_ids):
    assert_reload_is_exact(pruned_phi3(), tmp_path / "ckpt", input_ids)


def test_pruned_checkpoint_reloads_without_adaptprune(tmp_path, input_ids):
    model = pruned_phi3()
    save_checkpoint(model, tmp_path / "ckpt")
    (remote,) = remote_logits([tmp_path / "ckpt"], input_ids, tmp_path)
    assert torch.equal(logits(model, input_ids), remote)


def test_generate_on_pruned_model(input_ids):
    assert_generates(pruned_phi3(), input_ids)


def test_attention_config_stays_live_through_copies_and_switches(input_ids):
    model = pruned_phi3()
    expected = logits(model, input_ids)
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    attention = twin.model.layers[0].self_attn
    assert attention.config._attn_implementation == "eager"
    assert attention.config.num_attention_heads == 2  # layer 0 kept one of two groups
    assert (logits(twin, input_ids) - expected).abs().max().item() <= 1e-5
