"""The ``train`` section of the run config: the trainer, its loop and precision, and each trainer's own
arguments (AdamW for all, LoRA, distillation), typed and validated like the other sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .registry import TRAINERS  # names only: the trainers package loads on demand
from .schema import option

_f = option  # short alias used by the field tables below


def _trainer_names() -> list[str]:
    return TRAINERS.names()


@dataclass
class OptimArgs:
    """AdamW, used by every trainer (decoupled weight decay on matrices only)."""

    weight_decay: float = _f(0.0, "AdamW weight decay on matrices (norms and biases never decay)", ge=0)
    beta1: float = _f(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = _f(0.95, "AdamW beta2", ge=0, lt=1)
    eps: float = _f(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)", ge=0)
    after_surgery: Literal["carry", "reset"] = _f(
        "carry", "after surgery: slice the AdamW moments of kept units into the new optimizer, or start fresh"
    )


@dataclass
class LoraArgs:
    """The ``lora`` trainer (peft): adapters merged before every surgery, fresh ones after."""

    r: int = _f(8, "LoRA rank", min=1)
    alpha: float = _f(16.0, "LoRA scaling numerator (scale = alpha / r)", gt=0)
    dropout: float = _f(0.05, "dropout on the LoRA branch input", ge=0, lt=1)
    target_modules: list[str] = _f(
        [], "linear module names that get adapters (empty = every linear in the decoder layers, peft's all-linear)"
    )


@dataclass
class DistillArgs:
    """The ``distill`` trainer: KL to the frozen unpruned teacher, optionally mixed with the LM loss."""

    temperature: float = _f(1.0, "softmax temperature T of the KD loss (scaled by T^2)", gt=0)
    kd_weight: float = _f(1.0, "loss = kd_weight * KD + (1 - kd_weight) * LM", ge=0, le=1)
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto",
        "dtype of the frozen teacher's weights: auto = bfloat16 where the device computes it natively (CUDA with bf16, "
        "CPUs with AVX512-BF16/AMX), else model.dtype",
    )


@dataclass
class TrainConfig:
    trainer: str = _f("full", "recovery strategy (registry: trainers)", choices=_trainer_names)
    lr: float = _f(5e-5, "peak learning rate", gt=0)
    min_lr_ratio: float = _f(0.1, "learning rate at the end of decay, as a fraction of lr", ge=0, le=1)
    batch_size: int = _f(4, "sequences per micro-batch per process", min=1)
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step", min=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = _f(
        "no", "autocast for training (fp32 master weights; fp16 adds a loss scaler); handed to the Accelerator"
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (re-enabled after every surgery)")
    loss_chunk_tokens: int = _f(
        256,
        "tokens per chunk of the fused LM head + loss (logits exist one chunk at a time, forward and backward); "
        "0 = materialise every logit (the unfused reference)",
        min=0,
    )
    loss_kernel: Literal["auto", "torch", "liger"] = _f(
        "auto",
        "the fused head + loss: torch chunks (any device), Liger-Kernel's Triton kernels (CUDA, the 'liger' "
        "extra), or auto: Liger on CUDA where installed and the head has no bias or soft-capping under KD",
    )
    on_nonfinite: Literal["rollback", "stop"] = _f(
        "rollback", "NaN/inf loss: reload the last checkpoint at half the lr, or stop"
    )
    seed: int = _f(0, "seed for data order and initialisation")
    optim: OptimArgs = field(default_factory=OptimArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    distill: DistillArgs = field(default_factory=DistillArgs)
