"""The fused, chunked LM head + loss: the same loss and gradients as the unfused path on every family (tied and
untied heads, soft-capping, temperature, mixed KD and LM), and a training step's peak memory drops by the logits."""

from __future__ import annotations

import copy

import pytest
import torch

from adaptprune.arch.lm_head import LMHead, final_hidden_states, lm_head_of, supports_hidden_forward
from adaptprune.plan import memory
from trainers import get_trainer
from trainers.base import lm_loss
from trainers.distill import kd_loss
from trainers.head_loss import IGNORE_INDEX, HeadLoss, fused_head_loss, next_token_targets

from .family_table import FAMILIES, hf_model
from .memory_helpers import peak_live_bytes
from .trainer_utils import cpu_accelerator, train_cfg

CASES = [(0.0, 1.0), (1.0, 2.0), (0.3, 1.7)]  # (kd_weight, temperature): LM only, KD only, both


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(fused: dict, unfused: dict) -> None:
    assert fused.keys() == unfused.keys()
    for name, grad in unfused.items():
        scale = unfused[name].abs().max().item()
        torch.testing.assert_close(fused[name], grad, rtol=1e-4, atol=1e-5 * max(scale, 1e-3), msg=name)


def _unfused(student, teacher, ids, kd_weight: float, temperature: float) -> torch.Tensor:
    logits = student(input_ids=ids).logits
    loss = torch.zeros(())
    if kd_weight > 0:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits
        loss = loss + kd_weight * kd_loss(logits, teacher_logits, temperature)
    if kd_weight < 1:
        loss = loss + (1 - kd_weight) * lm_loss(logits, ids)
    return loss


TIED = [(family, tied) for family in sorted(FAMILIES) for tied in (True, False) if tied or family != "opt"]


@pytest.mark.parametrize(("family", "tied"), TIED)  # OPT's head is always its input embedding
def test_fused_loss_and_gradients_equal_the_unfused_path(family, tied):
    extra = {"final_logit_softcapping": 3.0} if family == "gemma3_text" else {}
    if family != "opt":
        extra["tie_word_embeddings"] = tied
    student, teacher = hf_model(family, 0, **extra), hf_model(family, 1, **extra)
    assert supports_hidden_forward(student)
    assert (lm_head_of(student).weight is student.get_input_embeddings().weight) == tied
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    for kd_weight, temperature in CASES:
        student.zero_grad(set_to_none=True)
        reference = _unfused(student, teacher, ids, kd_weight, temperature)
        reference.backward()
        unfused = _grads(student)
        student.zero_grad(set_to_none=True)
        hidden = final_hidden_states(student, ids)
        with torch.no_grad():
            teacher_hidden = final_hidden_states(teacher, ids)
        spec = HeadLoss(chunk_tokens=5, kd_weight=kd_weight, temperature=temperature)  # 22 tokens: 4 chunks + 2
        loss = fused_head_loss(hidden, lm_head_of(student), next_token_targets(ids), spec, teacher_hidden,
                               lm_head_of(teacher))  # fmt: skip
        loss.backward()
        torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
        _assert_same_grads(_grads(student), unfused)


def test_bias_softcap_and_ignored_targets_against_autograd():
    """A head with a bias and soft-capping, padding targets ignored: gradients of hidden, weight and bias."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(13, 8, generator=gen, requires_grad=True)
    weight = torch.randn(40, 8, generator=gen, requires_grad=True)
    bias = torch.randn(40, generator=gen, requires_grad=True)
    t_hidden, t_weight = torch.randn(13, 8, generator=gen), torch.randn(40, 8, generator=gen)
    targets = torch.randint(0, 40, (13,), generator=gen)
    targets[[2, 7, 12]] = IGNORE_INDEX
    cap, spec = 2.5, HeadLoss(chunk_tokens=4, kd_weight=0.4, temperature=1.5)

    def capped(z):
        return cap * torch.tanh(z / cap)

    z = capped(hidden @ weight.T + bias)
    teacher_z = t_hidden @ t_weight.T
    kd = kd_loss(z[None], teacher_z[None], spec.temperature)
    reference = 0.4 * kd + 0.6 * torch.nn.functional.cross_entropy(z, targets, ignore_index=IGNORE_INDEX)
    expected = torch.autograd.grad(reference, (hidden, weight, bias))
    fused = fused_head_loss(hidden, LMHead(weight, bias, cap), targets, spec, t_hidden, LMHead(t_weight, None, None))
    torch.testing.assert_close(fused, reference)
    for got, want in zip(torch.autograd.grad(fused, (hidden, weight, bias)), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_padding_predicts_nothing():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert next_token_targets(ids, mask).tolist() == [6, 7, -100, -100, 9, -100, -100, -100]


@pytest.mark.parametrize("trainer", ["full", "distill"])
def test_a_training_step_s_peak_drops_by_the_logits(trainer):
    """The step's peak (loss + backward; every tensor counted at every op) falls from the unfused path's by
    what ``plan`` says: Λ·V bytes per token become one chunk's buffers and the head's fp32 gradient accumulator."""
    vocab, tokens, chunk = 16384, 4 * 64, 32
    model = hf_model("llama", 0, vocab_size=vocab, tie_word_embeddings=False)
    teacher = {"teacher": copy.deepcopy(model)} if trainer == "distill" else {}
    ids = torch.randint(3, vocab, (4, 64), generator=torch.Generator().manual_seed(0))
    peaks = {}
    for chunk_tokens in (0, chunk):
        config = train_cfg(trainer=trainer, loss_chunk_tokens=chunk_tokens, distill={"kd_weight": 0.5})
        step = get_trainer(trainer)(copy.deepcopy(model), cpu_accelerator(), config, **teacher)
        assert step.fuses_head(step.model) == (chunk_tokens > 0)
        peaks[chunk_tokens] = peak_live_bytes(lambda s=step: s.compute_loss(s.model, ids).backward())
    hidden = model.config.hidden_size
    p = memory.Precision.of("float32", "no")
    distill = trainer == "distill"
    unfused = memory.loss_bytes(tokens, vocab, hidden, p, distill, chunk_tokens=0)
    fused = memory.loss_bytes(tokens, vocab, hidden, p, distill, chunk_tokens=chunk)
    assert fused < unfused / 3
    assert peaks[0] - peaks[chunk] == pytest.approx(unfused - fused, rel=0.1)


def test_teacher_dtype_auto_is_bf16_only_where_the_device_has_it(monkeypatch):
    from trainers import distill

    monkeypatch.setattr(distill, "cpu_has_native_bf16", lambda: True)
    assert distill.resolved_teacher_dtype("auto", "float32", "cpu") == "bfloat16"
    monkeypatch.setattr(distill, "cpu_has_native_bf16", lambda: False)
    assert distill.resolved_teacher_dtype("auto", "float32", "cpu") == "float32"
    assert distill.resolved_teacher_dtype("float16", "float32", "cpu") == "float16"


def test_a_bf16_teacher_distils_like_the_fp32_one():
    """The fused loss reads the bf16 teacher's hidden states and head in bf16; the loss moves by bf16 rounding only."""
    student, teacher = hf_model("llama", 0), hf_model("llama", 1)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for dtype in (torch.float32, torch.bfloat16):
        config = train_cfg(trainer="distill", loss_chunk_tokens=8)
        trainer = get_trainer("distill")(copy.deepcopy(student), cpu_accelerator(), config, teacher=teacher.to(dtype))
        assert next(trainer.teacher.parameters()).dtype == dtype
        losses.append(trainer.compute_loss(trainer.model, ids).item())
    assert losses[1] == pytest.approx(losses[0], rel=0.02) and losses[1] != losses[0]


