"""GGUF layouts of the Qwen3, Gemma 3 and Phi-3 families, each in llama.cpp's own architecture.

Read off the sources of llama.cpp build 11434 (``src/models/<arch>.cpp``):

- ``qwen3`` builds every layer from layer 0's sizes and has q/k RMS norms (one ``head_dim`` weight
  shared by all heads), optional q/k/v biases, no ``attn_output`` or ``ffn_down`` bias. Per-layer
  sizes go to ``openelm``, whose layer is Qwen3's exactly (RMS norms, fused qkv, q/k norms,
  rotate-half RoPE, SiLU-gated MLP, no biases) and which reads ``n_head(i)``, ``n_head_kv(i)`` and
  ``n_ff(i)``; it always ties the head to the embedding and has no q/k/v biases.
- ``gemma3`` builds every layer from layer 0's sizes, so per-layer sizes are refused. Gemma's
  RMSNorm scales by ``1 + w`` where llama.cpp's scales by ``w``: every norm is written as ``1 + w``.
  llama.cpp scales the embedding by ``sqrt(n_embd)`` and queries by ``1/sqrt(head_dim)`` (by
  ``1/sqrt(n_embd/n_head)`` for 62 layers, its 27B); a pruned hidden size or a
  ``query_pre_attn_scalar`` other than that is folded into ``token_embd`` (the head then written
  apart) and into ``attn_q_norm``. The sliding-window layers are a per-layer boolean array,
  their RoPE base ``rope.freq_base_swa``; final logit soft-capping is a key, attention-logit
  soft-capping has no form and is refused. No ``attn_output`` or ``ffn_down`` bias.
- ``phi3`` reads fused ``attn_qkv`` and ``ffn_up`` (gate rows, then up rows) but sizes
  ``attn_output`` as ``n_embd x n_embd`` and has no output biases, so it holds a Phi-3 whose query
  width still equals the hidden size. Any other Phi-3 (heads pruned, per-layer sizes, mean
  compensation) is split into q/k/v and gate/up and written as ``llama``/``deci``, whose math
  Phi-3's is.

Non-zero ``o_proj``/``down_proj`` biases (mean or least-squares compensation) are refused where the
architecture has no tensor for them; zero ones are dropped, which changes nothing.
"""

from __future__ import annotations

import math

import torch
from gguf import MODEL_TENSOR, GGUFWriter, RopeScalingType
from torch import nn

from ..arch import get_adapter, hf_compat
from .errors import ExportError
from .gguf_layout import (
    LayerSizes,
    Layout,
    check_llama_math,
    is_uniform,
    nonzero_output_biases,
    register_layout,
    rope_factors,
    rope_theta,
    tensor_name,
)
from .gguf_llama import llama_layer_tensors, zero_neuron

UNIFORM_WAY_OUT = "prune to a uniform shape (prune.target_shape, or prune.allocation=uniform)"
BIAS_WAY_OUT = "prune with prune.compensation=least_squares_no_bias (or none, energy), which add no bias"


def _named(layer: nn.Module, mapping: dict[str, MODEL_TENSOR], i: int) -> dict[str, torch.Tensor]:
    """``{llama.cpp name: float32 value}`` for each HF parameter whose module is in ``mapping``;
    a parameter of another module is refused (it would be lost), a zero output bias dropped."""
    out = {}
    for name, param in layer.named_parameters():
        module, _, suffix = name.rpartition(".")
        value = param.detach().float()
        if suffix == "bias" and module in ("self_attn.o_proj", "mlp.down_proj") and not value.abs().max() > 0:
            continue
        if module not in mapping:
            raise ExportError(f"layer {i}: parameter {name} has no llama.cpp tensor; it would be lost")
        out[tensor_name(mapping[module], suffix, i)] = value
    return out


def _refuse_output_biases(model: nn.Module, arch: str) -> None:
    for i, layer in enumerate(get_adapter(model).decoder_layers(model)):
        found = nonzero_output_biases(layer)
        if found:
            raise ExportError(
                f"layer {i}: {found[0]} has a bias (mean compensation) that llama.cpp's {arch} graph has no "
                f"tensor for; {BIAS_WAY_OUT}"
            )


# the attention both qwen3 and gemma3 write: q/k/v/o and a norm per head dimension of q and k
ATTENTION_WITH_QK_NORMS = {
    "input_layernorm": MODEL_TENSOR.ATTN_NORM,
    "self_attn.q_proj": MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj": MODEL_TENSOR.ATTN_OUT,
    "self_attn.q_norm": MODEL_TENSOR.ATTN_Q_NORM,
    "self_attn.k_norm": MODEL_TENSOR.ATTN_K_NORM,
}

QWEN3_TENSORS = {
    **ATTENTION_WITH_QK_NORMS,
    "post_attention_layernorm": MODEL_TENSOR.FFN_NORM,
    "mlp.gate_proj": MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": MODEL_TENSOR.FFN_DOWN,
}


