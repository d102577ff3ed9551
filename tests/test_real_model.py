"""The embedded SmolLM2-135M: loads offline, sensible perplexity, prunes and reloads exactly."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from adaptprune.arch import MLP, get_adapter
from adaptprune.checkpoint import save_checkpoint
from adaptprune.data import load_corpus, token_stream
from adaptprune.evaluation.perplexity import perplexity
from adaptprune.pruning.surgery import apply_plan

README_HELDOUT_PPL = 19.33  # README: 2,046 held-out Shakespeare tokens, context 1024


@pytest.fixture(scope="module")
def heldout_tokens(smollm2_tokenizer):
    return token_stream(load_corpus()["heldout"], smollm2_tokenizer, 2048)


def test_heldout_perplexity_matches_readme(smollm2, heldout_tokens):
    result = perplexity(smollm2, heldout_tokens, context=1024)
    assert math.isfinite(result.ppl)
    assert result.tokens == 2046
    assert abs(result.ppl - README_HELDOUT_PPL) <= 0.2 * README_HELDOUT_PPL


def test_prune_ten_percent_of_neurons_save_reload_identical(smollm2_fresh, heldout_tokens, tmp_path):
    model = smollm2_fresh
    adapter = get_adapter(model)
    layers = len(adapter.decoder_layers(model))
    plan = {i: {MLP: list(range(0, 1536 - 154))} for i in range(layers)}
    apply_plan(model, plan)
    assert adapter.layer_shape(model, 0).neurons == 1382
    save_checkpoint(model, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    ids = heldout_tokens[:64][None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_inspect_cli_reports_smollm2_geometry():
    out = subprocess.run(
        [sys.executable, "-m", "adaptprune.cli", "inspect", "smollm2-135m", "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    info = json.loads(out)
    assert info["num_layers"] == 30
    assert {(r["query_heads"], r["kv_heads"], r["mlp_neurons"]) for r in info["layers"]} == {(9, 3, 1536)}
    assert info["total_params"] == 134_515_008
