"""Full-parameter recovery training: every weight trains with AdamW (Adapt-Accel's default).

Mixed precision is ``train.mixed_precision``, handed to the ``Accelerator`` the controller builds:
``prepare`` wraps the forward in autocast and keeps fp32 master weights; nothing custom here.
"""

from __future__ import annotations

from .base import Trainer, register_trainer


@register_trainer
class FullTrainer(Trainer):
    """All parameters trainable; AdamW state is carried across surgery (``optimizer_state``)."""

    name = "full"

    def wrap_for_training(self, model):
        # A model coming back from LoRA or from a frozen load may have requires_grad off.
        return model.requires_grad_(True)
