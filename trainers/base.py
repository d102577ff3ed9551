"""The recovery-strategy interface: one training phase between two surgeries, on ``accelerate``.

A trainer owns the prepared (possibly DDP-wrapped) model and its optimizer. Its lifecycle per
stage of the incremental schedule (ALGORITHMS.md, "Incremental schedule"):

    plain = trainer.before_surgery()        # plain HF model with nn.Linear; optimizer state kept aside
    records = apply_plan(plain, plan)       # the controller prunes it in place
    trainer.after_surgery(plain, records)   # new optimizer (state carried or reset), re-prepared
    result = trainer.run_phase(batches, steps, lr_at, global_step, on_step)

Subclasses say how the model is wrapped for training (LoRA adapters or none), which
parameters train, and the loss (LM or distillation). The training loop itself lives here once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from adaptprune.allocation.records import DepthRecord, HiddenRecord
from adaptprune.arch.lm_head import final_hidden_states, lm_head_of, supports_hidden_forward
from adaptprune.compat import enable_activation_checkpointing
from adaptprune.config import OptimArgs, TrainConfig
from adaptprune.config.registry import TRAINERS
from adaptprune.pruning.staging import HOST

from .head_loss import HeadLoss, fused_head_loss, next_token_targets
from .liger_loss import check_loss_kernel
from .optim_state import (
    CarryReport,
    StateByName,
    carry_optimizer_state,
    state_by_name,
)
from .optim_state_shape import Record, carry_reshaped_optimizer_state
from .sharding import (
    carry_sharded_state,
    gather_model,
    gather_optimizer_state,
    is_sharded,
    load_optimizer_state,
    sharded_state_by_name,
)


class NonFiniteLossError(FloatingPointError):
    """The loss (or the gradient norm) of a step was NaN or inf; the optimizer did not step.

    Raised on every rank at once (the check is all-reduced), so DDP never deadlocks on it.
    """

    def __init__(self, global_step: int, what: str, value: float):
        super().__init__(f"non-finite {what} ({value}) at global step {global_step}; optimizer step skipped")
        self.global_step = global_step
        self.what = what
        self.value = value


class BatchesExhaustedError(RuntimeError):
    """The batch iterable ended before the phase's step count was reached."""


@dataclass(frozen=True)
class PhaseResult:
    """Summary of one training phase (tokens and throughput summed over all processes)."""

    steps: int
    global_step: int  # after the phase: pass it to the next phase
    tokens: int
    mean_loss: float
    last_loss: float
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t+1. logits (B, L, V), ids (B, L)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), input_ids[:, 1:].reshape(-1))


def adamw_for(model: nn.Module, config: OptimArgs, device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, 1-D tensors (norms, biases) do not.

    On CUDA the fused kernel updates each parameter in place: torch's default there, the foreach
    implementation, allocates sqrt(v̂) for every parameter at once (a model-sized temporary, 11.5 GiB for a
    3B fp32 model). Elsewhere the single-tensor loop (``foreach=False``): one parameter's temporaries at a time.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # lr is set before every step from lr_at(global_step); 0 here so nothing steps unscheduled.
    betas = (config.beta1, config.beta2)
    kernel = {"fused": True} if device_type == "cuda" else {"foreach": False}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=0.0, betas=betas, eps=config.eps, **kernel)


