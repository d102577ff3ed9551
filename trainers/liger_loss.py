"""Liger-Kernel's fused linear losses on CUDA (``pip install 'adaptprune[liger]'``), the same loss as ``head_loss``.

``train.loss_kernel`` picks the implementation of the fused, chunked LM head + loss: ``torch`` is
``head_loss._FusedHeadLoss`` (every device; the reference), ``liger`` is Liger-Kernel's Triton kernels
(Hsu et al. 2024, arXiv 2410.10989), ``auto`` takes Liger on a CUDA device when it is installed and the
head is one it computes, else torch.

What Liger computes, checked against ``kd_loss`` / ``lm_loss`` (liger-kernel 0.8):

- ``LigerFusedLinearJSD(jsd_beta=β, temperature=T)`` is the generalised JSD of the teacher's P and the
  student's Q at temperature T, summed over the vocabulary and averaged over rows. At β = 0 its kernel
  computes Σ_v P·(log P − log Q) = KL(P || Q), the direction of ``kd_loss``; it does not scale by T², so
  the distillation term here is T²·JSD₀. It has no head bias and no logit soft-capping.
- ``LigerFusedLinearCrossEntropyLoss`` is the mean cross-entropy over targets other than ``ignore_index``,
  as ``lm_loss``; it takes a head bias and soft-capping.

So a head with a bias or soft-capping under distillation (OPT's tied head has none; Gemma caps) stays on
the torch path under ``auto``. The kernels need CUDA: this module is exercised by the ``gpu``-marked test
(``tests/test_head_loss.py``) only.
"""

from __future__ import annotations

import importlib.util

import torch

from adaptprune.arch.lm_head import LMHead
from adaptprune.config import ConfigError

from .head_loss import IGNORE_INDEX, HeadLoss

LOSS_KERNELS = ("auto", "torch", "liger")


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def check_loss_kernel(kernel: str, device: torch.device) -> None:
    """Fail before training where ``train.loss_kernel: liger`` cannot run (one line, a user error)."""
    if kernel != "liger":
        return
    if not liger_installed():
        raise ConfigError("train.loss_kernel=liger needs liger-kernel: pip install 'adaptprune[liger]'")
    if torch.device(device).type != "cuda":
        raise ConfigError(f"train.loss_kernel=liger needs a CUDA device, the run is on {device}")


def uses_liger(kernel: str, hidden: torch.Tensor, head: LMHead, teacher_head: LMHead | None, spec: HeadLoss) -> bool:
    """Whether this loss runs on Liger's kernels (``liger``: always; ``auto``: where it can)."""
    if kernel == "torch" or not hidden.is_cuda:
        return False
    if kernel == "liger":
        return True
    plain = teacher_head is None or spec.kd_weight == 0 or not _capped_or_biased(head, teacher_head)
    return liger_installed() and plain


def _capped_or_biased(*heads: LMHead) -> bool:
    return any(h.bias is not None or h.softcap for h in heads)


def liger_head_loss(
    hidden: torch.Tensor,
    head: LMHead,
    targets: torch.Tensor,
    spec: HeadLoss,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: LMHead | None = None,
) -> torch.Tensor:
    """α·T²·KL(teacher || student) + (1 − α)·CE through Liger's fused kernels (module docstring)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

    flat = hidden.reshape(-1, hidden.shape[-1])
    loss = flat.new_zeros((), dtype=torch.float32)
    if spec.kd_weight > 0:
        if _capped_or_biased(head, teacher_head):
            raise ConfigError("train.loss_kernel=liger: Liger's distillation has no head bias or soft-capping")
        teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
        jsd = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=IGNORE_INDEX, temperature=spec.temperature)
        kd = jsd(flat, head.weight, teacher, teacher_head.weight.detach(), None)
        loss = loss + spec.kd_weight * spec.temperature**2 * kd.float()
    if spec.kd_weight < 1:
        ce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, softcap=head.softcap)
        loss = loss + (1.0 - spec.kd_weight) * ce(head.weight, flat, targets.reshape(-1), head.bias).float()
    return loss
