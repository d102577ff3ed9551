"""What llama.cpp can run of a checkpoint: family and RoPE checks, per-layer sizes, architecture.

``llama`` (llama.cpp build 11434, ``src/models/llama.cpp``) builds every layer from layer 0's
sizes (``LLAMA_LOAD_LOCALS``), so it serves uniform models only; ``deci`` (``src/models/deci.cpp``)
reads ``n_head(i)``, ``n_head_kv(i)`` and ``n_ff(i)`` per layer and skips attention in a layer with
zero heads. HF rotates the two halves of a head with RoPE, llama.cpp adjacent pairs: q/k rows are
permuted within each head to match (``interleave_rope_rows``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..arch import UnsupportedArchitectureError, get_adapter, hf_compat
from .errors import ExportError

EXPORT_FAMILIES = ("llama", "mistral", "qwen2")
SLICED_MODEL_TYPES = ("adaptprune_sliced_llama",)  # SliceGPT: rotations and shortcut matrices
STATIC_ROPE_TYPES = ("default", "linear", "llama3")  # expressible as per-frequency divisors


class LayerSizes(NamedTuple):
    heads: int  # query heads
    kv_heads: int
    neurons: int  # MLP intermediate size


def check_exportable(config) -> None:
    """Refuse, from the config alone (before loading weights), what has no llama.cpp form yet."""
    model_type = getattr(config, "model_type", None)
    if model_type in SLICED_MODEL_TYPES:
        raise ExportError(
            "this is a SliceGPT checkpoint: its residual rotations and shortcut matrices have no llama.cpp "
            "form, so it cannot be exported to GGUF"
        )
    try:
        family = get_adapter(config).family
    except UnsupportedArchitectureError:
        family = model_type
    if family not in EXPORT_FAMILIES:
        raise ExportError(f"GGUF export supports the {', '.join(EXPORT_FAMILIES)} families so far, not '{family}'")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"hidden_act={config.hidden_act!r}: llama.cpp's llama/deci graphs use SiLU")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in STATIC_ROPE_TYPES:
        raise ExportError(f"RoPE type {rope.get('rope_type')!r} is not exported; supported: {STATIC_ROPE_TYPES}")
    if (getattr(config, "partial_rotary_factor", None) or 1.0) != 1.0:
        raise ExportError("partial rotary embeddings have no llama/deci form in llama.cpp")


def layer_sizes(model: nn.Module) -> list[LayerSizes]:
    """Each layer's query heads, KV heads and neurons, read from the modules and checked against
    the config's per-layer view (a disagreement means a malformed checkpoint)."""
    adapter, config = get_adapter(model), model.config
    n_rep = adapter.heads_per_group(config)
    sizes = []
    for i in range(len(adapter.decoder_layers(model))):
        shape = adapter.layer_shape(model, i)
        sizes.append(LayerSizes(shape.groups * n_rep, shape.groups, shape.neurons))
        declared = hf_compat.layer_config(config, i)
        expect = {"num_attention_heads": sizes[-1].heads, "num_key_value_heads": shape.groups}
        expect["intermediate_size"] = shape.neurons
        for key, value in expect.items():
            if getattr(declared, key, value) != value:
                raise ExportError(f"layer {i}: config says {key}={getattr(declared, key)} but the weights have {value}")
    return sizes


def choose_architecture(sizes: list[LayerSizes]) -> str:
    """``llama`` when every layer has layer 0's sizes (and attention and an MLP), else ``deci``."""
    uniform = all(s == sizes[0] for s in sizes) and sizes[0].heads > 0 and sizes[0].neurons > 0
    return "llama" if uniform else "deci"


def interleave_rope_rows(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows (or biases) per head from HF's rotate-half layout to llama.cpp's adjacent
    pairs: within a head, row ``s*hd/2 + j`` moves to ``2j + s`` (pure permutation, exact)."""
    head_dim = rows.shape[0] // n_heads
    rest = rows.shape[1:]
    return rows.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(rows.shape)


def rope_factors(model: nn.Module, head_dim: int, theta: float) -> torch.Tensor | None:
    """Per-frequency divisors (llama.cpp's ``rope_freqs``) turning plain RoPE into the model's own
    (linear, llama3); None when the model uses plain RoPE."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None:
        return None
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise ExportError("RoPE attention scaling has no llama/deci form in llama.cpp")
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
    factors = (plain / inv_freq.double()).float()
    return None if torch.allclose(factors, torch.ones_like(factors), rtol=1e-6, atol=0) else factors


def rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))
