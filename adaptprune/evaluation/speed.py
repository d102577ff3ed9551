"""Measured generation speed (prefill and decode tokens/s) and dense-vs-pruned comparisons.

One probe = a fixed random prompt (seeded) and a fixed generation length: greedy decoding with
``min_new_tokens == max_new_tokens`` so EOS cannot end a run early. Prefill is one forward over
the prompt; decode speed is ``(new_tokens - 1) / (generate time - prefill time)`` because
``generate`` runs one prefill (which yields the first new token) and ``new_tokens - 1`` cached
decode steps. Each figure is the median over ``runs`` after ``warmup`` untimed runs; CUDA work is
synchronised before the clock is read.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from ..arch import get_adapter
from ..pruning.surgery import count_non_embedding_parameters, count_parameters


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _vocab_and_ids(tokenizer_or_vocab: Any) -> tuple[int, int, int | None]:
    """(vocab size, pad id, eos id) from a tokenizer or a plain vocabulary size."""
    if isinstance(tokenizer_or_vocab, int):
        return tokenizer_or_vocab, 0, None
    tok = tokenizer_or_vocab
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
    return len(tok), pad, eos


@dataclass
class SpeedProbe:
    """A model with its fixed prompt and generation settings; times one prefill or one generation."""

    model: nn.Module
    input_ids: torch.Tensor  # (B, T) fixed prompt on the model's device
    generation_config: GenerationConfig

    @classmethod
    def build(
        cls, model: nn.Module, tokenizer_or_vocab: Any, prompt_tokens: int, new_tokens: int, batch_size: int = 1
    ) -> SpeedProbe:
        if prompt_tokens < 1 or new_tokens < 2:
            raise ValueError("need prompt_tokens >= 1 and new_tokens >= 2 (decode speed needs a decode step)")
        vocab, pad, eos = _vocab_and_ids(tokenizer_or_vocab)
        vocab = min(vocab, model.get_input_embeddings().num_embeddings)
        generator = torch.Generator().manual_seed(0)  # the same prompt for every model compared
        ids = torch.randint(0, vocab, (batch_size, prompt_tokens), generator=generator)
        config = GenerationConfig(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=eos,
            use_cache=True,
        )
        return cls(model, ids.to(next(model.parameters()).device), config)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @torch.inference_mode()
    def prefill(self) -> float:
        # Like generate's own prefill: fill the KV cache, compute logits for the last position only.
        extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
        return _timed(lambda: self.model(input_ids=self.input_ids, use_cache=True, **extra), self.device)

    @torch.inference_mode()
    def generate(self) -> float:
        mask = torch.ones_like(self.input_ids)

        def run() -> None:
            out = self.model.generate(
                input_ids=self.input_ids, attention_mask=mask, generation_config=self.generation_config
            )
            if out.shape[1] != self.input_ids.shape[1] + self.generation_config.max_new_tokens:
                raise RuntimeError(
                    f"generation produced {out.shape[1] - self.input_ids.shape[1]} tokens, not the fixed length"
                )

        return _timed(run, self.device)


def _summarise(probe: SpeedProbe, prefill_s: list[float], generate_s: list[float]) -> dict[str, Any]:
    batch, prompt = probe.input_ids.shape
    new = probe.generation_config.max_new_tokens
    prefill, generate = statistics.median(prefill_s), statistics.median(generate_s)
    decode = max(generate - prefill, 1e-9)  # the new_tokens - 1 cached steps
    return {
        "prefill_tokens_per_s": batch * prompt / prefill,
        "decode_tokens_per_s": batch * (new - 1) / decode,
        "generate_tokens_per_s": batch * new / generate,
        "prefill_s": prefill,
        "generate_s": generate,
        "decode_ms_per_token": 1000 * decode / (new - 1),
        "prompt_tokens": prompt,
        "new_tokens": new,
        "batch_size": batch,
        "runs": len(generate_s),
        "device": str(probe.device),
        "threads": torch.get_num_threads(),
    }


def _time_probes(probes: list[SpeedProbe], runs: int, warmup: int) -> list[dict[str, Any]]:
    """Warm every probe up, then time them round-robin (so drifting machine load hits all alike)."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    was_training = [p.model.training for p in probes]
    for p in probes:
        p.model.eval()
    try:
        for _ in range(warmup):
            for p in probes:
                p.prefill()
                p.generate()
        times: list[tuple[list[float], list[float]]] = [([], []) for _ in probes]
        for _ in range(runs):
            for p, (prefill_s, generate_s) in zip(probes, times, strict=True):
                prefill_s.append(p.prefill())
                generate_s.append(p.generate())
    finally:
        for p, mode in zip(probes, was_training, strict=True):
            p.model.train(mode)
    return [_summarise(p, *t) for p, t in zip(probes, times, strict=True)]


