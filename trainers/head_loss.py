"""The LM head fused with its loss, chunked over tokens: logits exist for one chunk at a time.

The unfused path (``base.lm_loss``, ``distill.kd_loss``) materialises the (tokens x vocabulary) fp32
logits of the student and the teacher and autograd keeps their log-softmaxes until backward: Λ·V
bytes per token (``plan/memory.py``), 6.8 GB for one 2,048-token sequence at a 128k vocabulary.
Here the final hidden states go in and, chunk by chunk in the forward, the logits are computed, the
loss accumulated and its gradients taken at once (as Liger-Kernel's fused linear cross-entropy does,
Hsu et al. 2024, arXiv 2410.10989): what is kept for backward is the gradient with respect to the
hidden states (tokens x h) and the head's weight and bias (V x h, the size of its ``.grad``), never a
(tokens x V) tensor. The teacher's logits of a chunk are computed in the same loop, without grad.

For one chunk of student logits z (after the family's soft-capping z = c·tanh(r/c)), teacher logits
z_t, temperature T and targets y (``ignore_index`` where none)::

    loss = α·T²·Σ_rows KL(softmax(z_t/T) || softmax(z/T)) / N  +  (1 − α)·Σ_valid CE(z, y) / N_valid
    ∂loss/∂z = α·T·(softmax(z/T) − softmax(z_t/T)) / N  +  (1 − α)·(softmax(z) − onehot(y)) / N_valid
    ∂loss/∂r = ∂loss/∂z · (1 − (z/c)²)

with α = ``kd_weight`` (0 for the LM loss), N all token positions and N_valid those with a target,
exactly the reductions of ``kd_loss`` (batchmean) and ``lm_loss`` (mean). Under autocast the head's
matmuls run in the autocast dtype and everything per vocabulary entry in fp32, as on the unfused path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from adaptprune.arch.lm_head import LMHead

IGNORE_INDEX = -100  # ``F.cross_entropy``'s default: positions without a next-token target


@dataclass(frozen=True)
class HeadLoss:
    """Which loss the fused head computes and how many tokens it holds logits for at once."""

    chunk_tokens: int = 256
    kd_weight: float = 0.0  # α: 0 = LM loss only (no teacher)
    temperature: float = 1.0
    kernel: str = "torch"  # train.loss_kernel: torch (this module), liger or auto (``liger_loss``)


def next_token_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B·L,) targets: position t predicts token t+1; the last position of a row, and padding, predict none."""
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        targets[:, :-1][attention_mask[:, 1:] == 0] = IGNORE_INDEX
    return targets.reshape(-1)


def fused_head_loss(
    hidden: torch.Tensor,
    head: LMHead,
    targets: torch.Tensor,
    spec: HeadLoss,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: LMHead | None = None,
) -> torch.Tensor:
    """Scalar loss of (…, h) final hidden states through ``head`` against ``targets`` (module docstring)."""
    if spec.kd_weight > 0 and (teacher_hidden is None or teacher_head is None):
        raise ValueError("a distillation loss (kd_weight > 0) needs the teacher's hidden states and head")
    if spec.chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {spec.chunk_tokens}")
    from .liger_loss import liger_head_loss, uses_liger  # imports this module: resolved at call time

    if uses_liger(spec.kernel, hidden, head, teacher_head, spec):
        return liger_head_loss(hidden, head, targets, spec, teacher_hidden, teacher_head)
    flat = hidden.reshape(-1, hidden.shape[-1])
    teacher = None
    if spec.kd_weight > 0:
        teacher = (teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach(), teacher_head)
    bias = head.bias if head.bias is not None else None
    return _FusedHeadLoss.apply(flat, head.weight, bias, targets.reshape(-1), head.softcap, spec, teacher)


def _compute_dtype(tensor: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None):
    """fp32 logits of a chunk; ``weight``/``bias`` are already in the compute dtype."""
    z = F.linear(hidden.to(weight.dtype), weight, bias).float()
    return softcap * torch.tanh(z / softcap) if softcap else z


def _teacher_logits(teacher: tuple, rows: slice) -> torch.Tensor:
    hidden, weight, bias, softcap = teacher
    return _logits(hidden[rows], weight, bias, softcap)


