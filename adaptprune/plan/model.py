"""What the dry run reads off a run's model on the meta device: layer geometry, sizes, LoRA and FSDP counts.

The model itself comes from ``checkpoint.read_model_config`` and ``checkpoint.meta_model`` (no weights).
"""

from __future__ import annotations

import torch
from torch import nn

from ..allocation import LayerBudget, get_allocator, removed_params
from ..arch import ATTENTION, MLP, ArchAdapter
from ..config import LoraArgs, PruneConfig
from ..pruning.step import layer_budgets, unit_floors
from .memory import LayerGeometry


def layer_geometry(model: nn.Module, adapter: ArchAdapter) -> LayerGeometry:
    """The largest decoder layer's sizes (every layer's, for a uniform model)."""
    n_rep = adapter.heads_per_group(model.config)
    shapes = [adapter.layer_shape(model, i) for i in range(len(adapter.decoder_layers(model)))]
    groups = max(s.groups for s in shapes)
    return LayerGeometry(
        hidden=int(model.config.hidden_size),
        heads=groups * n_rep,
        kv_heads=groups,
        head_dim=adapter.head_dim(model.config),
        intermediate=max(s.neurons for s in shapes),
    )


def largest_layer_params(model: nn.Module, adapter: ArchAdapter) -> int:
    """Parameters of the largest decoder layer."""
    return max(sum(p.numel() for p in layer.parameters()) for layer in adapter.decoder_layers(model))


def fsdp_gathered_params(model: nn.Module, adapter: ArchAdapter) -> int:
    """Parameters FSDP holds unsharded at once: the root unit (outside the layers) and two layers."""
    layers = adapter.decoder_layers(model)
    unique = {id(p): p.numel() for p in model.parameters()}
    inside = {id(p) for layer in layers for p in layer.parameters()}
    root = sum(n for key, n in unique.items() if key not in inside)
    return root + 2 * largest_layer_params(model, adapter)


def bias_slots(model: nn.Module, adapter: ArchAdapter) -> int:
    """Parameters mean compensation adds: a bias on every o/down projection that lacks one."""
    added = 0
    for layer in adapter.decoder_layers(model):
        for path in (adapter.attention_output, adapter.mlp_output):
            linear = layer.get_submodule(path)
            added += linear.out_features if linear.bias is None else 0
    return added


def uniform_sizes(model: nn.Module, adapter: ArchAdapter, prune: PruneConfig, target: int) -> tuple[list[dict], int]:
    """Per-layer KV groups and MLP neurons that ``uniform`` allocation keeps at ``target``.

    The real allocator on neutral inputs: zero scores and influence (nothing is calibrated here).
    With equal scores a layer removes neurons before KV groups (ties go to the finer unit), so only
    a layer whose neurons reach their floor loses groups; calibrated scores may cut groups earlier.
    The target counts the output biases mean compensation adds, as ``prune_step`` does. Returns
    (one row per layer, the parameter count after the plan: at most ``target``, less than one unit below).
    """
    budgets: list[LayerBudget] = layer_budgets(model, adapter, *unit_floors(prune))
    scores = [{ATTENTION: torch.zeros(b.groups), MLP: torch.zeros(b.neurons)} for b in budgets]
    start = sum({id(p): p.numel() for p in model.parameters()}.values())
    start += bias_slots(model, adapter) if prune.mean_compensation else 0
    plan = get_allocator("uniform").plan(
        budgets, scores, torch.zeros(len(budgets)), start - target, neuron_multiple=prune.neuron_multiple
    )
    removed = removed_params(budgets, plan)
    rows = []
    for i, b in enumerate(budgets):
        kept = plan.get(i, {})
        groups = len(kept.get(ATTENTION, range(b.groups)))
        neurons = len(kept.get(MLP, range(b.neurons)))
        params = b.prunable_params - (b.groups - groups) * b.params_per_group
        params -= (b.neurons - neurons) * b.params_per_neuron
        rows.append(
            {
                "layer": i,
                "kv_groups": groups,
                "of_groups": b.groups,
                "neurons": neurons,
                "of_neurons": b.neurons,
                "prunable_params": params,
            }
        )
    return rows, start - removed


def lora_params(model: nn.Module, adapter: ArchAdapter, lora: LoraArgs) -> int:
    """LoRA adapter parameters, r·(in + out) on each targeted linear of the decoder layers.

    No ``train.lora.target_modules`` means peft's all-linear: every linear inside the layers.
    """
    names = set(lora.target_modules)
    total = 0
    for layer in adapter.decoder_layers(model):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and (not names or name.rsplit(".", 1)[-1] in names):
                total += lora.r * (module.in_features + module.out_features)
    return total
