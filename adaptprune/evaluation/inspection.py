"""Per-layer geometry, residual width, depth and parameter counts of a (possibly pruned) model."""

from __future__ import annotations

from torch import nn

from ..arch import get_adapter
from ..pruning.surgery import count_non_embedding_parameters, count_parameters


def describe(model: nn.Module) -> dict:
    """Layers with query heads, KV heads, MLP neurons and parameters; hidden size, depth, totals."""
    adapter = get_adapter(model)
    n_rep = adapter.heads_per_group(model.config)
    layers = []
    for idx, layer in enumerate(adapter.decoder_layers(model)):
        shape = adapter.layer_shape(model, idx)
        layers.append(
            {
                "layer": idx,
                "query_heads": shape.groups * n_rep,
                "kv_heads": shape.groups,
                "mlp_neurons": shape.neurons,
                "params": sum(p.numel() for p in layer.parameters()),
            }
        )
    return {
        "model_type": model.config.model_type,
        "family": adapter.family,
        "num_layers": len(layers),
        "hidden_size": int(model.config.hidden_size),
        "head_dim": adapter.head_dim(model.config),
        "total_params": count_parameters(model),
        "non_embedding_params": count_non_embedding_parameters(model),
        "layers": layers,
    }


def format_table(info: dict) -> str:
    """A readable text table of ``describe``'s output."""
    lines = [
        f"{info['model_type']} ({info['family']} family), {info['num_layers']} layers, "
        f"hidden size {info['hidden_size']}, head_dim {info['head_dim']}",
        f"{'layer':>5} {'q heads':>8} {'kv heads':>9} {'neurons':>8} {'params':>12}",
    ]
    for row in info["layers"]:
        lines.append(
            f"{row['layer']:>5} {row['query_heads']:>8} {row['kv_heads']:>9} {row['mlp_neurons']:>8} {row['params']:>12,}"
        )
    lines.append(f"total parameters: {info['total_params']:,}   non-embedding: {info['non_embedding_params']:,}")
    return "\n".join(lines)
