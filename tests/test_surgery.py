"""Removing units equals masking them; removing zero-output units changes nothing."""

from __future__ import annotations

import pytest
import torch

from adaptprune.arch import ATTENTION, MLP, get_adapter
from adaptprune.pruning.surgery import SurgeryError, apply_plan, count_parameters, params_after_removing

from .conftest import tiny_llama


def _unit_channel_mask(model, layer_idx, kind, removed):
    """Bool mask over the output-side linear's input channels that belong to removed units."""
    coupling = get_adapter(model).output_coupling(model, layer_idx, kind)
    return torch.isin(coupling.unit_ids, torch.tensor(removed))


def _masked_logits(model, plan_removed, input_ids):
    """Logits with removed units' activations zeroed by hooks on the output projections."""
    adapter = get_adapter(model)
    handles = []
    for layer_idx, kinds in plan_removed.items():
        for kind, removed in kinds.items():
            mask = _unit_channel_mask(model, layer_idx, kind, removed)
            path = adapter.mlp_output if kind == MLP else adapter.attention_output
            linear = adapter.decoder_layers(model)[layer_idx].get_submodule(path)
            handles.append(linear.register_forward_pre_hook(lambda m, a, mask=mask: (a[0].masked_fill(mask, 0.0),)))
    with torch.no_grad():
        logits = model(input_ids).logits
    for h in handles:
        h.remove()
    return logits


def _plan(model, removed):
    adapter = get_adapter(model)
    plan = {}
    for layer_idx, kinds in removed.items():
        plan[layer_idx] = {
            kind: [u for u in range(adapter.count_units(model, layer_idx, kind)) if u not in gone]
            for kind, gone in kinds.items()
        }
    return plan


def _removal(model):
    groups = get_adapter(model).count_units(model, 0, ATTENTION)
    return {
        0: {MLP: [1, 5, 50, 95], ATTENTION: [0]},
        1: {MLP: list(range(0, 96, 3))},
        2: {ATTENTION: [groups - 1], MLP: [7]},
    }


def test_removing_units_equals_masking(llama_model, input_ids):
    removed = _removal(llama_model)
    masked = _masked_logits(llama_model, removed, input_ids)
    apply_plan(llama_model, _plan(llama_model, removed))
    with torch.no_grad():
        pruned = llama_model(input_ids).logits
    assert (pruned - masked).abs().max().item() <= 1e-5


def test_removing_zero_output_units_leaves_logits_unchanged(llama_model, input_ids):
    removed = _removal(llama_model)
    adapter = get_adapter(llama_model)
    with torch.no_grad():
        for layer_idx, kinds in removed.items():
            for kind, units in kinds.items():
                coupling = adapter.output_coupling(llama_model, layer_idx, kind)
                linear = adapter.decoder_layers(llama_model)[layer_idx].get_submodule(coupling.path)
                linear.weight[:, torch.isin(coupling.unit_ids, torch.tensor(units))] = 0.0
        before = llama_model(input_ids).logits
    apply_plan(llama_model, _plan(llama_model, removed))
    with torch.no_grad():
        after = llama_model(input_ids).logits
    assert (after - before).abs().max().item() <= 1e-5


def test_layers_end_with_different_sizes_and_exact_parameter_count(input_ids):
    model = tiny_llama(num_heads=6, num_kv_heads=2)
    adapter = get_adapter(model)
    before = count_parameters(model)
    per_neuron = adapter.params_per_unit(model, 1, MLP)
    per_group = adapter.params_per_unit(model, 0, ATTENTION)
    assert per_neuron == 3 * 96
    assert per_group == (3 * 16 + 16 + 16) * 96 + 3 * 16 * 96
    apply_plan(model, {0: {ATTENTION: [1]}, 1: {MLP: list(range(40))}})
    assert count_parameters(model) == before - per_group - 56 * per_neuron
    shapes = [adapter.layer_shape(model, i) for i in range(3)]
    assert [(s.groups, s.neurons) for s in shapes] == [(1, 96), (2, 40), (2, 96)]
    assert model.config.per_layer_config[0].num_attention_heads == 3
    assert model.config.per_layer_config[1].intermediate_size == 40


def test_bad_keep_lists_fail_clearly():
    model = tiny_llama()
    with pytest.raises(SurgeryError, match="every attention group"):
        apply_plan(model, {0: {ATTENTION: []}})
    with pytest.raises(SurgeryError, match=r"\[0, 96\)"):
        apply_plan(model, {0: {MLP: [0, 200]}})


def test_params_after_removing_takes_the_fraction_of_non_embedding_parameters_only():
    model = tiny_llama()
    embedding = sum(
        {id(p): p.numel() for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}.values()
    )
    total = count_parameters(model)
    assert params_after_removing(model, 0.0) == total
    assert params_after_removing(model, 1.0) == embedding
    assert params_after_removing(model, 0.25) == total - round(0.25 * (total - embedding))
