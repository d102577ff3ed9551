"""Knowledge distillation from the unpruned teacher (Minitron: KD recovers far more per token).

loss = kd_weight * T^2 * KL(p_teacher^T || p_student^T) + (1 - kd_weight) * LM, KL summed over the
vocabulary and averaged over every token position; T^2 keeps gradient scale independent of T
(Hinton et al., 2015). The student trains all parameters, as in ``FullTrainer``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from adaptprune.arch.lm_head import final_hidden_states, lm_head_of, supports_hidden_forward
from adaptprune.compat import cpu_has_native_bf16
from adaptprune.config import TrainConfig

from .base import lm_loss, register_trainer
from .full import FullTrainer
from .head_loss import HeadLoss, fused_head_loss, next_token_targets
from .sharding import is_sharded, shard_teacher


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over tokens of KL(teacher || student) at temperature T. logits (B, L, V)."""
    vocab = student_logits.shape[-1]
    log_p_student = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")  # per token
    return kl * temperature**2


def resolved_teacher_dtype(setting: str, model_dtype: str, device: torch.device | str) -> str:
    """``train.distill.teacher_dtype`` as a dtype name: ``auto`` is bfloat16 where ``device`` computes it
    natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else ``model.dtype``. The teacher only
    runs forward, so it needs no fp32 master copy: bf16 halves it (12 GiB -> 6 GiB for a 3B teacher)."""
    if setting != "auto":
        return setting
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    else:
        native = device.type == "cpu" and cpu_has_native_bf16()
    return "bfloat16" if native else model_dtype


@register_trainer
class DistillTrainer(FullTrainer):
    """Full-parameter student, frozen dense teacher (eval mode, no grads, never DDP-wrapped; under FSDP2
    sharded like the student)."""

    name = "distill"
    needs_teacher = True

    def __init__(
        self,
        model: nn.Module,
        accelerator: Accelerator,
        config: TrainConfig | None = None,
        teacher: nn.Module | None = None,
    ):
        if teacher is None:
            raise ValueError("the 'distill' trainer needs the unpruned teacher model")
        if {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}:
            raise ValueError("teacher and student share parameters: pass a copy of the dense model as teacher")
        self.teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
        if is_sharded(accelerator):  # in place: the same teacher object serves every stage's trainer
            self.teacher = shard_teacher(accelerator, self.teacher)
        super().__init__(model, accelerator, config)

    def head_loss(self) -> HeadLoss:
        d = self.config.distill
        return HeadLoss(
            chunk_tokens=self.config.loss_chunk_tokens,
            kd_weight=d.kd_weight,
            temperature=d.temperature,
            kernel=self.config.loss_kernel,
        )

    def compute_loss(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        if self.fuses_head(model) and supports_hidden_forward(self.teacher):
            hidden = final_hidden_states(model, input_ids)  # (B, L, h)
            with torch.no_grad(), self.accelerator.autocast():
                teacher_hidden = final_hidden_states(self.teacher, input_ids)
            with self.accelerator.autocast():
                targets = next_token_targets(input_ids)
                head, teacher_head = lm_head_of(model), lm_head_of(self.teacher)
                return fused_head_loss(hidden, head, targets, self.head_loss(), teacher_hidden, teacher_head)
        logits = model(input_ids=input_ids).logits  # (B, L, V), fp32 from accelerate's wrapper
        with torch.no_grad(), self.accelerator.autocast():
            teacher_logits = self.teacher(input_ids=input_ids).logits  # (B, L, V)
        kd_weight, temperature = self.config.distill.kd_weight, self.config.distill.temperature
        loss = kd_weight * kd_loss(logits, teacher_logits, temperature)
        if kd_weight < 1:
            loss = loss + (1.0 - kd_weight) * lm_loss(logits, input_ids)
        return loss
