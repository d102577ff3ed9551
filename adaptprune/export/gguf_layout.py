"""What llama.cpp can run of a checkpoint: the family's layout, RoPE checks, per-layer sizes.

Every llama.cpp architecture (build 11434) reads ``feed_forward_length``, ``head_count`` and
``head_count_kv`` as a scalar or a per-layer array (``get_key_or_arr`` in ``llama-model.cpp``), but
most build their tensors and graph from layer 0's sizes (``LLAMA_LOAD_LOCALS``): ``llama``,
``qwen3``, ``gemma3`` and ``phi3`` serve uniform models only. ``deci`` (``src/models/deci.cpp``) and
``openelm`` (``src/models/openelm.cpp``) read ``n_head(i)``, ``n_head_kv(i)`` and ``n_ff(i)`` per
layer. Each family has a ``Layout`` (registered here by family name) that says which architecture
holds a given checkpoint, or refuses it in one line, and writes its tensors and keys. HF rotates
the two halves of a head with RoPE; ``llama``/``deci`` rotate adjacent pairs, so their q/k rows are
permuted within each head (``interleave_rope_rows``); the other architectures rotate halves too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from gguf import MODEL_TENSOR, TENSOR_NAMES, GGUFWriter
from torch import nn

from ..arch import UnsupportedArchitectureError, get_adapter, hf_compat
from .errors import ExportError

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
    layout_for(config).check_config(config)


def check_llama_math(config, arch: str = "llama/deci") -> None:
    """SiLU MLP, plain-frequency RoPE over the whole head: what the SiLU graphs compute."""
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"hidden_act={config.hidden_act!r}: llama.cpp's {arch} graphs use SiLU")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in STATIC_ROPE_TYPES:
        raise ExportError(f"RoPE type {rope.get('rope_type')!r} is not exported; supported: {STATIC_ROPE_TYPES}")
    if (getattr(config, "partial_rotary_factor", None) or 1.0) != 1.0:
        raise ExportError(f"partial rotary embeddings have no {arch} form in llama.cpp")


class Layout:
    """How one family is written: the architecture, its tensors and its keys (subclassed per family)."""

    families: tuple[str, ...] = ()
    per_layer_archs: tuple[str, ...] = ()  # architectures that get per-layer arrays
    native_sliding_window = False  # the architecture runs the window itself (else it is the context)

    def check_config(self, config) -> None:
        check_llama_math(config)

    def architecture(self, model: nn.Module, sizes: list[LayerSizes]) -> str:
        raise NotImplementedError

    def layer_tensors(
        self, layer: nn.Module, i: int, size: LayerSizes, arch: str, warnings: list[str]
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def global_tensors(self, model: nn.Module, arch: str) -> dict[str, torch.Tensor]:
        """Embedding, final norm and (untied) head, as the family's graphs use them unchanged."""
        adapter = get_adapter(model)
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        out = {tensor_name(MODEL_TENSOR.TOKEN_EMBD): embed.detach().float()}
        out[tensor_name(MODEL_TENSOR.OUTPUT_NORM)] = model.get_submodule(adapter.final_norm_path(model)).weight.float()
        if head.data_ptr() != embed.data_ptr():  # untied head; a tied one is llama.cpp's default
            out[tensor_name(MODEL_TENSOR.OUTPUT)] = head.detach().float()
        return {k: v.detach() for k, v in out.items()}

    def rope_base(self, config) -> float:
        return rope_theta(config)

    def write_hparams(self, writer: GGUFWriter, model: nn.Module, arch: str) -> list[str]:
        """Keys beyond the common ones (sizes, RoPE base, norm epsilon); returns warnings."""
        return []


LAYOUTS: dict[str, Layout] = {}


def register_layout(cls: type[Layout]) -> type[Layout]:
    for family in cls.families:
        LAYOUTS[family] = cls()
    return cls


def layout_for(model_or_config) -> Layout:
    """The family's layout, or one line saying why llama.cpp cannot run the family."""
    config = getattr(model_or_config, "config", model_or_config)
    try:
        family = get_adapter(config).family
    except UnsupportedArchitectureError:
        family = getattr(config, "model_type", None)
    if family == "opt":
        raise ExportError(
            "llama.cpp has no OPT architecture (learned position embeddings, LayerNorm, ReLU MLP with "
            "biases; build 11434 neither converts nor runs OPT), so an OPT checkpoint cannot be exported to GGUF"
        )
    if family not in LAYOUTS:
        raise ExportError(f"GGUF export supports the {', '.join(LAYOUTS)} families, not '{family}'")
    return LAYOUTS[family]


def tensor_name(kind: MODEL_TENSOR, suffix: str = "weight", layer: int | None = None) -> str:
    """llama.cpp's tensor name, e.g. ``blk.3.ffn_down.bias`` (from gguf-py's own table)."""
    base = TENSOR_NAMES[kind]
    return f"{base.format(bid=layer) if layer is not None else base}.{suffix}"


def nonzero_output_biases(layer: nn.Module, paths: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")) -> list:
    """The output projections of a layer that carry a non-zero bias (mean compensation)."""
    found = []
    for path in paths:
        bias = getattr(layer.get_submodule(path), "bias", None)
        if bias is not None and bool(bias.detach().abs().max() > 0):
            found.append(path)
    return found


def is_uniform(sizes: list[LayerSizes]) -> bool:
    """Every layer has layer 0's sizes, attention and an MLP."""
    return all(s == sizes[0] for s in sizes) and sizes[0].heads > 0 and sizes[0].neurons > 0


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
    return "llama" if is_uniform(sizes) else "deci"


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
