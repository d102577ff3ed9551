"""The Llama-math GGUF layout: ``llama`` for uniform models, ``deci`` for per-layer sizes.

Serves the llama, mistral and qwen2 families directly and Phi-3 whenever llama.cpp's ``phi3``
graph cannot hold a checkpoint (``gguf_families``): all compute RMSNorm, SiLU-gated MLP and
rotate-half RoPE over the whole head. Both architectures apply the optional ``attn_output.bias`` and
``ffn_down.bias`` (our mean compensation) and q/k/v biases (Qwen2). Three limits of ``deci`` are
handled here rather than hit at load time: a zero-head layer ignores ``attn_output.bias`` (a
non-zero one is refused, never dropped); the head size is read from layer 0, so layer 0 must keep
attention; a layer with ``n_ff == 0`` is skipped whole (its attention output too), so an empty MLP
is written as one all-zero neuron, which adds exactly nothing. llama.cpp's ``llama``/``deci`` RoPE
rotates adjacent pairs while HF rotates halves, so q/k rows are permuted within each head (an
exact reordering; ``interleave_rope_rows``).
"""

from __future__ import annotations

import torch
from gguf import MODEL_TENSOR
from torch import nn

from ..arch import get_adapter
from .errors import ExportError
from .gguf_layout import (
    LayerSizes,
    Layout,
    choose_architecture,
    interleave_rope_rows,
    register_layout,
    rope_factors,
    rope_theta,
    tensor_name,
)

# Decoder-layer module (HF Llama family) -> llama.cpp tensor; its .weight / .bias keep the suffix.
LAYER_TENSORS = {
    "input_layernorm": MODEL_TENSOR.ATTN_NORM,
    "self_attn.q_proj": MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj": MODEL_TENSOR.ATTN_OUT,
    "post_attention_layernorm": MODEL_TENSOR.FFN_NORM,
    "mlp.gate_proj": MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": MODEL_TENSOR.FFN_DOWN,
}
ATTENTION_MODULES = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def llama_layer_tensors(
    params: dict[str, torch.Tensor], i: int, size: LayerSizes, warnings: list[str]
) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors for ``llama``/``deci`` from its parameters under Llama's module
    names (``"mlp.down_proj.bias"`` -> value); every parameter is placed or refused."""
    out = {}
    for name, param in params.items():
        module, _, suffix = name.rpartition(".")
        if module not in LAYER_TENSORS:
            raise ExportError(f"layer {i}: parameter {name} has no llama.cpp tensor; it would be lost")
        value = param.detach().float()
        if size.heads == 0 and module in ATTENTION_MODULES:
            if module == "self_attn.o_proj" and suffix == "bias" and value.abs().max() > 0:
                raise ExportError(
                    f"layer {i} has no attention heads but a non-zero attn_output bias (mean compensation); "
                    "llama.cpp's deci graph skips such a layer's attention and would drop the bias"
                )
            continue  # q/k/v/o are empty and the norm feeds nothing
        if module in ("self_attn.q_proj", "self_attn.k_proj"):
            value = interleave_rope_rows(value, size.heads if module == "self_attn.q_proj" else size.kv_heads)
        out[tensor_name(LAYER_TENSORS[module], suffix, i)] = value
    if size.neurons == 0:  # deci skips a layer with n_ff == 0 entirely: write one neuron that adds 0
        out.update(zero_neuron(i, out[tensor_name(MODEL_TENSOR.FFN_NORM, "weight", i)].shape[0]))
        warnings.append(f"layer {i} has no MLP neurons; written as one all-zero neuron (llama.cpp would skip it)")
    return out


def zero_neuron(i: int, hidden: int) -> dict[str, torch.Tensor]:
    """An MLP of one neuron whose gate, up and down rows are zero: it adds exactly nothing."""
    out = {
        tensor_name(kind, "weight", i): torch.zeros(1, hidden) for kind in (MODEL_TENSOR.FFN_GATE, MODEL_TENSOR.FFN_UP)
    }
    out[tensor_name(MODEL_TENSOR.FFN_DOWN, "weight", i)] = torch.zeros(hidden, 1)
    return out


@register_layout
class LlamaLayout(Layout):
    families = ("llama", "mistral", "qwen2")
    per_layer_archs = ("deci",)

    def architecture(self, model: nn.Module, sizes: list[LayerSizes]) -> str:
        return choose_architecture(sizes)

    def layer_tensors(
        self, layer: nn.Module, i: int, size: LayerSizes, arch: str, warnings: list[str]
    ) -> dict[str, torch.Tensor]:
        return llama_layer_tensors(dict(layer.named_parameters()), i, size, warnings)

    def global_tensors(self, model: nn.Module, arch: str) -> dict[str, torch.Tensor]:
        """Also ``rope_freqs``: per-frequency divisors for linear / llama3 RoPE."""
        out = super().global_tensors(model, arch)
        factors = rope_factors(model, get_adapter(model).head_dim(model.config), rope_theta(model.config))
        if factors is not None:
            out[tensor_name(MODEL_TENSOR.ROPE_FREQS)] = factors
        return out
