"""What only one family has, beyond the conformance suite: Phi-3's fused matrices and live
attention config, OPT's per-unit biases and its project_in/project_out stream, and the embedded
Gemma-3-270M asset."""

from __future__ import annotations

import copy

import pytest
import torch

from adaptprune.arch import ATTENTION, MLP, get_adapter
from adaptprune.checkpoint import save_checkpoint, to_heterogeneous
from adaptprune.pruning.shape.reshape import remove_hidden_channels, remove_layers
from adaptprune.pruning.surgery import apply_plan, count_non_embedding_parameters, count_parameters

from .family_table import KEEP_HIDDEN, REMOVED, expected_params, hf_model
from .surgery_helpers import assert_reload_is_exact, assert_removal_equals_masking, keep_plan, logits, remote_logits


# ---- Phi-3: fused qkv_proj / gate_up_proj ------------------------------------------------------------
def test_phi3_mha_removal_equals_masking(input_ids):
    model = to_heterogeneous(hf_model("phi3", num_key_value_heads=4)).eval()
    assert_removal_equals_masking(model, REMOVED, input_ids)
    attention = model.model.layers[2].self_attn
    assert attention.num_key_value_heads == 3 and attention.config.num_attention_heads == 3
    assert attention.qkv_proj.weight.shape == (3 * 3 * 16, 64)
    assert model.model.layers[1].mlp.gate_up_proj.weight.shape == (2 * 64, 64)


def test_phi3_fused_rows_of_each_part_are_cut():
    model = to_heterogeneous(hf_model("phi3")).eval()
    qkv = model.model.layers[0].self_attn.qkv_proj.weight.detach().clone()  # (q 64 | k 32 | v 32, 64)
    gate_up = model.model.layers[0].mlp.gate_up_proj.weight.detach().clone()  # (gate 96 | up 96, 64)
    apply_plan(model, {0: {ATTENTION: [1], MLP: [0, 2, 95]}})
    kept_q, kept_k, kept_v = qkv[32:64], qkv[64 + 16 : 96], qkv[96 + 16 : 128]  # group 1: q heads 2-3, kv head 1
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.weight, torch.cat([kept_q, kept_k, kept_v]))
    rows = torch.tensor([0, 2, 95])
    assert torch.equal(model.model.layers[0].mlp.gate_up_proj.weight, torch.cat([gate_up[rows], gate_up[96 + rows]]))


def test_phi3_attention_config_stays_live_through_copies_switches_and_layer_removal(input_ids):
    model = to_heterogeneous(hf_model("phi3")).eval()
    apply_plan(model, keep_plan(model, REMOVED))
    expected = logits(model, input_ids)
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    attention = twin.model.layers[0].self_attn
    assert attention.config._attn_implementation == "eager"
    assert attention.config.num_attention_heads == 2  # layer 0 kept one of two groups
    assert (logits(twin, input_ids) - expected).abs().max().item() <= 1e-5
    remove_layers(twin, [1, 2])  # old layer 2 (one group) is now layer 1 and reads its own sizes
    assert twin.model.layers[1].self_attn.config.num_attention_heads == 2
    assert twin.model.layers[0].self_attn.config.num_attention_heads == 4


# ---- OPT: biases everywhere, optional project_in / project_out ----------------------------------------
def test_opt_parameter_count_per_unit_includes_biases():
    model = to_heterogeneous(hf_model("opt")).eval()
    adapter = get_adapter(model)
    assert adapter.params_per_unit(model, 0, MLP) == 64 + 1 + 64  # fc1 row + bias, fc2 column
    assert adapter.params_per_unit(model, 0, ATTENTION) == 3 * 16 * (64 + 1) + 16 * 64
    before = count_parameters(model)
    apply_plan(model, {0: {ATTENTION: [0, 1, 2]}})
    assert count_parameters(model) == before - 3 * 16 * 65 - 16 * 64


def test_opt_with_projections_prunes_the_stream_not_the_embedding(tmp_path, input_ids):
    """word_embed_proj_dim 32 != hidden 64: project_in rows and project_out columns are the stream's."""
    model = to_heterogeneous(hf_model("opt", word_embed_proj_dim=32)).eval()
    record = remove_hidden_channels(model, KEEP_HIDDEN)
    decoder = model.model.decoder
    assert decoder.embed_tokens.weight.shape == (128, 32) and model.lm_head.weight is decoder.embed_tokens.weight
    assert decoder.project_in.weight.shape == (51, 32) and decoder.project_out.weight.shape == (32, 51)
    assert decoder.embed_positions.weight.shape == (130, 51)
    assert ("model.decoder.project_in.weight", 0) in record.cuts
    assert count_parameters(model) == expected_params("opt", model.config)
    assert_reload_is_exact(model, tmp_path / "ckpt", input_ids)
    with pytest.raises(ValueError, match="word_embed_proj_dim"):
        remove_hidden_channels(model, list(range(32)))  # a reload would lose the projections
    assert model.config.hidden_size == 51 and decoder.project_in.weight.shape == (51, 32)  # nothing changed


def test_opt_reshaped_checkpoint_with_projections_reloads_without_adaptprune(tmp_path, input_ids):
    model = to_heterogeneous(hf_model("opt", word_embed_proj_dim=32)).eval()
    remove_hidden_channels(model, list(range(48)))  # 48 = 3 heads' width: HF's rule would give head_dim 12
    save_checkpoint(model, tmp_path / "ckpt")
    (remote,) = remote_logits([tmp_path / "ckpt"], input_ids, tmp_path)
    assert torch.equal(logits(model, input_ids), remote)


# ---- Gemma 3: the embedded Gemma-3-270M ---------------------------------------------------------------
def test_embedded_gemma3_270m_loads_and_inspects():
    from adaptprune.checkpoint import load_model, load_tokenizer

    model = load_model("gemma3-270m")
    adapter = get_adapter(model)
    assert type(model).__name__ == "AdaptGemma3ForCausalLM" and adapter.family == "gemma3"
    assert len(adapter.decoder_layers(model)) == 18
    assert {(s.groups, s.neurons) for s in map(lambda i: adapter.layer_shape(model, i), range(18))} == {(1, 2048)}
    assert adapter.heads_per_group(model.config) == 4 and adapter.head_dim(model.config) == 256
    assert count_parameters(model) == 268_098_176
    assert count_non_embedding_parameters(model) == count_parameters(model) - 262_144 * 640
    tokenizer = load_tokenizer("gemma3-270m")
    ids = tokenizer("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and loss.item() < 8.0
