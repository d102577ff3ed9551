"""Perplexity counts every token once and equals exp of the mean loss."""

from __future__ import annotations

import math

import torch

from adaptprune.evaluation.perplexity import _windows, perplexity

from .conftest import tiny_llama


def test_windows_score_each_token_at_most_once():
    # Overlapping windows score every token after the first; non-overlapping ones skip each
    # window's first token (it has no context inside its window).
    cases = {
        (100, 16, 5): list(range(1, 100)),
        (17, 16, 8): list(range(1, 17)),
        (5, 16, 16): [1, 2, 3, 4],
        (48, 16, 16): [t for t in range(48) if t % 16 != 0],
    }
    for (n, context, stride), expected in cases.items():
        scored = []
        for begin, end, first in _windows(n, context, stride):
            assert end - begin <= context
            scored.extend(range(first, end))
        assert scored == expected


def test_non_overlapping_perplexity_matches_model_loss():
    model = tiny_llama()
    torch.manual_seed(0)
    stream = torch.randint(0, 128, (64,))
    result = perplexity(model, stream, context=32)
    with torch.no_grad():
        losses = [model(input_ids=chunk[None], labels=chunk[None]).loss.item() for chunk in stream.view(2, 32)]
    assert result.tokens == 62
    assert abs(result.ppl - math.exp(sum(losses) / 2)) < 1e-4 * result.ppl
