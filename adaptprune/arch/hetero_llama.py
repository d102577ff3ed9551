"""Heterogeneous Llama-family checkpoint classes (Llama 2/3, SmolLM, MobileLLM).

Layers may differ in MLP width and in the number of KV groups; the sizes are stored in the
config's ``per_layer_config``. HF's ``LlamaForCausalLM.forward`` is used unchanged: attention
reshapes with ``-1`` heads and keeps ``n_rep`` query heads per KV head, so smaller
``nn.Linear`` modules are all that changes. Copied into saved checkpoints (``auto_map``) so they
load with ``trust_remote_code=True`` where adaptprune is not installed.
"""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from .hf_compat import (
    OUTPUT_BIAS_KEY,
    add_output_biases,
    adopt_config,
    homogeneous_copy,
    rebuild_heterogeneous_layers,
    validate_heterogeneous,
)


class AdaptLlamaConfig(LlamaConfig):
    model_type = "adaptprune_llama"

    def validate(self) -> None:
        validate_heterogeneous(self, LlamaConfig.validate)


class AdaptLlamaForCausalLM(LlamaForCausalLM):
    config_class = AdaptLlamaConfig
    output_projections = ("self_attn.o_proj", "mlp.down_proj")

    def __init__(self, config: AdaptLlamaConfig):
        base = homogeneous_copy(config)
        super().__init__(base)  # HF builds the uniform skeleton
        adopt_config(self, config, built_from=base)
        rebuild_heterogeneous_layers(self.model.layers, LlamaDecoderLayer, config)
        if getattr(config, OUTPUT_BIAS_KEY, False):
            add_output_biases(self.model.layers, self.output_projections)
        self.post_init()
