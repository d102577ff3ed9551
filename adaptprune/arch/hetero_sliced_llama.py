"""Checkpoint classes for SliceGPT-sliced Llama-family models (Ashkboos et al., arXiv 2401.15024).

SliceGPT rotates the residual stream into its principal basis and deletes the trailing
directions, so the stream has its own width at every point. The stream is sampled at
``2L + 1`` positions, recorded in ``config.slice_dims``:

    slice_dims[0]       embedding output = input of layer 0
    slice_dims[2l + 1]  layer l, between attention and MLP
    slice_dims[2l + 2]  layer l output = input of layer l + 1 (the last one feeds the head)

Each decoder layer carries two residual matrices, as in the original code: ``attn_shortcut``
(slice_dims[2l] x slice_dims[2l+1]) and ``mlp_shortcut`` (slice_dims[2l+1] x slice_dims[2l+2]),
both Q_inᵀ Q_out restricted to the kept directions. Norm scales are folded into the next linears,
so every RMSNorm is scale-free (``ScaleFreeRMSNorm``); the head is untied from the embedding.

Norm over a sliced stream: the original ``RMSN`` divides the sum of squares of the *kept*
coordinates by the full hidden size D. With nothing sliced this is exact (a scale-free RMSNorm is
rotation invariant); after slicing it drops the energy of the deleted directions, which PCA made
small. We do the same. Only HF's attention and MLP modules are reused; the decoder layer has its
own forward because the residual path is a matrix product here, not an identity.

Copied into saved checkpoints (``auto_map``), so it imports nothing of adaptprune.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer


class AdaptSlicedLlamaConfig(LlamaConfig):
    """``LlamaConfig`` plus ``slice_dims``: the residual width at each of the 2L+1 positions.

    ``hidden_size`` stays the dense width D: the norms divide by it and the rotary/attention
    geometry does not depend on it.
    """

    model_type = "adaptprune_sliced_llama"
    slice_dims: list[int] | None = None

    def stream_dims(self) -> list[int]:
        """``slice_dims``, or the dense width everywhere when nothing is sliced."""
        if self.slice_dims is None:
            return [self.hidden_size] * (2 * self.num_hidden_layers + 1)
        return [int(d) for d in self.slice_dims]

    def validate_architecture(self) -> None:
        super().validate_architecture()
        dims = self.stream_dims()
        if len(dims) != 2 * self.num_hidden_layers + 1:
            raise ValueError(f"slice_dims needs 2 * {self.num_hidden_layers} + 1 entries, got {len(dims)}")
        if not all(0 < d <= self.hidden_size for d in dims):
            raise ValueError(f"slice_dims must lie in [1, hidden_size={self.hidden_size}], got {dims}")
        if self.tie_word_embeddings:
            raise ValueError("a sliced model has its own head: tie_word_embeddings must be False")


class ScaleFreeRMSNorm(nn.Module):
    """x / sqrt(Σ_kept x² / D + eps): RMSNorm without a scale (folded away), mean over the dense D.

    Dividing by D instead of the kept width is SliceGPT's choice: it equals the dense norm of the
    full rotated vector minus the (small) energy of the sliced directions. ``eps`` is the dense
    model's ``rms_norm_eps`` (the original fixes 1e-5), so slicing nothing is exact.
    """

    def __init__(self, dense_size: int, eps: float):
        super().__init__()
        self.dense_size = dense_size
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)  # as LlamaRMSNorm: reduce in fp32
        variance = x.pow(2).sum(-1, keepdim=True) / self.dense_size  # (B, T, 1)
        return (x * torch.rsqrt(variance + self.variance_epsilon)).to(input_dtype)

    def extra_repr(self) -> str:
        return f"dense_size={self.dense_size}, eps={self.variance_epsilon}"


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias)


class SlicedLlamaDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer on a sliced, rotated residual stream.

    in -> [attention] -> mid -> [MLP] -> out, with widths (d_in, d_mid, d_out):
        mid = x @ attn_shortcut + o_proj(attn(norm(x)))      # (B, T, d_mid)
        out = mid @ mlp_shortcut + down(mlp(norm(mid)))      # (B, T, d_out)
    Subclassing ``LlamaDecoderLayer`` keeps HF's gradient checkpointing and hidden-state capture.
    """

    def __init__(self, config: AdaptSlicedLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)  # HF attention/MLP at full width, resized below
        dims = config.stream_dims()
        d_in, d_mid, d_out = dims[2 * layer_idx], dims[2 * layer_idx + 1], dims[2 * layer_idx + 2]
        attn, mlp = self.self_attn, self.mlp
        attn.q_proj = _linear(d_in, attn.q_proj.out_features, config.attention_bias)
        attn.k_proj = _linear(d_in, attn.k_proj.out_features, config.attention_bias)
        attn.v_proj = _linear(d_in, attn.v_proj.out_features, config.attention_bias)
        attn.o_proj = _linear(attn.o_proj.in_features, d_mid, config.attention_bias)
        mlp.gate_proj = _linear(d_mid, mlp.gate_proj.out_features, config.mlp_bias)
        mlp.up_proj = _linear(d_mid, mlp.up_proj.out_features, config.mlp_bias)
        mlp.down_proj = _linear(mlp.down_proj.in_features, d_out, config.mlp_bias)
        self.input_layernorm = ScaleFreeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = ScaleFreeRMSNorm(config.hidden_size, config.rms_norm_eps)
        # identity-like until SliceGPT writes Q_inᵀ Q_out (exact when nothing is sliced)
        self.attn_shortcut = nn.Parameter(torch.eye(d_in, d_mid))
        self.mlp_shortcut = nn.Parameter(torch.eye(d_mid, d_out))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_out, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = hidden_states @ self.attn_shortcut + attn_out  # (B, T, d_mid)
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states @ self.mlp_shortcut + mlp_out  # (B, T, d_out)


class AdaptSlicedLlamaForCausalLM(LlamaForCausalLM):
    """Llama with a SliceGPT-sliced residual stream; HF's model and causal-LM forward unchanged."""

    config_class = AdaptSlicedLlamaConfig
    _tied_weights_keys = None  # the head is its own (rotated) matrix, never the embedding
    _no_split_modules = ["SlicedLlamaDecoderLayer"]
    self_contained_checkpoint = True  # saved as this class, not converted by an adapter

    def __init__(self, config: AdaptSlicedLlamaConfig):
        super().__init__(config)  # HF builds the dense skeleton; the sliced parts replace it
        dims = config.stream_dims()
        inner = self.model
        inner.embed_tokens = nn.Embedding(config.vocab_size, dims[0], inner.padding_idx)
        inner.layers = nn.ModuleList(SlicedLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        inner.norm = ScaleFreeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(dims[-1], config.vocab_size, bias=False)
        self.post_init()
