"""AdamW state across surgery (sliced exactly like the weights) and through safetensors."""

from __future__ import annotations

import torch

from adaptprune.arch import ATTENTION, MLP, get_adapter
from adaptprune.config import TrainConfig
from adaptprune.pruning.surgery import apply_plan, ensure_output_biases
from trainers import FullTrainer, load_optimizer_state, save_optimizer_state
from trainers.optim_state import surgery_cuts

from .conftest import tiny_llama
from .memory_helpers import LiveBytes
from .trainer_utils import constant_lr, cpu_accelerator, half_plan, toy_batches, train_cfg


def _trained(config: TrainConfig | None = None, steps: int = 2, **model_kw) -> FullTrainer:
    trainer = FullTrainer(tiny_llama(**model_kw), cpu_accelerator(), config or TrainConfig())
    trainer.run_phase(toy_batches(), steps, constant_lr(1e-2), 0)
    return trainer


def _snapshot(state: dict) -> dict:
    return {n: {k: v.clone() for k, v in s.items()} for n, s in state.items()}


def _expected_positions(plan, head_dim: int, n_rep: int) -> dict[str, tuple[int, torch.Tensor]]:
    """Kept rows/columns per weight, worked out from the plan and the head geometry alone."""
    expected = {}
    for layer, kinds in plan.items():
        prefix = f"model.layers.{layer}"
        if MLP in kinds:
            kept = torch.tensor(kinds[MLP])
            for name in ("gate_proj", "up_proj"):
                expected[f"{prefix}.mlp.{name}.weight"] = (0, kept)
            expected[f"{prefix}.mlp.down_proj.weight"] = (1, kept)
        if ATTENTION in kinds:
            groups = torch.tensor(kinds[ATTENTION])
            kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
            q_rows = (groups[:, None] * n_rep * head_dim + torch.arange(n_rep * head_dim)).flatten()
            expected[f"{prefix}.self_attn.q_proj.weight"] = (0, q_rows)
            expected[f"{prefix}.self_attn.k_proj.weight"] = (0, kv_rows)
            expected[f"{prefix}.self_attn.v_proj.weight"] = (0, kv_rows)
            expected[f"{prefix}.self_attn.o_proj.weight"] = (1, q_rows)
    return expected


