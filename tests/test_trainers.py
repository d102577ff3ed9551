"""Training phases: loss falls for full / LoRA / distillation, NaN stops before the step,
LoRA merges exactly before surgery, and two DDP ranks end with identical weights."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn

from adaptprune.pruning.surgery import apply_plan
from trainers import (
    DistillTrainer,
    FullTrainer,
    LoraTrainer,
    NonFiniteLossError,
    get_trainer,
)

from .conftest import tiny_llama
from .trainer_utils import constant_lr, cpu_accelerator, half_plan, toy_batches, train_cfg

REPO = Path(__file__).resolve().parents[1]


def _losses(trainer, steps: int, lr: float, seed: int = 0) -> list[float]:
    seen = []
    trainer.run_phase(toy_batches(seed), steps, constant_lr(lr), 0, lambda m: seen.append(m["loss"]))
    return seen


def test_registry():
    assert get_trainer("full") is FullTrainer
    assert get_trainer("lora") is LoraTrainer
    assert get_trainer("distill") is DistillTrainer
    with pytest.raises(ValueError, match="unknown trainer 'ful'"):
        get_trainer("ful")
    with pytest.raises(ValueError, match="after_surgery"):
        train_cfg(optim={"after_surgery": "keep"})


def test_full_loss_decreases():
    trainer = FullTrainer(tiny_llama(), cpu_accelerator(), train_cfg())
    metrics = []
    result = trainer.run_phase(toy_batches(), 25, constant_lr(1e-2), 10, metrics.append)
    losses = [m["loss"] for m in metrics]
    assert result.global_step == 35 and result.steps == 25 and result.tokens == 25 * 4 * 16
    assert [m["step"] for m in metrics] == list(range(11, 36))
    assert all(m["tokens_per_s"] > 0 and m["lr"] == 1e-2 for m in metrics)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses


def test_grad_accumulation_matches_one_big_batch():
    """Two micro-batches of 2 give the gradient of one batch of 4 (seen through Adam's first moment;
    the first Adam step itself is ~lr * sign(g), too sensitive to compare)."""
    big = FullTrainer(tiny_llama(), cpu_accelerator(), train_cfg())
    small = FullTrainer(tiny_llama(), cpu_accelerator(), train_cfg(grad_accum_steps=2))
    batch = next(toy_batches(batch=4))
    big.run_phase(iter([batch]), 1, constant_lr(1e-2), 0)
    small.run_phase(iter([batch[:2], batch[2:]]), 1, constant_lr(1e-2), 0)
    big_state, small_state = big.optimizer_state_by_name(), small.optimizer_state_by_name()
    assert big_state.keys() == small_state.keys()
    for name in big_state:
        torch.testing.assert_close(big_state[name]["exp_avg"], small_state[name]["exp_avg"], atol=1e-7, rtol=1e-4)


def test_lora_loss_decreases_and_trains_only_adapters():
    # With the default 0.02 init the frozen head + final norm cap the logits near uniform, so
    # no adapter could fit the corpus; a wider init stands in for a pretrained model.
    model = tiny_llama(initializer_range=0.1)
    trainer = LoraTrainer(model, cpu_accelerator(), train_cfg(lora={"r": 4, "dropout": 0.0}))
    trainable = [n for n, p in trainer.unwrapped_model().named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 3  # A and B for q/k/v/o/gate/up/down in 3 layers
    losses = _losses(trainer, 25, 1e-2)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses


def test_distill_loss_decreases_and_teacher_stays_frozen():
    teacher = tiny_llama(seed=5)
    FullTrainer(teacher, cpu_accelerator()).run_phase(toy_batches(1), 15, constant_lr(1e-2), 0)
    teacher_before = copy.deepcopy(teacher.state_dict())
    config = train_cfg(distill={"temperature": 2.0, "kd_weight": 1.0})
    trainer = DistillTrainer(tiny_llama(seed=0), cpu_accelerator(), config, teacher=teacher)
    losses = _losses(trainer, 20, 1e-2)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    assert not trainer.teacher.training
    for name, p in teacher.named_parameters():
        assert not p.requires_grad and p.grad is None
        assert torch.equal(p, teacher_before[name])


def test_distill_rejects_missing_or_shared_teacher():
    model = tiny_llama()
    with pytest.raises(ValueError, match="needs the unpruned teacher"):
        DistillTrainer(model, cpu_accelerator())
    with pytest.raises(ValueError, match="share parameters"):
        DistillTrainer(model, cpu_accelerator(), teacher=model)


def _poison_norm(trainer):
    with torch.no_grad():
        trainer.unwrapped_model().model.norm.weight.fill_(float("nan"))


def _poison_loss(trainer):
    original = trainer.compute_loss
    trainer.compute_loss = lambda model, ids: original(model, ids) * float("inf")


@pytest.mark.parametrize("poison", [_poison_norm, _poison_loss], ids=["nan-parameter", "inf-loss"])
def test_non_finite_loss_stops_before_the_optimizer_step(poison):
    trainer = FullTrainer(tiny_llama(), cpu_accelerator(), train_cfg())
    trainer.run_phase(toy_batches(), 1, constant_lr(1e-2), 0)
    poison(trainer)
    weights = {n: p.detach().clone() for n, p in trainer.unwrapped_model().named_parameters()}
    state = {n: {k: v.clone() for k, v in s.items()} for n, s in trainer.optimizer_state_by_name().items()}
    seen = []
    with pytest.raises(NonFiniteLossError) as err:
        trainer.run_phase(toy_batches(), 5, constant_lr(1e-2), 1, seen.append)
    assert err.value.global_step == 1 and err.value.what == "loss" and not seen
    for name, p in trainer.unwrapped_model().named_parameters():
        assert p.grad is None
        assert torch.equal(p, weights[name]) or name == "model.norm.weight", name
    for name, entries in trainer.optimizer_state_by_name().items():
        for key, value in entries.items():
            assert torch.equal(value, state[name][key]), (name, key)


def test_lora_merge_before_surgery_is_exact_and_pruned_model_takes_a_new_adapter():
    model = tiny_llama()
    trainer = LoraTrainer(model, cpu_accelerator(), train_cfg(lora={"r": 4}))
    peft_model = trainer.unwrapped_model()
    torch.manual_seed(7)
    with torch.no_grad():  # B starts at zero; make the adapter do something
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids = next(toy_batches(3))
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        exported = trainer.export_model()  # a merged copy; the adapter stays live
        torch.testing.assert_close(exported(input_ids=ids).logits, adapted, atol=1e-5, rtol=0)
    assert any(isinstance(m, LoraLayer) for m in trainer.unwrapped_model().modules())
    assert not any(isinstance(m, LoraLayer) for m in exported.modules())
    plain = trainer.merge_before_surgery()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert all(
        type(plain.model.layers[0].mlp.get_submodule(p)) is nn.Linear for p in ("gate_proj", "up_proj", "down_proj")
    )
    assert all(p.requires_grad for p in plain.parameters())
    with torch.no_grad():
        merged = plain(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)

    records = apply_plan(plain, half_plan(plain))
    trainer.after_surgery(plain, records)
    before = {n: p.detach().clone() for n, p in trainer.unwrapped_model().named_parameters() if p.requires_grad}
    assert before and all("lora_" in n for n in before)
    result = trainer.run_phase(toy_batches(), 1, constant_lr(1e-2), 0)
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.last_loss))
    after = dict(trainer.unwrapped_model().named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in before.items())
    assert trainer.unwrapped_model().base_model.model.model.layers[0].mlp.up_proj.base_layer.out_features == 48


def _torchrun(script: str, out: Path) -> None:
    """Run ``tests/script`` on two gloo CPU ranks (it writes its results under ``out``)."""
    env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(REPO / "tests" / script), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_fsdp2_surgery_keeps_moments_sharded_and_the_teacher_sharded(tmp_path):
    """accelerate's FSDP2 on 2 gloo ranks (``fsdp_surgery_script.py``): the moments re-sharded one parameter
    at a time equal the full state sliced the DDP way; the surgery's extra peak per rank stays under the
    plan's figure and under what gathering the full moments beside the weights would take; the distillation
    teacher holds half its parameters per rank and gives the unsharded models' loss."""
    from adaptprune.plan.memory import StageSizes, transition_bytes

    _torchrun("fsdp_surgery_script.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["moments_equal"] and rank["sliced"] == 13 and rank["copied"] == 17
        assert rank["teacher_local"] == rank["teacher_params"] // 2
        p, w = rank["params_before"], 4
        sizes = StageSizes(rank["params_after"], rank["params_after"], p, True, 0, 0, layer=rank["largest_layer"])
        assert rank["surgery_peak_bytes"] + rank["moment_shard_bytes"] <= transition_bytes(sizes, w, "fsdp", 2)
        assert rank["surgery_peak_bytes"] < p * w + 2 * p * w  # the full weights and full moments at once
    assert ranks[0]["losses"] == ranks[1]["losses"]
    expected_first = (ranks[0]["first_loss_unsharded"] + ranks[1]["first_loss_unsharded"]) / 2
    assert ranks[0]["losses"][0] == pytest.approx(expected_first, rel=1e-5)


def test_two_cpu_processes_end_with_identical_weights(tmp_path):
    """torchrun, 2 gloo ranks, different data per rank: DDP keeps the replicas equal,
    through a surgery and a re-prepare."""
    _torchrun("ddp_train_script.py", tmp_path)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["distributed_type"] == "MULTI_CPU" and r["num_processes"] == 2 for r in reports)
    assert reports[0]["losses"] == reports[1]["losses"]  # logged losses are rank means
    assert reports[0]["carried"] == 30  # every parameter's AdamW state survived the re-prepare
    weights = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    initial = tiny_llama().state_dict()
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    assert weights[0]["model.layers.0.mlp.up_proj.weight"].shape[0] == 48
    assert not torch.equal(weights[0]["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide precision; tests that change it reset it afterwards."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_gradient_checkpointing_gives_the_same_losses():
    plain = FullTrainer(tiny_llama(), cpu_accelerator(), train_cfg())
    ckpt = FullTrainer(tiny_llama(), cpu_accelerator(), train_cfg(gradient_checkpointing=True))
    assert (
        ckpt.unwrapped_model().is_activation_checkpointing and not plain.unwrapped_model().is_activation_checkpointing
    )
    assert _losses(ckpt, 6, 1e-2) == pytest.approx(_losses(plain, 6, 1e-2), rel=1e-5, abs=1e-6)
    ckpt.after_surgery(ckpt.before_surgery())  # surgery builds new modules: the flag must come back
    assert ckpt.unwrapped_model().is_activation_checkpointing


def test_bf16_autocast_trains_with_fp32_master_weights(fresh_accelerate_state):
    from accelerate import Accelerator

    trainer = FullTrainer(tiny_llama(), Accelerator(cpu=True, mixed_precision="bf16"), train_cfg())
    losses = _losses(trainer, 15, 1e-2)
    assert all(map(math.isfinite, losses)) and sum(losses[-3:]) / 3 < losses[0]
    assert all(p.dtype == torch.float32 for p in trainer.unwrapped_model().parameters())
    with trainer.accelerator.autocast():
        logits = trainer.model(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits
    assert trainer.accelerator.mixed_precision == "bf16" and logits.dtype == torch.float32  # upcast by the wrapper


def test_adamw_has_no_model_sized_step_temporary():
    """Fused on CUDA (updates in place), the single-tensor loop elsewhere; never foreach's all-at-once sqrt(v̂)."""
    from trainers.base import adamw_for

    model = tiny_llama()
    cpu = adamw_for(model, train_cfg().optim, "cpu")
    assert cpu.defaults["foreach"] is False and not cpu.defaults["fused"]
    cuda = adamw_for(model, train_cfg().optim, "cuda")
    assert cuda.defaults["fused"] is True and not cuda.defaults["foreach"]
