"""Held-out perplexity at a stated context length and stride.

Windows of ``context`` tokens start every ``stride`` tokens; each window scores only the tokens
that the previous window did not (so every token is counted once, with at least
``context - stride`` tokens of left context after the first window). ``stride == context``
gives plain non-overlapping windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    tokens: int  # tokens scored
    context: int
    stride: int

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "tokens": self.tokens, "context": self.context, "stride": self.stride}


@torch.no_grad()
def perplexity(
    model: nn.Module,
    stream: torch.Tensor,
    context: int = 1024,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> PerplexityResult:
    """exp(mean NLL) of a 1-D token stream under ``model``."""
    stride = stride or context
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in (0, context={context}], got {stride}")
    if stream.numel() < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {stream.numel()}")
    device = next(model.parameters()).device
    windows = _windows(stream.numel(), context, stride)
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        for begin, end, score_from in windows[i : i + batch_size]:
            ids = stream[begin:end].unsqueeze(0).to(device)  # (1, T)
            logits = model(input_ids=ids).logits.float()  # (1, T, V)
            nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")  # (T-1,)
            scored = nll[score_from - begin - 1 :] if score_from > begin else nll
            total_nll += scored.double().sum().item()
            total_tokens += scored.numel()
    model.train(was_training)
    return PerplexityResult(math.exp(total_nll / total_tokens), total_tokens, context, stride)


def _windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window; every target token scored once."""
    out = []
    scored_until = 1  # token 0 has no prediction
    begin = 0
    while scored_until < n:
        end = min(begin + context, n)
        out.append((begin, end, max(scored_until, begin + 1)))
        scored_until = end
        if end == n:
            break
        begin += stride
    return out
