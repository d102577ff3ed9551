"""Opt-in: exported GGUF files run in a real llama.cpp (``python -m pytest -m llamacpp``).

Needs the cached build of ``python scripts/check_llamacpp.py --build-only``. A tiny random model,
once dense (``llama`` architecture) and once pruned unevenly with mean-compensation biases and
one layer without attention (``deci``), must give llama.cpp's perplexity within 1% of ours on
the same tokens, and llama-completion must generate text from it.
"""

from __future__ import annotations

import pytest
import torch

from adaptprune.arch import ATTENTION, MLP
from adaptprune.checkpoint import load_model, load_tokenizer
from adaptprune.export import export_gguf, llamacpp
from adaptprune.pruning.surgery import apply_plan, ensure_output_biases

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
