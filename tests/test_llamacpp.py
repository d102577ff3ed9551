"""Opt-in: exported GGUF files run in a real llama.cpp (``python -m pytest -m llamacpp``).

Needs the cached build of ``python scripts/check_llamacpp.py --build-only``. A tiny random model,
once dense (``llama`` architecture) and once pruned unevenly with mean-compensation biases and
one layer without attention (``deci``), must give llama.cpp's perplexity within 1% of ours on
the same tokens, and llama-completion must generate text from it. Then every exportable family
of the family table, pruned uniformly and per layer, in each architecture it is written as
(``qwen3``, ``openelm``, ``gemma3`` with its sliding windows, folded scales and soft-capping,
``phi3``, ``llama``/``deci``); and the refusals: per-layer sizes forced into ``qwen3``, ``gemma3``
and ``phi3`` do not load.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import torch

from adaptprune.arch import ATTENTION, MLP
from adaptprune.checkpoint import load_model, load_tokenizer
from adaptprune.export import export_gguf, llamacpp
from adaptprune.export.gguf_layout import LAYOUTS
from adaptprune.pruning.shape.reshape import remove_hidden_channels
from adaptprune.pruning.surgery import apply_plan, ensure_output_biases

from .family_table import KEEP_HIDDEN, REMOVED
from .test_export_families import HEADS_CUT, UNIFORM_CUT, pruned
from .test_export_gguf import fields

pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.skipif(
        any(llamacpp.binary(t) is None for t in llamacpp.TARGETS),
        reason="llama.cpp is not built; run: python scripts/check_llamacpp.py --build-only",
    ),
]
CTX, CHUNKS = 256, 4  # at 128 llama-perplexity 11434 exits before its log prints the last chunk and the estimate


def tiny_pruned():
    """tiny-random-llama (4 layers, 2 KV groups of 2 heads, 256 neurons) with uneven sizes."""
    model = load_model("tiny-random-llama")
    ensure_output_biases(model)
    plan = {1: {MLP: list(range(0, 256, 3))}, 2: {ATTENTION: [1], MLP: list(range(101))}, 3: {MLP: list(range(7))}}
    apply_plan(model, plan)
    apply_plan(model, {1: {ATTENTION: []}}, allow_empty_attention=True)  # layer 1: no attention, zero o bias
    torch.manual_seed(0)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.bias.normal_(std=0.5)
            if i != 1:
                layer.self_attn.o_proj.bias.normal_(std=0.5)
    return model


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from adaptprune.data import load_corpus

    text = next(iter(load_corpus("shakespeare")["heldout"]["text"]))[:20000]
    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("pruned", [False, True], ids=["dense-llama", "pruned-deci"])
def test_llamacpp_perplexity_matches_ours_and_generates(tmp_path, text_file, pruned):
    model = tiny_pruned() if pruned else load_model("tiny-random-llama")
    tokenizer = load_tokenizer("tiny-random-llama")
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert report.arch == ("deci" if pruned else "llama")
    ids = llamacpp.llamacpp_tokens(report.path, text_file)
    assert ids == tokenizer(text_file.read_text(encoding="utf-8"))["input_ids"]  # same tokens as ours
    ours = llamacpp.perplexity_like_llamacpp(model, ids, CTX, CHUNKS)
    theirs = llamacpp.llamacpp_perplexity(report.path, text_file, CTX, CHUNKS)
    assert abs(theirs / ours - 1) < 0.01, (theirs, ours)
    text = llamacpp.complete(report.path, "To be, or not", n_tokens=16)
    assert text.startswith("To be, or not") and len(text) > len("To be, or not")


FAMILY_CASES = {  # id -> (model type, removal, config overrides, architecture written)
    "mistral-deci": ("mistral", REMOVED, dict(sliding_window=None), "deci"),
    "qwen2-deci": ("qwen2", REMOVED, {}, "deci"),
    "qwen3-qwen3": ("qwen3", HEADS_CUT, {}, "qwen3"),
    "qwen3-openelm": ("qwen3", REMOVED, dict(tie_word_embeddings=True), "openelm"),
    "gemma3-gemma3": ("gemma3_text", UNIFORM_CUT, {}, "gemma3"),
    "gemma3-folded": (
        "gemma3_text",
        UNIFORM_CUT,
        dict(query_pre_attn_scalar=64, final_logit_softcapping=3.0),
        "gemma3",
    ),
    "phi3-phi3": ("phi3", UNIFORM_CUT, {}, "phi3"),
    "phi3-llama": ("phi3", HEADS_CUT, {}, "llama"),
    "phi3-deci": ("phi3", REMOVED, {}, "deci"),
}


def family_model(case: str):
    model_type, removed, overrides, _ = FAMILY_CASES[case]
    model = pruned(model_type, removed, vocab_size=512, max_position_embeddings=512, **overrides)
    if case == "gemma3-folded":  # 51 channels: the dense sqrt(64) embedding scale is folded into token_embd
        remove_hidden_channels(model, KEEP_HIDDEN)
    return model


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_every_family_runs_in_llamacpp_with_our_perplexity(tmp_path, text_file, case):
    model, tokenizer = family_model(case), load_tokenizer("tiny-random-llama")
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert report.arch == FAMILY_CASES[case][3]
    ids = llamacpp.llamacpp_tokens(report.path, text_file)
    ours = llamacpp.perplexity_like_llamacpp(model, ids, CTX, CHUNKS)
    theirs = llamacpp.llamacpp_perplexity(report.path, text_file, CTX, CHUNKS)
    assert abs(theirs / ours - 1) < 0.01, (theirs, ours)
    text = llamacpp.complete(report.path, "To be, or not", n_tokens=8)
    assert text.startswith("To be, or not") and len(text) > len("To be, or not")


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "phi3"])
def test_per_layer_sizes_forced_into_a_uniform_architecture_do_not_load(tmp_path, text_file, family, monkeypatch):
    """What the refusals guard against: arrays written, llama.cpp still sizes every layer as layer 0."""
    layout = LAYOUTS[family]
    arch = {"gemma3": "gemma3", "qwen3": "qwen3", "phi3": "phi3"}[family]
    monkeypatch.setattr(layout, "architecture", lambda model, sizes: arch)
    monkeypatch.setattr(layout, "per_layer_archs", (arch,))
    removed = {0: {MLP: [1, 5]}, 1: {MLP: list(range(0, 96, 3))}}  # neurons only: phi3 keeps full-width queries
    model = pruned({"gemma3": "gemma3_text"}.get(family, family), removed, vocab_size=512, max_position_embeddings=512)
    report = export_gguf(model, load_tokenizer("tiny-random-llama"), tmp_path / "m.gguf")
    assert isinstance(fields(report.path)[0][f"{arch}.feed_forward_length"], list)  # per-layer arrays
    errors = []
    for _ in range(10):  # llama.cpp's logger may lose the last lines at exit: retry until the reason shows
        args = ["-m", str(report.path), "-f", str(text_file), "-c", str(CTX), "--chunks", "1", "-t", "2"]
        proc = subprocess.run([str(llamacpp.binary("llama-perplexity")), *args], capture_output=True, text=True)
        assert proc.returncode != 0 and "Final estimate" not in proc.stderr  # it never runs
        errors += re.findall(r"tensor 'blk\.\d+\.\w+\.weight' has wrong shape", proc.stderr)
        if errors:
            break
    assert errors, "llama.cpp failed without printing why in 10 tries"