@register_layout
class Qwen3Layout(Layout):
    """``qwen3`` for uniform sizes, ``openelm`` for per-layer sizes (tied head, no q/k/v biases)."""

    families = ("qwen3",)
    per_layer_archs = ("openelm",)

    def check_config(self, config) -> None:
        check_llama_math(config, "qwen3/openelm")
        if rope_factors_needed(config):
            raise ExportError("Qwen3 with scaled RoPE is not exported: llama.cpp's qwen3 graph reads no rope_freqs")

    def architecture(self, model: nn.Module, sizes: list[LayerSizes]) -> str:
        arch = "qwen3" if is_uniform(sizes) else "openelm"
        _refuse_output_biases(model, arch)
        if arch == "qwen3":
            return arch
        why = None
        if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            why = "ties the output head to the embedding and this model's head is separate"
        elif any(s.heads == 0 for s in sizes):
            why = "needs attention in every layer"
        elif any(
            getattr(layer.self_attn.get_submodule(p), "bias", None) is not None
            for layer in get_adapter(model).decoder_layers(model)
            for p in ("q_proj", "k_proj", "v_proj")
        ):
            why = "has no q/k/v biases"
        if why:
            raise ExportError(f"per-layer Qwen3 sizes need llama.cpp's openelm graph, which {why}; {UNIFORM_WAY_OUT}")
        return arch

    def layer_tensors(
        self, layer: nn.Module, i: int, size: LayerSizes, arch: str, warnings: list[str]
    ) -> dict[str, torch.Tensor]:
        out = _named(layer, QWEN3_TENSORS, i)
        if arch == "openelm":  # one fused qkv: all query rows, then key rows, then value rows
            parts = [out.pop(tensor_name(kind, "weight", i)) for kind in (MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K)]
            parts.append(out.pop(tensor_name(MODEL_TENSOR.ATTN_V, "weight", i)))
            out[tensor_name(MODEL_TENSOR.ATTN_QKV, "weight", i)] = torch.cat(parts)
            if size.neurons == 0:  # a zero-size tensor does not load: one neuron that adds 0
                out.update(zero_neuron(i, out[tensor_name(MODEL_TENSOR.FFN_NORM, "weight", i)].shape[0]))
                warnings.append(f"layer {i} has no MLP neurons; written as one all-zero neuron")
        return out


def rope_factors_needed(config) -> bool:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get("rope_type", rope.get("type", "default")) != "default"


GEMMA3_TENSORS = {
    **ATTENTION_WITH_QK_NORMS,
    "post_attention_layernorm": MODEL_TENSOR.ATTN_POST_NORM,
    "pre_feedforward_layernorm": MODEL_TENSOR.FFN_NORM,
    "mlp.gate_proj": MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": MODEL_TENSOR.FFN_DOWN,
    "post_feedforward_layernorm": MODEL_TENSOR.FFN_POST_NORM,
}
GEMMA_NORMS = ("_norm.", "_layernorm.")  # Gemma's RMSNorm scales by 1 + w


