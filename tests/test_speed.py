"""Generation speed: the right keys, positive numbers, fixed lengths; FLOP/parameter ratios."""

from __future__ import annotations

import pytest
import torch

from adaptprune.arch import MLP
from adaptprune.evaluation.speed import SpeedProbe, compare_speed, forward_flops_per_token, measure_speed, size_ratios
from adaptprune.pruning.surgery import apply_plan

from .conftest import tiny_llama

KEYS = {
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "generate_tokens_per_s",
    "prefill_s",
    "generate_s",
    "decode_ms_per_token",
    "prompt_tokens",
    "new_tokens",
    "batch_size",
    "runs",
    "device",
    "threads",
}


def test_measure_speed_keys_and_positive_numbers():
    model = tiny_llama()
    model.train()
    speed = measure_speed(model, 128, prompt_tokens=16, new_tokens=6, runs=2, warmup=1)
    assert set(speed) == KEYS
    assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0
    assert speed["prompt_tokens"] == 16 and speed["new_tokens"] == 6 and speed["runs"] == 2
    assert speed["device"] == "cpu"
    assert model.training  # mode restored


def test_eos_cannot_shorten_the_timed_generation():
    """min_new_tokens == max_new_tokens: even when EOS is the greedy first token, all tokens come."""
    model = tiny_llama()
    probe = SpeedProbe.build(model, 128, prompt_tokens=8, new_tokens=5)
    with torch.no_grad():
        first = model(input_ids=probe.input_ids).logits[:, -1].argmax(-1)  # (1,)

    class Tok:  # what measure_speed reads from a tokenizer
        eos_token_id = int(first[0])
        pad_token_id = None

        def __len__(self) -> int:
            return 128

    probe = SpeedProbe.build(model, Tok(), prompt_tokens=8, new_tokens=5)
    assert probe.generation_config.eos_token_id == int(first[0])
    assert probe.generate() > 0  # raises if fewer than 5 tokens came (without the fix: 1)
    speed = measure_speed(model, Tok(), prompt_tokens=8, new_tokens=5, runs=1, warmup=0, batch_size=2)
    assert speed["batch_size"] == 2 and speed["decode_tokens_per_s"] > 0


def test_measure_speed_rejects_too_short_generation():
    with pytest.raises(ValueError, match="new_tokens >= 2"):
        measure_speed(tiny_llama(), 128, new_tokens=1)


def test_flops_and_compare_speed_on_pruned_copy():
    dense, pruned = tiny_llama(), tiny_llama()
    apply_plan(pruned, {i: {MLP: list(range(48))} for i in range(3)})  # half of each MLP (96 -> 48)
    assert forward_flops_per_token(pruned) < forward_flops_per_token(dense)
    # attention width does not change, so the context term narrows the gap
    assert forward_flops_per_token(dense, context=64) - forward_flops_per_token(dense) == 4 * 64 * 3 * 64
    ratios = size_ratios(dense, pruned)
    assert 0 < ratios["non_embedding_param_ratio"] < ratios["param_ratio"] < 1
    result = compare_speed(dense, pruned, 128, prompt_tokens=8, new_tokens=4, runs=1, warmup=0)
    assert result["dense"]["new_tokens"] == result["pruned"]["new_tokens"] == 4
    assert result["prefill_speedup"] > 0 and result["decode_speedup"] > 0
    assert result["ideal_speedup"] == pytest.approx(1 / result["flop_ratio"])
