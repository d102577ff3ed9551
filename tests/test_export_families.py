"""GGUF export of every family in the family table: the architecture chosen, each tensor's name
and shape as llama.cpp's loader (build 11434, ``src/models/<arch>.cpp``) creates it from the
file's own keys, the keys, and the values where the export transforms them; or a one-line refusal."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

from adaptprune.arch import ATTENTION, MLP
from adaptprune.checkpoint import save_checkpoint, to_heterogeneous
from adaptprune.cli import main
from adaptprune.export import ExportError, export_gguf
from adaptprune.pruning.shape.reshape import remove_hidden_channels
from adaptprune.pruning.surgery import apply_plan, ensure_output_biases

from .family_table import FAMILIES, KEEP_HIDDEN, REMOVED, hf_model
from .surgery_helpers import keep_plan
from .test_export_gguf import VOCAB, fields, values

UNIFORM_CUT = {i: {MLP: list(range(0, 96, 3))} for i in range(3)}  # 64 neurons in every layer
HEADS_CUT = {i: {MLP: list(range(0, 96, 3)), ATTENTION: [1]} for i in range(3)}  # and one KV group of two
# family -> (uniform cut, per-layer cut): the architecture written, or the refusal's words
EXPECTED = {
    "llama": ("llama", "deci"),
    "mistral": ("llama", "deci"),
    "qwen2": ("llama", "deci"),
    "qwen3": ("qwen3", "openelm graph, which ties the output head"),  # the table's Qwen3 is untied
    "gemma3_text": ("gemma3", "gemma3 graph builds every layer from layer 0's sizes"),
    "phi3": ("phi3", "deci"),
    "opt": ("no OPT architecture", "no OPT architecture"),
}


def pruned(model_type: str, removed: dict, **overrides):
    model = to_heterogeneous(hf_model(model_type, **{"vocab_size": VOCAB, **overrides})).eval()
    apply_plan(model, keep_plan(model, removed))
    return model


def loader_shapes(arch: str, meta: dict, tied: bool) -> dict[str, tuple[int, ...]]:
    """The tensors llama.cpp's loader asks for (numpy order: rows first), from the file's keys."""
    key = lambda name: meta[f"{arch}.{name}"]  # noqa: E731
    n_layer, emb, hd = key("block_count"), key("embedding_length"), key("attention.key_length")
    per_layer = lambda v: v if isinstance(v, list) else [v] * n_layer  # noqa: E731
    heads, kv, ff = (
        per_layer(key(k)) for k in ("attention.head_count", "attention.head_count_kv", "feed_forward_length")
    )
    out = {"token_embd": (VOCAB, emb), "output_norm": (emb,)}
    if not tied:
        out["output"] = (VOCAB, emb)
    for i in range(n_layer):
        q, k = heads[i] * hd, kv[i] * hd
        blk = {"attn_norm": (emb,), "attn_q": (q, emb), "attn_k": (k, emb), "attn_v": (k, emb)}
        blk |= {"attn_output": (emb, q), "ffn_norm": (emb,), "ffn_gate": (ff[i], emb), "ffn_up": (ff[i], emb)}
        blk["ffn_down"] = (emb, ff[i])
        if arch in ("qwen3", "openelm", "gemma3"):
            blk |= {"attn_q_norm": (hd,), "attn_k_norm": (hd,)}
        if arch == "gemma3":
            blk |= {"post_attention_norm": (emb,), "post_ffw_norm": (emb,)}
        if arch in ("openelm", "phi3"):
            del blk["attn_q"], blk["attn_k"], blk["attn_v"]
            blk["attn_qkv"] = (q + 2 * k, emb)
        if arch == "phi3":  # attn_output is n_embd x n_embd; ffn_up holds gate and up
            del blk["ffn_gate"]
            blk |= {"attn_output": (emb, emb), "ffn_up": (2 * ff[i], emb)}
        out |= {f"blk.{i}.{name}": shape for name, shape in blk.items()}
    return {f"{name}.weight": shape for name, shape in out.items()}


def check_file(path, model, arch: str) -> tuple[dict, dict]:
    meta, tensors = fields(path)
    assert meta["general.architecture"] == arch
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    expected = loader_shapes(arch, meta, tied and "output.weight" not in tensors)
    weights = {n: tuple(int(d) for d in reversed(t.shape)) for n, t in tensors.items() if n.endswith(".weight")}
    assert weights == expected
    allowed = {TENSOR_NAMES[t].split(".")[-1] for t in MODEL_TENSORS[MODEL_ARCH[arch.upper()]]}
    assert {n.split(".")[-2] for n in tensors} <= allowed  # gguf-py's table for the architecture
    assert MODEL_ARCH_NAMES[MODEL_ARCH[arch.upper()]] == arch
    layers = model.model.layers
    heads = [layer.self_attn.o_proj.in_features // 16 for layer in layers]
    ff = [layer.mlp.down_proj.in_features for layer in layers]
    scalar = lambda v: v if arch in ("deci", "openelm") else v[0]  # noqa: E731
    assert meta[f"{arch}.attention.head_count"] == scalar(heads)
    assert meta[f"{arch}.feed_forward_length"] == scalar(ff)
    return meta, tensors


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("cut", ["uniform", "per-layer"])
def test_every_family_exports_or_is_refused_in_one_line(tmp_path, bpe_tokenizer, family, cut):
    expected = EXPECTED[family][cut == "per-layer"]
    removed = UNIFORM_CUT if cut == "uniform" else FAMILIES[family].removed
    if family == "opt":
        model = to_heterogeneous(hf_model(family, vocab_size=VOCAB)).eval()
    else:
        model = pruned(family, removed)
    if " " in expected:
        with pytest.raises(ExportError, match=expected) as err:
            export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf")
        assert "\n" not in str(err.value) and not list(tmp_path.iterdir())
        return
    report = export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf")
    assert report.arch == expected and report.per_layer == (expected in ("deci", "openelm"))
    check_file(report.path, model, expected)


def test_qwen3_per_layer_is_openelm_with_fused_qkv_and_shared_qk_norms(tmp_path, bpe_tokenizer):
    model = pruned("qwen3", REMOVED, tie_word_embeddings=True)
    report = export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf")
    meta, tensors = check_file(report.path, model, "openelm")
    assert meta["openelm.attention.head_count"] == [2, 4, 2] and meta["openelm.attention.head_count_kv"] == [1, 2, 1]
    assert meta["openelm.feed_forward_length"] == [92, 64, 95] and meta["openelm.attention.key_length"] == 16
    attn = model.model.layers[2].self_attn
    qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
    assert np.array_equal(values(tensors["blk.2.attn_qkv.weight"]), qkv.numpy())  # halves rotate as in HF
    assert np.array_equal(values(tensors["blk.2.attn_k_norm.weight"]), attn.k_norm.weight.detach().numpy())


def test_qwen3_uniform_keeps_hf_rows_and_refuses_compensation_biases(tmp_path, bpe_tokenizer):
    model = pruned("qwen3", HEADS_CUT)
    report = export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf")
    meta, tensors = check_file(report.path, model, "qwen3")
    assert meta["qwen3.attention.head_count"] == 2 and meta["qwen3.attention.head_count_kv"] == 1
    q = model.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    assert np.array_equal(values(tensors["blk.1.attn_q.weight"]), q)  # no pair permutation: NEOX RoPE
    ensure_output_biases(model)  # zero biases change nothing and are dropped
    assert "blk.0.ffn_down.bias" not in fields(export_gguf(model, bpe_tokenizer, tmp_path / "z.gguf").path)[1]
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.bias.fill_(0.25)
    with pytest.raises(ExportError, match=r"layer 1: mlp.down_proj has a bias .*compensation=least_squares_no_bias"):
        export_gguf(model, bpe_tokenizer, tmp_path / "b.gguf")


def test_gemma3_norms_windows_and_scales(tmp_path, bpe_tokenizer):
    """Norms become 1 + w; the query scale and a pruned hidden size's embedding scale are folded in."""
    model = pruned("gemma3_text", UNIFORM_CUT, query_pre_attn_scalar=64, final_logit_softcapping=30.0)
    remove_hidden_channels(model, KEEP_HIDDEN)  # 51 channels: HF keeps the dense sqrt(64) = 8
    report = export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf")
    meta, tensors = check_file(report.path, model, "gemma3")
    assert meta["gemma3.attention.sliding_window"] == 8
    assert meta["gemma3.attention.sliding_window_pattern"] == [True, False, True]
    assert meta["gemma3.rope.freq_base"] == 1_000_000.0 and meta["gemma3.rope.freq_base_swa"] == 10_000.0
    assert meta["gemma3.final_logit_softcapping"] == 30.0 and meta["gemma3.embedding_length"] == 51
    layer = model.model.layers[1]
    for name, norm in (
        ("post_attention_norm", layer.post_attention_layernorm),
        ("ffn_norm", layer.pre_feedforward_layernorm),
    ):
        assert np.array_equal(values(tensors[f"blk.1.{name}.weight"]), (norm.weight + 1).detach().numpy())
    q_norm = (layer.self_attn.q_norm.weight + 1).detach() * math.sqrt(16 / 64)  # 1/sqrt(64) over 1/sqrt(16)
    assert np.allclose(values(tensors["blk.1.attn_q_norm.weight"]), q_norm.numpy(), rtol=1e-7, atol=0)
    embed = model.model.embed_tokens.weight.detach()
    assert np.array_equal(values(tensors["output.weight"]), embed.numpy())  # the tied head, unscaled
    scaled = embed * (torch.tensor(8.0) / torch.tensor(51.0).sqrt())
    assert np.array_equal(values(tensors["token_embd.weight"]), scaled.numpy())