def forget_prepared(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """Undo what ``accelerator.prepare`` did to ``model`` so it can be pruned and prepared anew.

    Shim for accelerate 1.x. ``free_memory`` drops the accelerator's references to the old
    DDP wrapper and optimizer (and anything else it prepared, e.g. dataloaders). Without a
    process group ``prepare`` returns the model itself flagged ``_is_accelerate_prepared`` and
    would skip a second prepare (no device placement, no autocast); we drop the flag. Under
    mixed precision it replaced ``forward`` with an autocast wrapper and kept the original in
    ``_original_forward``; we restore that one exactly (``unwrap_model(keep_fp32_wrapper=False)``
    also strips transformers' own decorators such as ``can_return_tuple``).
    """
    accelerator.free_memory()
    model.__dict__.pop("_is_accelerate_prepared", None)
    original = model.__dict__.pop("_original_forward", None)
    if original is not None:
        if getattr(original, "__func__", None) is getattr(type(model), "forward", None):
            model.__dict__.pop("forward", None)  # back to the class's forward
        else:
            model.forward = original
    return model


def register_trainer(cls: type[Trainer]) -> type[Trainer]:
    """Class decorator: make ``cls`` available as ``train.trainer: <cls.name>``."""
    TRAINERS[cls.name] = cls
    return cls


class Trainer:
    """A recovery strategy: wraps the model for training, builds the optimizer, runs phases.

    The base is plain LM training; strategies override the three hooks below and set ``name``.
    """

    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = False  # the controller loads a frozen dense teacher if True
    carries_optimizer_state: ClassVar[bool] = True  # False where trainable params are new after surgery

    def __init__(
        self,
        model: nn.Module,
        accelerator: Accelerator,
        config: TrainConfig | None = None,
        teacher: nn.Module | None = None,  # used only by strategies with needs_teacher
    ):
        self.accelerator = accelerator
        self.config = config or TrainConfig()
        check_loss_kernel(self.config.loss_kernel, accelerator.device)
        self._held_state: StateByName | None = None
        self.last_carry: CarryReport | None = None  # what the last after_surgery did with the state
        self.model, self.optimizer = self._prepare(model, records=())

    # ---- what a strategy decides --------------------------------------------------------
    def wrap_for_training(self, model: nn.Module) -> nn.Module:
        """The module to train (e.g. with adapters attached); identity by default."""
        return model

    def unwrap_for_surgery(self, model: nn.Module) -> nn.Module:
        """The plain HF model (only nn.Linear projections) from the training module."""
        return model

    def compute_loss(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Scalar loss of one micro-batch (B, L); the LM loss by default (fused with the head: ``head_loss``)."""
        if self.fuses_head(model):
            hidden = final_hidden_states(model, input_ids)  # (B, L, h)
            with self.accelerator.autocast():
                return fused_head_loss(hidden, lm_head_of(model), next_token_targets(input_ids), self.head_loss())
        logits = model(input_ids=input_ids).logits  # (B, L, V)
        return lm_loss(logits, input_ids)

    def head_loss(self) -> HeadLoss:
        """What the fused head computes (the LM loss here; distillation mixes in the KL)."""
        return HeadLoss(chunk_tokens=self.config.loss_chunk_tokens, kernel=self.config.loss_kernel)

    def fuses_head(self, model: nn.Module) -> bool:
        """Whether the loss runs chunked through the head (``train.loss_chunk_tokens`` > 0 and a family that can)."""
        return self.config.loss_chunk_tokens > 0 and supports_hidden_forward(model)

    # ---- lifecycle ----------------------------------------------------------------------
    def _prepare(self, model: nn.Module, records: Sequence[Record]) -> tuple[nn.Module, torch.optim.Optimizer]:
        if self.config.gradient_checkpointing:
            # Surgery builds new modules, so the flag is set again on every (re-)prepare.
            enable_activation_checkpointing(model)
        module = self.wrap_for_training(model)
        optimizer = adamw_for(module, self.config.optim, self.accelerator.device.type)
        if is_sharded(self.accelerator):
            module, optimizer = self.accelerator.prepare(module, optimizer)
            if self._held_state is not None:  # sharded moments: gathered, sliced, re-sharded one at a time
                self.last_carry = carry_sharded_state(self._held_state, records, module, optimizer)
                self._held_state = None
            return module, optimizer
        if self._held_state is not None:
            # Before prepare: AcceleratedOptimizer re-loads the state onto the device itself. Width or
            # depth surgery renames and slices whole-model names; unit surgery alone slices by layer.
            reshaped = any(isinstance(r, (HiddenRecord, DepthRecord)) for r in records)
            carry = carry_reshaped_optimizer_state if reshaped else carry_optimizer_state
            # consume: each old moment is freed as its slice is placed (in place: old state + one parameter)
            self.last_carry = carry(self._held_state, records, optimizer, module, consume=True)
            self._held_state = None
        return self.accelerator.prepare(module, optimizer)

    def unwrapped_model(self) -> nn.Module:
        """The training module without the DDP wrapper (its forward still autocasts under bf16)."""
        return self.accelerator.unwrap_model(self.model)

    def export_model(self) -> nn.Module:
        """A plain HF model with the current weights, to save in a checkpoint (not a copy here;
        under FSDP a gathered copy, built on every rank)."""
        if is_sharded(self.accelerator):
            return gather_model(self.unwrapped_model())
        return self.unwrapped_model()

    def before_surgery(self, on_host: bool = False) -> nn.Module:
        """Hand the plain model over for calibration, scoring and surgery.

        Keeps the optimizer state by parameter name (if the strategy carries it and the config
        says 'carry'), then releases the DDP/FSDP wrapper and optimizer (FSDP: the full weights are
        gathered first, into host memory with ``on_host``, the moments stay sharded, see ``sharding``).
        Call ``after_surgery`` next.
        """
        module = self.accelerator.unwrap_model(self.model)
        carry = self.carries_optimizer_state and self.config.optim.after_surgery == "carry"
        if is_sharded(self.accelerator):
            self._held_state = sharded_state_by_name(module, self.optimizer) if carry else None
            module = gather_model(module, HOST if on_host else None)
        elif carry:
            self._held_state = state_by_name(self.optimizer, module)
        self.model = self.optimizer = None  # the old wrapper pins the old parameters
        forget_prepared(self.accelerator, module)
        return self.unwrap_for_surgery(module)

    def after_surgery(self, model: nn.Module, records: Sequence[Record] = ()) -> None:
        """Train the (pruned) plain model next: new optimizer, kept units' state sliced in (after
        width or depth surgery: kept channels' state sliced, removed layers' dropped, the rest renamed).

        Every rank must have applied the same plan; DDP re-broadcasts rank 0's weights anyway.
        """
        self.model, self.optimizer = self._prepare(model, records)

    def optimizer_state_by_name(self) -> StateByName:
        """The live optimizer state keyed by parameter name (views: copy to keep while training;
        under FSDP the full state, gathered on every rank)."""
        if is_sharded(self.accelerator):
            return gather_optimizer_state(self.unwrapped_model(), self.optimizer)
        return state_by_name(self.optimizer, self.unwrapped_model())

    def load_optimizer_state_by_name(self, state: StateByName) -> None:
        """Put a saved state (same shapes, e.g. from ``checkpointing.load_optimizer_state``) in place."""
        if is_sharded(self.accelerator):
            load_optimizer_state(self.unwrapped_model(), self.optimizer, state)
        else:
            carry_optimizer_state(state, (), self.optimizer, self.unwrapped_model())

    # ---- one training phase -------------------------------------------------------------
    def run_phase(
        self,
        batches: Iterable[torch.Tensor],
        steps: int,
        lr_at: Callable[[int], float],
        global_step: int,
        on_step: Callable[[dict], None] | None = None,
    ) -> PhaseResult:
        """Train ``steps`` optimizer steps on batches of token ids (B, L) of this rank.

        Each step takes ``grad_accum_steps`` batches. ``on_step`` gets, on every rank,
        {step, loss, lr, grad_norm, tokens_per_s} (loss averaged over ranks, tokens/s summed).
        Raises ``NonFiniteLossError`` before the optimizer step if a loss or grad norm is NaN/inf.
        """
        batch_iter = iter(batches)
        losses: list[float] = []
        tokens = 0
        self.model.train()
        phase_start = time.perf_counter()
        for step in range(steps):
            step_start = time.perf_counter()
            lr = float(lr_at(global_step))
            step_loss, step_tokens, grad_norm = self._optimizer_step(batch_iter, step, steps, lr, global_step)
            global_step += 1
            losses.append(step_loss)
            tokens += step_tokens
            if on_step is not None:
                elapsed = max(time.perf_counter() - step_start, 1e-9)
                on_step(
                    {"step": global_step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": step_tokens / elapsed}
                )  # fmt: skip
        self.model.eval()
        return PhaseResult(
            steps=steps,
            global_step=global_step,
            tokens=tokens,
            mean_loss=sum(losses) / len(losses) if losses else math.nan,
            last_loss=losses[-1] if losses else math.nan,
            seconds=time.perf_counter() - phase_start,
        )

    def _optimizer_step(
        self, batch_iter: Iterator[torch.Tensor], step: int, steps: int, lr: float, global_step: int
    ) -> tuple[float, int, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches: (mean loss, tokens, grad norm)."""
        acc, model, optimizer = self.accelerator, self.model, self.optimizer
        accum = self.config.grad_accum_steps
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, step_tokens = 0.0, 0
        for micro in range(accum):
            input_ids = _next_batch(batch_iter, step, steps).to(acc.device)  # (B, L)
            # Gradients are all-reduced only on the last micro-batch of the step.
            with acc.no_sync(model) if micro < accum - 1 else nullcontext():
                loss = self.compute_loss(model, input_ids)
                step_loss += checked_mean(acc, optimizer, loss, global_step, "loss") / accum
                acc.backward(loss / accum)
            step_tokens += input_ids.numel() * acc.num_processes
        max_norm = self.config.optim.grad_clip or math.inf  # inf: measure the norm, never scale
        grad_norm = acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
        # fp16's loss scaler overflows now and then by design: its optimizer step is skipped, not an error.
        scaled = getattr(acc, "scaler", None) is not None  # accelerate scales the loss (fp16 on a GPU)
        grad_norm = checked_mean(acc, optimizer, grad_norm, global_step, "grad norm", overflow_ok=scaled)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return step_loss, step_tokens, grad_norm


def checked_mean(
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    value: torch.Tensor,
    global_step: int,
    what: str,
    overflow_ok: bool = False,
) -> float:
    """Mean of a scalar over ranks; raise on every rank if any rank's value is NaN/inf (unless ``overflow_ok``)."""
    value = value.detach()
    if hasattr(value, "full_tensor"):  # FSDP2's clip_grad_norm_ returns a (replicated) DTensor
        value = value.full_tensor()
    value = value.float().reshape(())
    bad = (~torch.isfinite(value)).float()
    total, bad = accelerator.reduce(torch.stack([value, bad]), reduction="sum").tolist()
    if bad > 0 and not overflow_ok:
        # Drop partial gradients so the caller can recover (lower lr, reload) from a clean state.
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(global_step, what, total)
    return total / accelerator.num_processes


def _next_batch(batch_iter: Iterator[torch.Tensor], step: int, steps: int) -> torch.Tensor:
    try:
        return next(batch_iter)
    except StopIteration:
        raise BatchesExhaustedError(f"batches ran out at step {step} of {steps}") from None