@register_layout
class Gemma3Layout(Layout):
    """``gemma3``, uniform sizes only (its loader builds every layer from layer 0's sizes)."""

    families = ("gemma3",)
    native_sliding_window = True

    def check_config(self, config) -> None:
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        if act != "gelu_pytorch_tanh":
            raise ExportError(f"hidden_activation={act!r}: llama.cpp's gemma3 graph uses tanh-approximated GELU")
        if getattr(config, "attn_logit_softcapping", None):
            raise ExportError("attention-logit soft-capping has no form in llama.cpp's gemma3 graph")
        if getattr(config, "use_bidirectional_attention", False):
            raise ExportError("bidirectional attention has no form in llama.cpp's gemma3 graph")
        for layer_type, rope in self._rope(config).items():
            kind = rope.get("rope_type", "default")
            if kind not in ("default", "linear") or (kind == "linear" and layer_type == "sliding_attention"):
                raise ExportError(f"Gemma 3 {layer_type} RoPE type {kind!r} is not exported (default, or linear)")

    @staticmethod
    def _rope(config) -> dict[str, dict]:
        """RoPE parameters per layer type (transformers 5 nests them; older configs are flat)."""
        params = getattr(config, "rope_parameters", None) or {}
        if "full_attention" in params or "sliding_attention" in params:
            return {k: v for k, v in params.items() if v}
        full = {"rope_theta": rope_theta(config), **(getattr(config, "rope_scaling", None) or {})}
        return {"full_attention": full, "sliding_attention": {"rope_theta": config.rope_local_base_freq}}

    def architecture(self, model: nn.Module, sizes: list[LayerSizes]) -> str:
        if not is_uniform(sizes):
            raise ExportError(
                "llama.cpp's gemma3 graph builds every layer from layer 0's sizes and no architecture of "
                f"build 11434 has Gemma 3's layer with per-layer sizes; {UNIFORM_WAY_OUT}"
            )
        _refuse_output_biases(model, "gemma3")
        return "gemma3"

    def layer_tensors(
        self, layer: nn.Module, i: int, size: LayerSizes, arch: str, warnings: list[str]
    ) -> dict[str, torch.Tensor]:
        out = _named(layer, GEMMA3_TENSORS, i)
        for name in out:
            if name.endswith("norm.weight"):
                out[name] = out[name] + 1.0
        out[tensor_name(MODEL_TENSOR.ATTN_Q_NORM, "weight", i)] *= self._query_factor(layer.self_attn.config, size)
        return out

    def _query_factor(self, config, size: LayerSizes) -> float:
        """HF's query scale over llama.cpp's: 1 unless ``query_pre_attn_scalar`` differs from its choice."""
        hidden, n_layers = int(config.hidden_size), int(config.num_hidden_layers)
        cpp = hidden // size.heads if n_layers == 62 else int(config.head_dim)  # llama.cpp's LLM_TYPE_27B
        return math.sqrt(cpp / float(config.query_pre_attn_scalar))

    def global_tensors(self, model: nn.Module, arch: str) -> dict[str, torch.Tensor]:
        """Norm as ``1 + w``; the embedding rescaled when HF's scale is not ``sqrt(n_embd)``."""
        out = super().global_tensors(model, arch)
        norm = tensor_name(MODEL_TENSOR.OUTPUT_NORM)
        out[norm] = out[norm] + 1.0
        embed = tensor_name(MODEL_TENSOR.TOKEN_EMBD)
        ours = torch.tensor(float(model.get_input_embeddings().scalar_embed_scale), dtype=torch.float32)
        theirs = torch.tensor(out[embed].shape[1], dtype=torch.float32).sqrt()
        if ours != theirs:
            out.setdefault(tensor_name(MODEL_TENSOR.OUTPUT), out[embed])  # the head keeps the unscaled rows
            out[embed] = out[embed] * (ours / theirs)
        return out

    def rope_base(self, config) -> float:
        return float(self._rope(config)["full_attention"]["rope_theta"])

    def write_hparams(self, writer: GGUFWriter, model: nn.Module, arch: str) -> list[str]:
        config = model.config
        rope = self._rope(config)
        full = rope["full_attention"]
        if full.get("rope_type", "default") == "linear":
            writer.add_rope_scaling_type(RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(full["factor"]))
        types = list(getattr(config, "layer_types", None) or [])
        if "sliding_attention" in types and getattr(config, "sliding_window", None):
            writer.add_sliding_window(int(config.sliding_window))
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
            writer.add_rope_freq_base_swa(float(rope["sliding_attention"]["rope_theta"]))
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        return []


PHI3_FUSED = {
    "input_layernorm": MODEL_TENSOR.ATTN_NORM,
    "self_attn.qkv_proj": MODEL_TENSOR.ATTN_QKV,
    "self_attn.o_proj": MODEL_TENSOR.ATTN_OUT,
    "post_attention_layernorm": MODEL_TENSOR.FFN_NORM,
    "mlp.gate_up_proj": MODEL_TENSOR.FFN_UP,  # llama.cpp's SwiGLU: silu(first half) * second half
    "mlp.down_proj": MODEL_TENSOR.FFN_DOWN,
}


@register_layout
class Phi3Layout(Layout):
    """``phi3`` when its fixed shapes hold the model, else split into ``llama``/``deci``."""

    families = ("phi3",)
    per_layer_archs = ("deci",)

    def architecture(self, model: nn.Module, sizes: list[LayerSizes]) -> str:
        config, adapter = model.config, get_adapter(model)
        hidden = int(hf_compat.global_value(config, "hidden_size"))
        fits = is_uniform(sizes) and sizes[0].heads * adapter.head_dim(config) == hidden
        layers = adapter.decoder_layers(model)
        if fits and not any(nonzero_output_biases(layer) for layer in layers) and not rope_factors_needed(config):
            return "phi3"
        return "llama" if is_uniform(sizes) else "deci"

    def layer_tensors(
        self, layer: nn.Module, i: int, size: LayerSizes, arch: str, warnings: list[str]
    ) -> dict[str, torch.Tensor]:
        if arch == "phi3":
            return _named(layer, PHI3_FUSED, i)
        params = dict(layer.named_parameters())
        head_dim = layer.self_attn.head_dim
        qkv = params.pop("self_attn.qkv_proj.weight")
        q, k, v = qkv.split([size.heads * head_dim, size.kv_heads * head_dim, size.kv_heads * head_dim])
        gate, up = params.pop("mlp.gate_up_proj.weight").chunk(2)
        params |= {"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v}
        params |= {"mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up}
        return llama_layer_tensors(params, i, size, warnings)

    def global_tensors(self, model: nn.Module, arch: str) -> dict[str, torch.Tensor]:
        out = super().global_tensors(model, arch)
        factors = rope_factors(model, get_adapter(model).head_dim(model.config), rope_theta(model.config))
        if factors is not None:  # only llama/deci get here with scaled RoPE
            out[tensor_name(MODEL_TENSOR.ROPE_FREQS)] = factors
        return out
