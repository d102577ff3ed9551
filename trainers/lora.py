"""LoRA recovery (LLM-Pruner's recipe: r=8, alpha=16, dropout 0.05 on all projections).

Surgery needs plain ``nn.Linear`` modules, so before every surgery the adapters are merged
into the base weights (W <- W + (alpha/r) B A) and removed; after surgery a fresh adapter is
attached to the smaller model. The adapter parameters are therefore new each stage and the
optimizer always starts fresh (``optimizer_state`` does not apply).
"""

from __future__ import annotations

import copy

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from adaptprune.config import LoraArgs

from .base import Trainer, register_trainer


def lora_config(config: LoraArgs) -> LoraConfig:
    """peft's LoraConfig from ``train.lora``: every linear of the decoder layers unless modules are named.

    peft's ``all-linear`` finds the linears by type (q/k/v/o and gate/up/down on Llama, the fused
    qkv_proj/gate_up_proj on Phi-3, fc1/fc2/out_proj on OPT) and leaves the LM head alone.
    """
    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules) or "all-linear",
        bias="none",
    )


def attach_adapter(model: nn.Module, config: LoraArgs) -> PeftModel:
    """Wrap a plain model with a fresh LoRA adapter; base weights are frozen by peft."""
    return get_peft_model(model, lora_config(config))


def merge_adapter(model: PeftModel) -> nn.Module:
    """Fold the adapter into the base linears and return the plain model, all params trainable."""
    plain = model.merge_and_unload()
    # peft froze the base weights; a plain model (for Taylor scores, full training) trains all.
    return plain.requires_grad_(True)


@register_trainer
class LoraTrainer(Trainer):
    """Only adapter weights train; merged into the base weights before each surgery."""

    name = "lora"
    carries_optimizer_state = False

    def wrap_for_training(self, model: nn.Module) -> nn.Module:
        return attach_adapter(model, self.config.lora)

    def unwrap_for_surgery(self, model: nn.Module) -> nn.Module:
        return merge_adapter(model)

    def export_model(self) -> nn.Module:
        """A merged plain copy for checkpoints; the live adapter and its optimizer stay as they are."""
        return merge_adapter(copy.deepcopy(self.unwrapped_model()))

    def merge_before_surgery(self) -> nn.Module:
        """Alias of ``before_surgery`` named for what it does here: merge and unload."""
        return self.before_surgery()