class _FusedHeadLoss(torch.autograd.Function):
    """Loss and its gradients in one chunked pass; backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, spec, teacher):
        dtype = _compute_dtype(hidden, weight)
        t_dtype = None if teacher is None else _compute_dtype(teacher[0], teacher[1].weight)
        want_w, want_b = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.detach().to(dtype)
            b = None if bias is None else bias.detach().to(dtype)
            if teacher is not None:
                t_hidden, t_head = teacher
                t_w = t_head.weight.detach().to(t_dtype)
                t_b = None if t_head.bias is None else t_head.bias.detach().to(t_dtype)
                teacher = (t_hidden, t_w, t_b, t_head.softcap)
            grads = _Grads.empty(hidden, weight, want_w, want_b)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            n_valid = (targets != IGNORE_INDEX).sum().clamp_min(1).float()
            for start in range(0, hidden.shape[0], spec.chunk_tokens):
                rows = slice(start, start + spec.chunk_tokens)
                h = hidden[rows].detach()
                z = _logits(h, w, b, softcap)
                teacher_logits = None if teacher is None else partial(_teacher_logits, teacher, rows)
                chunk_loss, grad_z = _chunk_loss(z, teacher_logits, targets[rows], spec, hidden.shape[0], n_valid)
                loss += chunk_loss
                if softcap:
                    grad_z.mul_(1 - (z / softcap).square())
                del z
                grads.add(rows, grad_z.to(dtype), h.to(dtype), w)
        ctx.grads = grads.final(hidden, weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = (None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads)
        ctx.grads = None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _chunk_loss(
    z: torch.Tensor, teacher_logits, targets: torch.Tensor, spec: HeadLoss, n_rows: int, n_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss of the chunk, ∂loss/∂z) for fp32 logits z (n, V) (module docstring).

    In place wherever it can: at most four (n, V) fp32 buffers, z included, are alive at once."""
    alpha, temp = spec.kd_weight, spec.temperature
    loss = torch.zeros((), dtype=torch.float32, device=z.device)
    grad = None
    if alpha > 0:
        with torch.no_grad():
            log_p = torch.log_softmax(teacher_logits() / temp, dim=-1)
        log_q = torch.log_softmax(z / temp, dim=-1)
        p = log_p.exp()
        kl = p.reshape(-1) @ log_p.sub_(log_q).reshape(-1)  # Σ p·(log p − log q)
        del log_p
        loss = loss + alpha * temp**2 * kl / n_rows
        grad = log_q.exp_().sub_(p).mul_(alpha * temp / n_rows)
        del p
    if alpha < 1:
        valid = targets != IGNORE_INDEX
        safe = targets.clamp_min(0).unsqueeze(1)
        ce_grad = torch.log_softmax(z, dim=-1)
        loss = loss - (1 - alpha) * (ce_grad.gather(1, safe).squeeze(1) * valid).sum() / n_valid
        ce_grad.exp_().scatter_add_(1, safe, -torch.ones_like(safe, dtype=ce_grad.dtype))
        ce_grad.mul_(valid.unsqueeze(1).float().mul_((1 - alpha) / n_valid))
        grad = ce_grad if grad is None else grad.add_(ce_grad)
    return loss, grad


@dataclass
class _Grads:
    """Gradients of the loss w.r.t. the hidden states, head weight and bias, filled chunk by chunk."""

    hidden: torch.Tensor
    weight: torch.Tensor | None  # fp32 accumulator
    bias: torch.Tensor | None  # fp32 accumulator

    @classmethod
    def empty(cls, hidden: torch.Tensor, weight: torch.Tensor, want_w: bool, want_b: bool) -> _Grads:
        acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
        return cls(torch.empty_like(hidden), acc, bias)

    def add(self, rows: slice, grad_z: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
        self.hidden[rows] = grad_z @ w
        if self.weight is not None:
            self.weight.add_(grad_z.t() @ h)
        if self.bias is not None:
            self.bias.add_(grad_z.sum(0))

    def final(self, hidden: torch.Tensor, weight: torch.Tensor) -> tuple:
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return self.hidden, cast(self.weight, weight), cast(self.bias, weight)