def measure_speed(
    model: nn.Module,
    tokenizer_or_vocab: Any,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    runs: int = 5,
    warmup: int = 1,
    device: str | torch.device | None = None,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Prefill and decode tokens/s of greedy generation (medians of ``runs``).

    ``tokenizer_or_vocab`` is a tokenizer (vocabulary size, pad and EOS ids) or a vocabulary size.
    ``device`` moves the model there first (in place); by default it is timed where it is.
    """
    if device is not None:
        model.to(device)
    probe = SpeedProbe.build(model, tokenizer_or_vocab, prompt_tokens, new_tokens, batch_size)
    return _time_probes([probe], runs, warmup)[0]


def forward_flops_per_token(model: nn.Module, context: int = 0) -> int:
    """Approximate forward FLOPs for one token: 2 per linear weight, plus attention at ``context``.

    Linear layers (the LM head included, embedding lookups excluded) cost 2 FLOPs per weight;
    attention scores and the weighted sum cost ``4 * context * width`` per layer, where width is
    the input width of the attention output projection (query heads x head_dim, per layer).
    """
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    adapter = get_adapter(model)
    width = sum(layer.get_submodule(adapter.attention_output).in_features for layer in adapter.decoder_layers(model))
    return 2 * linear + 4 * context * width


def size_ratios(dense: nn.Module, pruned: nn.Module, context: int = 0) -> dict[str, float]:
    """Pruned / dense ratios of parameters, non-embedding parameters and forward FLOPs per token."""
    return {
        "param_ratio": count_parameters(pruned) / count_parameters(dense),
        "non_embedding_param_ratio": count_non_embedding_parameters(pruned) / count_non_embedding_parameters(dense),
        "flop_ratio": forward_flops_per_token(pruned, context) / forward_flops_per_token(dense, context),
    }


def compare_speed(
    dense: nn.Module,
    pruned: nn.Module,
    tokenizer_or_vocab: Any,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    runs: int = 5,
    warmup: int = 1,
    device: str | torch.device | None = None,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Measured speed-ups of ``pruned`` over ``dense`` beside their parameter and FLOP ratios.

    Both models get the same prompt and are timed alternately in one process. The FLOP ratio is
    taken at the middle of generation (context ``prompt_tokens + new_tokens // 2``); a speed-up
    equal to ``1 / flop_ratio`` would mean the pruned model loses nothing to overheads.
    """
    if device is not None:
        dense.to(device)
        pruned.to(device)
    probes = [SpeedProbe.build(m, tokenizer_or_vocab, prompt_tokens, new_tokens, batch_size) for m in (dense, pruned)]
    dense_speed, pruned_speed = _time_probes(probes, runs, warmup)
    ratios = size_ratios(dense, pruned, context=prompt_tokens + new_tokens // 2)
    return {
        "dense": dense_speed,
        "pruned": pruned_speed,
        "params": {"dense": count_parameters(dense), "pruned": count_parameters(pruned)},
        "non_embedding_params": {
            "dense": count_non_embedding_parameters(dense),
            "pruned": count_non_embedding_parameters(pruned),
        },
        **ratios,
        "ideal_speedup": 1 / ratios["flop_ratio"],
        "prefill_speedup": pruned_speed["prefill_tokens_per_s"] / dense_speed["prefill_tokens_per_s"],
        "decode_speedup": pruned_speed["decode_tokens_per_s"] / dense_speed["decode_tokens_per_s"],
    }
