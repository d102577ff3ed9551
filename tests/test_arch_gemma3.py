"""Gemma 3 (text-only): GQA with shared per-head q/k norms and sliding-window layers prunes and
reloads exactly; the embedded Gemma-3-270M loads and inspects through the asset mechanism."""

from __future__ import annotations

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from adaptprune.arch import ATTENTION, MLP, get_adapter
from adaptprune.checkpoint import save_checkpoint, to_heterogeneous
from adaptprune.surgery import apply_plan, count_non_embedding_parameters, count_parameters

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


def hf_gemma3(seed: int = 0) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=128,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises the norms to zero offsets; make them count
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(std=0.1)
    return model


def pruned_gemma3() -> Gemma3ForCausalLM:
    model = to_heterogeneous(hf_gemma3()).eval()
    apply_plan(model, keep_plan(model, REMOVED))
    return model


def test_hetero_class_matches_hf(input_ids):
    model = hf_gemma3()
    assert get_adapter(model).family == "gemma3"
    assert type(assert_hetero_matches_hf(model, input_ids)).__name__ == "AdaptGemma3ForCausalLM"


def test_removal_equals_masking_keeps_norms_and_window(input_ids):
    model = to_heterogeneous(hf_gemma3()).eval()
    assert_removal_equals_masking(model, REMOVED, input_ids)
    attention = model.model.layers[2].self_attn
    assert attention.q_proj.weight.shape == (32, 64) and attention.q_norm.weight.shape == (16,)
    assert attention.sliding_window == 8
    assert model.config.per_layer_config[1].intermediate_size == 64


def test_pruned_checkpoint_reloads_exactly(tmp_path, input_ids):
    assert_reload_is_exact(pruned_gemma3(), tmp_path / "ckpt", input_ids)


def test_pruned_checkpoint_reloads_without_adaptprune(tmp_path, input_ids):
    model = pruned_gemma3()
    save_checkpoint(model, tmp_path / "ckpt")
    (remote,) = remote_logits([tmp_path / "ckpt"], input_ids, tmp_path)
    assert torch.equal(logits(model, input_ids), remote)


def test_generate_on_pruned_model(input_ids):
    assert_generates(pruned_gemma3(), input_ids)


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