def test_carried_adamw_state_equals_the_sliced_old_state():
    trainer = _trained(num_heads=6, num_kv_heads=2)  # GQA, 3 query heads per group
    old = _snapshot(trainer.optimizer_state_by_name())
    plain = trainer.before_surgery()
    plan = half_plan(plain)
    trainer.after_surgery(plain, apply_plan(plain, plan))
    new = trainer.optimizer_state_by_name()
    expected = _expected_positions(plan, head_dim=16, n_rep=3)
    assert new.keys() == old.keys() and len(trainer.last_carry.sliced) == len(expected)
    for name, entries in new.items():
        dim, kept = expected.get(name, (None, None))
        assert torch.equal(entries["step"], old[name]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            want = old[name][key] if dim is None else old[name][key].index_select(dim, kept)
            assert torch.equal(entries[key], want), (name, key)
            assert entries[key].data_ptr() != old[name][key].data_ptr()
    # and the carried optimizer keeps training the smaller model
    result = trainer.run_phase(toy_batches(), 1, constant_lr(1e-2), 2)
    assert torch.isfinite(torch.tensor(result.last_loss))
    assert all(s["step"].item() == 3 for s in trainer.optimizer_state_by_name().values())


def test_bias_slices_and_new_biases_start_fresh():
    """A dim-0 cut slices the bias's state too; a bias added for compensation has no state."""
    model = tiny_llama(attention_bias=True)  # q/k/v/o biases
    trainer = FullTrainer(model, cpu_accelerator())
    trainer.run_phase(toy_batches(), 1, constant_lr(1e-2), 0)
    old = _snapshot(trainer.optimizer_state_by_name())
    plain = trainer.before_surgery()
    ensure_output_biases(plain)  # new down_proj biases (o_proj already has one)
    trainer.after_surgery(plain, apply_plan(plain, half_plan(plain)))
    new = trainer.optimizer_state_by_name()
    assert get_adapter(plain).count_units(plain, 1, ATTENTION) == 1
    kept_rows = torch.arange(2 * 16)  # group 0 of 2: its 2 query heads x head_dim 16
    name = "model.layers.1.self_attn.q_proj.bias"
    assert torch.equal(new[name]["exp_avg"], old[name]["exp_avg"][kept_rows])
    name = "model.layers.1.self_attn.o_proj.bias"  # o is cut on columns: its bias is whole
    assert torch.equal(new[name]["exp_avg"], old[name]["exp_avg"])
    fresh = [f"model.layers.{i}.mlp.down_proj.bias" for i in range(3)]
    assert sorted(trainer.last_carry.fresh) == fresh and not any(n in new for n in fresh)


def test_reset_mode_starts_from_scratch():
    trainer = _trained(train_cfg(optim={"after_surgery": "reset"}))
    plain = trainer.before_surgery()
    trainer.after_surgery(plain, apply_plan(plain, half_plan(plain)))
    assert trainer.optimizer_state_by_name() == {} and trainer.last_carry is None


def test_cut_names_are_real_parameters():
    model = tiny_llama()
    records = apply_plan(model, half_plan(model))
    names = dict(model.named_parameters())
    cuts = surgery_cuts(records, model)
    weights = [n for n in cuts if n.endswith(".weight")]
    assert len(weights) == 3 + 4 + 3 + 3 and all(n in names for n in weights)


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    trainer = _trained()
    state = trainer.optimizer_state_by_name()
    path = save_optimizer_state(tmp_path / "optim.safetensors", state, extra={"global_step": 2, "stage": 1})
    loaded, extra = load_optimizer_state(path)
    assert extra == {"global_step": 2, "stage": 1} and loaded.keys() == state.keys()
    for name in state:
        assert loaded[name].keys() == state[name].keys()
        for key, value in state[name].items():
            assert loaded[name][key].dtype == value.dtype and torch.equal(loaded[name][key], value), (name, key)
    assert b"pickle" not in path.read_bytes()[:64]


def test_resume_from_saved_state_continues_identically(tmp_path):
    """Save model weights + optimizer state, rebuild, load: the next step is bit-identical."""
    trainer = _trained()
    save_optimizer_state(tmp_path / "optim.safetensors", trainer.optimizer_state_by_name())
    weights = {n: p.detach().clone() for n, p in trainer.unwrapped_model().state_dict().items()}

    model = tiny_llama(seed=9)
    model.load_state_dict(weights)
    resumed = FullTrainer(model, cpu_accelerator())
    resumed.load_optimizer_state_by_name(load_optimizer_state(tmp_path / "optim.safetensors")[0])

    batch = next(toy_batches(seed=4))
    for t in (trainer, resumed):
        t.run_phase(iter([batch]), 1, constant_lr(1e-2), 2)
    for (name, a), b in zip(
        trainer.unwrapped_model().named_parameters(), resumed.unwrapped_model().parameters(), strict=True
    ):
        assert torch.equal(a, b), name


def test_surgery_in_place_frees_the_old_moments_one_parameter_at_a_time():
    """Carrying the state through a surgery holds the old moments plus one parameter's slice at most, never the
    old and the new state side by side (the by-name state is consumed as the new one is placed)."""
    from trainers.base import adamw_for
    from trainers.optim_state import carry_optimizer_state

    peaks = {}
    for consume in (True, False):
        trainer = _trained(num_heads=6, num_kv_heads=2)
        plain = trainer.before_surgery()  # keeps the state by name and drops the optimizer
        held, trainer._held_state = trainer._held_state, None  # ``held``: the only reference left
        records = apply_plan(plain, half_plan(plain))
        optimizer = adamw_for(plain, TrainConfig().optim)
        tensors = [v for entries in held.values() for v in entries.values() if torch.is_tensor(v)]
        old_bytes = sum(t.untyped_storage().nbytes() for t in tensors)
        largest = max(sum(t.nbytes for t in entries.values()) for entries in held.values())
        mode = LiveBytes()
        mode.track(tensors)
        del tensors
        with mode:
            carry_optimizer_state(held, records, optimizer, plain, consume=consume)
        new_bytes = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        peaks[consume] = (mode.peak, old_bytes, new_bytes, largest)
    peak, old_bytes, new_bytes, largest = peaks[True]
    assert peak <= old_bytes + largest < old_bytes + new_bytes
    assert peaks[False][0] >= old_bytes + new_bytes - largest  # without consuming: both states at once
