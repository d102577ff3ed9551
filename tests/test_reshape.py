"""Width and depth surgery beyond the family table: records, keep-list checks, the norm maths,
residual calibration statistics, hidden-channel and layer scores, and AdamW state carried across."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from adaptprune.allocation.records import DepthRecord, HiddenRecord
from adaptprune.arch import get_adapter
from adaptprune.calibration.activations import calibrate
from adaptprune.evaluation.inspection import describe, format_table
from adaptprune.importance.residual import (
    hidden_channel_scores,
    hidden_scores,
    influence_scores,
    layer_drop_losses,
    loss_increase,
    norm_gain_factor,
    relative_rms,
    top_indices,
)
from adaptprune.pruning.shape.reshape import (
    compensate_layer_removal,
    layer_mean_shifts,
    remove_hidden_channels,
    remove_layers,
)
from adaptprune.pruning.surgery import SurgeryError, apply_plan, count_parameters
from trainers.optim_state import state_by_name
from trainers.optim_state_shape import carry_reshaped_optimizer_state

from .conftest import tiny_llama
from .surgery_helpers import logits
from .trainer_utils import half_plan, toy_batches


# ---- records and keep lists ---------------------------------------------------------------------------
def test_depth_record_renames_kept_layers_and_drops_removed_ones():
    record = DepthRecord(prefix="model.layers", kept=(1, 3), before=4)
    assert record.removed == (0, 2)
    assert record.rename("model.layers.3.mlp.up_proj.weight") == "model.layers.1.mlp.up_proj.weight"
    assert record.rename("model.layers.1.input_layernorm.weight") == "model.layers.0.input_layernorm.weight"
    assert record.rename("model.layers.2.mlp.up_proj.weight") is None
    assert record.rename("model.norm.weight") == "model.norm.weight"
    hidden = HiddenRecord(kept=(0, 2), before=4, cuts=())
    assert hidden.removed == 2 and torch.equal(hidden.positions, torch.tensor([0, 2]))


@pytest.mark.parametrize(
    "channels,layers",
    [([], []), ([0, 0, 1], [0, 0]), ([-1, 3], [-1]), ([0, 64], [3])],
    ids=["empty", "duplicate", "negative", "too-big"],
)
def test_bad_keep_lists_are_refused_before_any_change(channels, layers, input_ids):
    model = tiny_llama()
    before = logits(model, input_ids)
    with pytest.raises(SurgeryError):
        remove_hidden_channels(model, channels)
    with pytest.raises(SurgeryError):
        remove_layers(model, layers)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 3)
    assert torch.equal(logits(model, input_ids), before)


def test_hidden_record_names_every_sliced_parameter_once():
    model = tiny_llama(layers=2, tie_word_embeddings=True)
    record = remove_hidden_channels(model, list(range(0, 64, 2)))
    names = dict(model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert "lm_head.weight" not in dict(record.cuts) and ("model.embed_tokens.weight", 1) in record.cuts
    assert len(record.cuts) == len(set(record.cuts)) == 1 + 1 + 2 * (5 + 2 + 2)  # embed, norm, per layer
    for name, dim in record.cuts:
        assert names[name].shape[dim] == 32, name


def test_inspect_shows_hidden_size_and_depth():
    model = tiny_llama()
    remove_hidden_channels(model, list(range(40)))
    remove_layers(model, [0, 2])
    info = describe(model)
    assert (info["hidden_size"], info["num_layers"], info["total_params"]) == (40, 2, count_parameters(model))
    assert "2 layers, hidden size 40" in format_table(info)


# ---- the norm maths -----------------------------------------------------------------------------------
def test_rms_norm_over_kept_channels_with_rescaled_gain_is_the_dense_norm_with_scaled_eps():
    """x zero outside K: RMSNorm_K with gain · sqrt(D/|K|) equals the dense RMSNorm with eps·|K|/D."""
    torch.manual_seed(0)
    keep = torch.tensor([0, 3, 4, 9, 10, 11, 20, 31])
    x = torch.zeros(2, 5, 32)
    x[..., keep] = torch.randn(2, 5, keep.numel())
    dense = LlamaRMSNorm(32, eps=1e-2 * keep.numel() / 32)  # a large eps so that its scaling matters
    pruned = LlamaRMSNorm(keep.numel(), eps=1e-2)
    with torch.no_grad():
        dense.weight.normal_()
        pruned.weight.copy_(dense.weight[keep] * math.sqrt(32 / keep.numel()))
    assert (pruned(x[..., keep]) - dense(x)[..., keep]).abs().max().item() <= 1e-6


def test_norm_gain_factor_limits():
    sq = torch.tensor([4.0, 4.0, 0.0, 0.0])
    assert norm_gain_factor(sq, torch.tensor([0, 1])) == pytest.approx(math.sqrt(4 / 2))  # removed carry nothing
    assert norm_gain_factor(torch.full((4,), 3.0), torch.tensor([1, 2])) == pytest.approx(1.0)  # average energy


# ---- scores: pure maths ---------------------------------------------------------------------------------
def test_hidden_channel_scores_by_hand():
    sq = [torch.tensor([1.0, 4.0, 0.0, 3.0]), torch.tensor([9.0, 0.0, 0.0, 3.0])]  # stream means 2 and 3
    gains = [torch.tensor([1.0, -2.0, 5.0, 1.0]), None]
    expected = torch.tensor(
        [math.sqrt(1 / 2) + math.sqrt(9 / 3), 2 * math.sqrt(4 / 2), 0.0, math.sqrt(3 / 2) + math.sqrt(3 / 3)]
    )
    assert torch.allclose(hidden_channel_scores(sq, gains), expected.double(), atol=1e-12)
    assert torch.allclose(relative_rms(torch.full((5,), 7.0)), torch.ones(5, dtype=torch.float64))
    assert top_indices(hidden_channel_scores(sq, gains), 2) == [0, 1]


def test_layer_scores_and_ranking():
    assert torch.equal(loss_increase(2.0, [2.5, 2.0, 4.0]), torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64))
    assert torch.equal(influence_scores([0.1, 0.3]), torch.tensor([0.1, 0.3], dtype=torch.float64))
    assert top_indices(torch.tensor([1.0, 3.0, 1.0, 2.0]), 3) == [0, 1, 3]  # tie 0 vs 2: the lower index stays
    with pytest.raises(ValueError):
        top_indices(torch.tensor([1.0]), 0)


# ---- calibration and model-level scores ----------------------------------------------------------------
def test_residual_statistics_match_the_captured_stream():
    model = tiny_llama()
    sequences = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(5))
    captured: list[list[torch.Tensor]] = [[] for _ in range(4)]
    layers = get_adapter(model).decoder_layers(model)
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, i=i: captured[i].append(a[0])) for i, layer in enumerate(layers)
    ]
    hooks.append(layers[-1].register_forward_hook(lambda m, a, out: captured[3].append(out)))
    try:
        calib = calibrate(model, sequences, batch_size=3, collect_residual=True, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert calib.residual is not None and len(calib.residual) == 4
    for stats, chunks in zip(calib.residual, captured, strict=True):
        h = torch.cat([c.reshape(-1, 64) for c in chunks]).double()  # (40, 64)
        assert stats.count == 40
        assert torch.allclose(stats.mean, h.mean(0), atol=1e-12) and torch.allclose(stats.sq_mean, h.square().mean(0))
    assert calibrate(model, sequences, progress=False).residual is None  # opt-in


def test_channels_that_carry_nothing_score_zero_and_go_first():
    model = tiny_llama()
    adapter = get_adapter(model)
    dead = torch.tensor([5, 17, 40])
    with torch.no_grad():  # nothing ever writes channels 5, 17, 40
        for c in adapter.hidden_couplings(model):
            if c.role == "write":
                model.get_submodule(c.path).weight.index_fill_(c.dim, dead, 0.0)
    calib = calibrate(model, torch.randint(0, 128, (4, 10)), collect_residual=True, progress=False)
    scores = hidden_scores(model, calib)
    assert torch.equal(scores[dead], torch.zeros(3, dtype=torch.float64)) and bool(
        (scores.sum() - scores[dead].sum()) > 0
    )
    assert not set(top_indices(scores, 61)) & set(dead.tolist())


def test_bypass_loss_equals_removal_loss_and_zero_layers_cost_nothing():
    model = tiny_llama()
    sequences = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for path in ("self_attn.o_proj", "mlp.down_proj"):
            model.model.layers[2].get_submodule(path).weight.zero_()
    base, dropped = layer_drop_losses(model, sequences, batch_size=2)
    assert dropped[2] == base and all(d != base for d in dropped[:2])
    remove_layers(model, [0, 2])
    with torch.no_grad():
        loss = sum(model(input_ids=b, labels=b).loss.item() for b in sequences.split(2)) / 2
    assert abs(loss - dropped[1]) <= 1e-6


def test_mean_compensation_restores_the_stream_mean_at_the_next_kept_layer():
    model = tiny_llama(layers=4)
    sequences = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(3))
    dense = calibrate(model, sequences, collect_residual=True, progress=False).residual
    shifts = layer_mean_shifts([s.mean for s in dense])
    assert compensate_layer_removal(model, [0, 3], shifts) == []  # layers 1 and 2 go into layer 0's down bias
    remove_layers(model, [0, 3])
    pruned = calibrate(model, sequences, collect_residual=True, progress=False).residual
    assert torch.allclose(pruned[1].mean, dense[3].mean, atol=1e-5)  # old layer 3's input, in the mean
    assert not torch.allclose(pruned[1].sq_mean, dense[3].sq_mean, atol=1e-3)  # only the first moment
    assert model.model.layers[0].mlp.down_proj.bias is not None and model.config.adaptprune_output_bias
    assert compensate_layer_removal(tiny_llama(), [1, 2], shifts) == [0]  # nothing writes before layer 0


# ---- AdamW state across width and depth surgery --------------------------------------------------------
def _trained(model, steps: int = 2) -> torch.optim.AdamW:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = toy_batches()
    for _ in range(steps):
        batch = next(batches)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_carried_adamw_state_is_the_old_state_sliced_and_renamed(tied):
    """Units, then hidden channels, then a layer go; every moment follows its weight exactly."""
    model = tiny_llama(tie_word_embeddings=tied).train()
    optimizer = _trained(model)
    old = {n: {k: v.clone() for k, v in s.items()} for n, s in state_by_name(optimizer, model).items()}
    # the same steps, but moments that are the weights themselves: carried, they must equal the new weights
    marked = {n: {**old[n], "exp_avg": p.detach().clone()} for n, p in model.named_parameters()}
    keep_hidden = [c for c in range(64) if c % 4 != 1]
    records = [
        *apply_plan(model, half_plan(model)),
        remove_hidden_channels(model, keep_hidden),
        remove_layers(model, [0, 2]),
    ]
    new_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for state in (old, marked):
        report = carry_reshaped_optimizer_state(state, records, new_optimizer, model)
        assert not report.unmatched and not report.fresh
    carried = state_by_name(new_optimizer, model)
    assert carried.keys() == dict(model.named_parameters()).keys()
    for name, param in model.named_parameters():  # the marked moments were the weights themselves
        assert torch.equal(carried[name]["exp_avg"], param.detach()), name
        assert torch.equal(carried[name]["step"], old[name]["step"])
    carry_reshaped_optimizer_state(old, records, new_optimizer, model)  # the real moments, checked by hand
    carried, keep = state_by_name(new_optimizer, model), torch.tensor(keep_hidden)
    want = old["model.layers.2.self_attn.q_proj.weight"]["exp_avg_sq"].index_select(1, keep)
    assert torch.equal(carried["model.layers.1.self_attn.q_proj.weight"]["exp_avg_sq"], want)
    want = old["model.layers.2.mlp.down_proj.weight"]["exp_avg"][:, 1::2].index_select(0, keep)  # odd neurons kept
    assert torch.equal(carried["model.layers.1.mlp.down_proj.weight"]["exp_avg"], want)
    batch = next(toy_batches(seed=3))
    model(input_ids=batch, labels=batch).loss.backward()
    new_optimizer.step()  # and training goes on with the carried state
    assert all(s["step"].item() == 3 for s in state_by_name(new_optimizer, model).values())