def test_phi3_fused_when_phi3_holds_it_else_split_into_llama(tmp_path, bpe_tokenizer):
    model = pruned("phi3", UNIFORM_CUT)
    _, tensors = check_file(export_gguf(model, bpe_tokenizer, tmp_path / "a.gguf").path, model, "phi3")
    layer = model.model.layers[0]
    assert np.array_equal(values(tensors["blk.0.ffn_up.weight"]), layer.mlp.gate_up_proj.weight.detach().numpy())
    assert np.array_equal(values(tensors["blk.0.attn_qkv.weight"]), layer.self_attn.qkv_proj.weight.detach().numpy())
    model = pruned("phi3", HEADS_CUT)  # queries narrower than the hidden size: phi3 cannot hold it
    report = export_gguf(model, bpe_tokenizer, tmp_path / "b.gguf")
    _, tensors = check_file(report.path, model, "llama")
    gate = model.model.layers[2].mlp.gate_up_proj.weight.detach()[:64]
    assert np.array_equal(values(tensors["blk.2.ffn_gate.weight"]), gate.numpy())
    model = pruned("phi3", UNIFORM_CUT)  # phi3's shape, but a compensation bias phi3 has no tensor for
    ensure_output_biases(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.bias.fill_(0.5)
    report = export_gguf(model, bpe_tokenizer, tmp_path / "c.gguf")
    assert report.arch == "llama" and "blk.0.attn_output.bias" in fields(report.path)[1]


def test_cli_refuses_opt_in_one_line(tmp_path, bpe_tokenizer, capsys):
    save_checkpoint(to_heterogeneous(hf_model("opt", vocab_size=VOCAB)), tmp_path / "opt", bpe_tokenizer)
    capsys.readouterr()  # the save's progress bar
    assert main(["export", str(tmp_path / "opt"), "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adaptprune: error: llama.cpp has no OPT architecture") and "\n" not in err


def test_a_qwen3_pruned_with_least_squares_without_bias_exports_as_qwen3(tmp_path, bpe_tokenizer):
    """The compensation these architectures can hold: least squares on raw moments writes no o/down bias."""
    from adaptprune.config import PruneConfig
    from adaptprune.pruning.step import prune_step
    from adaptprune.pruning.surgery import count_parameters

    model = to_heterogeneous(hf_model("qwen3", vocab_size=VOCAB)).eval()
    text = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig(compensation="least_squares_no_bias", allocation="uniform", neuron_multiple=8, min_groups=2)
    prune_step(model, text, count_parameters(model) - 3 * 8 * 3 * 64, cfg, progress=False)
    assert model.model.layers[0].mlp.down_proj.bias is None and model.model.layers[0].mlp.down_proj.in_features == 88
    meta, _ = check_file(export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf").path, model, "qwen3")
    assert meta["qwen3.feed_forward_length"] == 88
