"""The LM head of every family, and a forward that stops before it: the final hidden states.

A fused, chunked loss (``trainers/fused_loss.py``) needs the normalised hidden states that enter the
head and the head itself (weight, optional bias, Gemma's final-logit soft-capping) instead of the
(tokens x vocabulary) logits. The model's own forward is still the one called, so DDP's and
accelerate's wrappers (autocast, gradient synchronisation) and FSDP2's unsharding stay in charge: it
is asked for logits at no position (``logits_to_keep`` an empty index, transformers >= 4.50) while a
forward hook on the backbone (``get_decoder()``: the module whose ``last_hidden_state`` the head reads in
every supported family, OPT's ``model.decoder`` included) keeps its output. The head's weight then
takes part in the graph twice: on zero positions there, and chunk by chunk in the loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

NO_POSITIONS = torch.empty(0, dtype=torch.long)  # ``logits_to_keep``: the head runs on zero positions


@dataclass(frozen=True)
class LMHead:
    """What turns a final hidden state into logits: ``cap * tanh((h Wᵀ + b) / cap)`` when ``softcap``."""

    weight: torch.Tensor  # (V, h)
    bias: torch.Tensor | None  # (V,)
    softcap: float | None  # Gemma's ``final_logit_softcapping``


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside DDP / peft wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP
            model = model.module
        else:
            return model


def lm_head_of(model: nn.Module) -> LMHead:
    """The output projection (tied or not) and the family's soft-capping of the logits."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    return LMHead(head.weight, getattr(head, "bias", None), float(softcap) if softcap else None)


def supports_hidden_forward(model: nn.Module) -> bool:
    """Whether the model's forward can skip its logits (``logits_to_keep``) and has a head to fuse."""
    lm = causal_lm(model)
    takes = "logits_to_keep" in inspect.signature(type(lm).forward).parameters
    return takes and isinstance(lm.get_output_embeddings(), nn.Linear) and _backbone(lm) is not None


def _backbone(lm: nn.Module) -> nn.Module | None:
    """The module whose output the head reads: transformers' ``get_decoder`` (OPT: ``model.decoder``)."""
    backbone = lm.get_decoder() if callable(getattr(lm, "get_decoder", None)) else None
    return backbone if isinstance(backbone, nn.Module) and backbone is not lm else None


@contextmanager
def _captured_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    seen: list[torch.Tensor] = []

    def keep(_module, _args, output):
        seen.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = module.register_forward_hook(keep)
    try:
        yield seen
    finally:
        handle.remove()


def final_hidden_states(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L, h): what the head would read, from ``model``'s own forward (wrappers included)."""
    with _captured_output(_backbone(causal_lm(model))) as seen:
        model(input_ids=input_ids, logits_to_keep=NO_POSITIONS.to(input_ids.device), use_cache=False)
    if len(seen) != 1:
        raise RuntimeError(f"expected one backbone output from the forward, got {len(seen)}")
    return seen[0]
