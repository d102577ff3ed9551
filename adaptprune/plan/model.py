"""A run's model without its weights: its ``config.json``, built on the meta device.

``plan_model_config`` finds the config the way a run would (embedded name, local folder, hub id) but
never reads weights; a hub id it cannot reach falls back to the copy shipped in
``configs/models/<org>--<name>/config.json``. Only ``plan`` uses that fallback: a real run still
needs the weights from the hub or a local folder.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from ..allocation import LayerBudget, get_allocator, removed_params
from ..arch import ATTENTION, MLP, ArchAdapter, get_adapter
from ..assets import EMBEDDED_MODELS, RANDOM_MODELS, cache_root, package_dir
from ..config import ConfigError, LoraArgs, ModelConfig, PruneConfig
from ..pruning import layer_budgets, unit_floors
from .memory import LayerGeometry

SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"


def shipped_config_dir(name: str) -> Path | None:
    """``configs/models/<org>--<name>`` when it holds a ``config.json`` for hub id ``name``."""
    folder = SHIPPED_CONFIGS / name.replace("/", "--")
    return folder if (folder / "config.json").is_file() else None


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub's host accepts a connection: one quick probe instead of the hub client's retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def plan_model_config(model: ModelConfig) -> tuple[PretrainedConfig, str]:
    """(the model's HF config, where it came from), reading no weights."""
    name, remote = model.name, model.trust_remote_code
    key = name.lower()
    if key in RANDOM_MODELS:
        values = dict(RANDOM_MODELS[key])
        return AutoConfig.for_model(values.pop("model_type"), **values), f"embedded {key} (built from its config)"
    if key in EMBEDDED_MODELS:
        cached = cache_root() / "models" / key
        if (cached / "config.json").is_file():
            return AutoConfig.from_pretrained(cached), f"embedded {key} ({cached}/config.json)"
        asset = EMBEDDED_MODELS[key]  # not converted yet: the GGUF header has the config
        folder = package_dir(asset.package, asset.pip_name)
        return AutoConfig.from_pretrained(folder, gguf_file=asset.filename), f"embedded {key} (GGUF header)"
    if Path(name).is_dir():
        return AutoConfig.from_pretrained(name, trust_remote_code=remote), f"{name}/config.json"
    online = hub_reachable()
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=remote, local_files_only=not online)
        return config, f"hub {name}" if online else f"hub {name} (local cache)"
    except (OSError, ValueError) as err:
        shipped = shipped_config_dir(name)
        if shipped is None:
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"model.name={name!r}: cannot read its config.json from the hub ({why}) and no copy is shipped "
                f"as {SHIPPED_CONFIGS.name}/{name.replace('/', '--')}/config.json; name a local folder instead"
            ) from None
        shown = shipped.relative_to(SHIPPED_CONFIGS.parents[1])
        return AutoConfig.from_pretrained(shipped), f"{shown}/config.json, shipped copy (hub not reachable)"


def meta_model(config: PretrainedConfig) -> tuple[nn.Module, ArchAdapter]:
    """The family's heterogeneous class (what ``load_model`` builds) on the meta device: shapes, no memory."""
    adapter = get_adapter(config)
    adapter.check_geometry(config)
    config_cls, model_cls = adapter.hetero_classes()
    if not isinstance(config, config_cls):
        config = adapter.to_hetero_config(config)
    with torch.device("meta"):
        model = model_cls(config)
    return model, adapter


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


def fsdp_gathered_params(model: nn.Module, adapter: ArchAdapter) -> int:
    """Parameters FSDP holds unsharded at once: the root unit (outside the layers) and two layers."""
    layers = adapter.decoder_layers(model)
    unique = {id(p): p.numel() for p in model.parameters()}
    inside = {id(p) for layer in layers for p in layer.parameters()}
    root = sum(n for key, n in unique.items() if key not in inside)
    return root + 2 * max(sum(p.numel() for p in layer.parameters()) for layer in layers)


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
