"""Heterogeneous Phi-3 checkpoint classes.

Phi-3 fuses projections: ``qkv_proj`` rows are all query heads, then the key heads, then the
value heads; ``gate_up_proj`` rows are the gate rows, then the up rows. A pruned layer is built
from its per-layer config (HF sizes both fused matrices from it). Two reads in HF's
``Phi3Attention.forward`` are not shape-driven: it splits ``qkv`` at
``config.num_attention_heads * head_dim`` and at ``self.num_key_value_heads``. So every attention
module reads its config through ``LiveLayerConfig`` (the layer's current sizes), and the
adapter's ``sync_config`` refreshes ``num_key_value_heads`` after surgery. HF's ``forward`` is
unchanged. Copied into saved checkpoints (``auto_map``); imports nothing of adaptprune but
``hf_compat``.
"""

from __future__ import annotations

from transformers import Phi3Config, Phi3ForCausalLM
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

from .hf_compat import (
    OUTPUT_BIAS_KEY,
    add_output_biases,
    adopt_config,
    global_value,
    homogeneous_copy,
    rebuild_heterogeneous_layers,
    validate_heterogeneous,
)


class LiveLayerConfig:
    """One layer's view of the model config, resolved at every read: the layer's current
    ``per_layer_config`` override if any, else the global value. Unlike a frozen per-layer copy it
    follows later surgery (``sync_config``) and run-time switches such as ``_attn_implementation``."""

    def __init__(self, config, layer_idx: int):
        self.__dict__.update(_config=config, _layer_idx=layer_idx)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_config", "_layer_idx"):
            raise AttributeError(name)  # keeps copy/pickle protocols from recursing
        spec = getattr(self._config, "_heterogeneity_spec", None)
        overrides = spec.per_layer_overrides.get(self._layer_idx, {}) if spec is not None else {}
        if name in overrides:
            return overrides[name]
        return global_value(self._config, name)


class AdaptPhi3Config(Phi3Config):
    model_type = "adaptprune_phi3"

    def __post_init__(self, **kwargs):
        # Phi3Config has no head_dim; HF derives it from the (per-layer) head count. Pin it.
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate(self) -> None:
        validate_heterogeneous(self, Phi3Config.validate)


class AdaptPhi3ForCausalLM(Phi3ForCausalLM):
    config_class = AdaptPhi3Config
    output_projections = ("self_attn.o_proj", "mlp.down_proj")

    def __init__(self, config: AdaptPhi3Config):
        base = homogeneous_copy(config)
        super().__init__(base)  # HF builds the uniform skeleton
        adopt_config(self, config, built_from=base)
        rebuild_heterogeneous_layers(self.model.layers, Phi3DecoderLayer, config)
        for layer_idx, layer in enumerate(self.model.layers):
            layer.self_attn.config = LiveLayerConfig(config, layer_idx)
        if getattr(config, OUTPUT_BIAS_KEY, False):
            add_output_biases(self.model.layers, self.output_projections)
        self.post_init()