class _OnCuda:
    """Stands in for hidden states on a CUDA device: ``uses_liger`` reads only ``is_cuda``."""

    is_cuda = True


@pytest.mark.parametrize("installed", [True, False])
def test_loss_kernel_auto_takes_liger_only_where_it_computes_the_same_loss(monkeypatch, installed):
    from trainers import liger_loss

    monkeypatch.setattr(liger_loss, "liger_installed", lambda: installed)
    w = torch.zeros(4, 2)
    plain, biased, capped = LMHead(w, None, None), LMHead(w, torch.zeros(4), None), LMHead(w, None, 30.0)
    kd, lm = HeadLoss(kd_weight=1.0), HeadLoss(kd_weight=0.0)
    assert liger_loss.uses_liger("auto", _OnCuda(), plain, plain, kd) == installed
    assert liger_loss.uses_liger("auto", _OnCuda(), biased, None, lm) == installed  # its CE takes a bias
    assert not liger_loss.uses_liger("auto", _OnCuda(), plain, capped, kd)  # its JSD has no soft-capping
    assert not liger_loss.uses_liger("auto", _OnCuda(), biased, plain, kd)
    assert not liger_loss.uses_liger("torch", _OnCuda(), plain, plain, kd)
    assert liger_loss.uses_liger("liger", _OnCuda(), plain, plain, kd)
    assert not any(liger_loss.uses_liger(k, torch.zeros(1), plain, plain, kd) for k in liger_loss.LOSS_KERNELS)


def test_liger_where_it_cannot_run_is_a_one_line_error_before_training(monkeypatch):
    from adaptprune.config import ConfigError
    from trainers import liger_loss

    monkeypatch.setattr(liger_loss, "liger_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'adaptprune\[liger\]'"):
        get_trainer("full")(hf_model("llama", 0), cpu_accelerator(), train_cfg(loss_kernel="liger"))
    monkeypatch.setattr(liger_loss, "liger_installed", lambda: True)
    with pytest.raises(ConfigError, match="needs a CUDA device, the run is on cpu"):
        liger_loss.check_loss_kernel("liger", torch.device("cpu"))
    liger_loss.check_loss_kernel("auto", torch.device("cpu"))  # auto falls back to the torch chunks
    with pytest.raises(ConfigError, match="loss_kernel"):
        train_cfg(loss_kernel="triton")


@pytest.mark.gpu
@pytest.mark.parametrize(("kd_weight", "temperature"), CASES)
def test_liger_kernels_equal_the_torch_chunks_on_cuda(kd_weight, temperature):
    """Liger's fused linear JSD (β = 0, times T²) and cross-entropy against ``_FusedHeadLoss``, fp32 on CUDA."""
    pytest.importorskip("liger_kernel")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(300, 64, generator=gen).cuda().requires_grad_()
    weight = (torch.randn(1000, 64, generator=gen) / 8).cuda().requires_grad_()
    t_hidden, t_weight = torch.randn(300, 64, generator=gen).cuda(), (torch.randn(1000, 64, generator=gen) / 8).cuda()
    targets = torch.randint(0, 1000, (300,), generator=gen).cuda()
    targets[::7] = IGNORE_INDEX
    results = []
    for kernel in ("torch", "liger"):
        spec = HeadLoss(chunk_tokens=64, kd_weight=kd_weight, temperature=temperature, kernel=kernel)
        loss = fused_head_loss(
            hidden, LMHead(weight, None, None), targets, spec, t_hidden, LMHead(t_weight, None, None)
        )
        results.append((loss.detach(), *torch.autograd.grad(loss, (hidden, weight))))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
