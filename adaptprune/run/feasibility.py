"""Whether a run's target can be reached, decided from its config and the model's config.json alone.

The model is built on the meta device (shapes, no weights), so a target below what the floors allow
fails in about a second with one line that names the smallest reachable count and the settings that
lower it, before any weights load, text is read or perplexity is measured (issue #34). What bounds
the size from below:

- the parameters outside the decoder layers (embeddings, final norm): never pruned unless
  ``hidden`` is in ``prune.dims`` (which narrows them);
- the unit floors ``prune.min_groups`` / ``prune.min_neurons`` (a kind missing from ``prune.dims``
  keeps every unit), kept neurons on multiples of ``prune.neuron_multiple``, and the ``adaptive`` /
  ``accumulating`` allocators' cap of 99% of a layer (``pruning.step.smallest_reachable``);
- with ``layers`` / ``hidden`` in ``prune.dims``: ``prune.min_layers`` and ``prune.min_hidden`` on
  multiples of ``prune.hidden_multiple``, counted by cutting the meta model to that shape
  (``shape.target.shape_params``);
- the o/down bias slots mean or layer compensation adds, which count towards the target.

The allocators keep their own check (``allocation.InfeasibleTargetError``); this one only makes it
fire before any work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from ..allocation import neuron_chunk_sizes, parse_target
from ..arch import ArchAdapter, get_adapter
from ..checkpoint import meta_model, read_model_config
from ..config import ConfigError, PruneConfig, RunConfig
from ..pruning.shape.choice import candidate_shapes, searches
from ..pruning.shape.target import ModelShape, ShapeWalk, current_shape, plan_walk, shape_params
from ..pruning.shape.trial import layer_compensation_applies
from ..pruning.step import smallest_reachable
from ..pruning.surgery import count_parameters


@dataclass(frozen=True)
class Sizing:
    """What a run's config means in parameters: the dense count, the final target, and the shapes."""

    original: int
    target: int
    walk: ShapeWalk | None = None  # prune.target_shape: the shape of every stage
    candidates: list[ModelShape] | None = None  # prune.target_shape=search: the shapes to probe


def size_run(cfg: RunConfig, model: nn.Module | None = None, adapter: ArchAdapter | None = None) -> Sizing:
    """The run's sizes from ``model`` (default: built on the meta device from the config); ``ConfigError``
    when the target cannot be reached."""
    if model is None:
        model, adapter = meta_model(read_model_config(cfg.model)[0])
    adapter = adapter or get_adapter(model)
    original = count_parameters(model)
    if searches(cfg.prune):
        target = validated_target(model, adapter, cfg, original)
        return Sizing(original, target, candidates=candidate_shapes(model, cfg.prune, target, adapter))
    walk = plan_walk(model, cfg.prune, adapter)
    if walk is not None:
        return Sizing(original, walk.final, walk=walk)
    return Sizing(original, validated_target(model, adapter, cfg, original))


def validated_target(model: nn.Module, adapter: ArchAdapter, cfg: RunConfig, original: int) -> int:
    """prune.target_params as a count, between the smallest size the floors allow and the model."""
    prune = cfg.prune
    try:
        target = parse_target(prune.target_params, original)
    except ValueError as err:
        raise ConfigError(f"prune.{err}") from None
    check_reachable(model, adapter, prune, target, f"prune.target_params={prune.target_params!r}")
    return target


def check_reachable(model: nn.Module, adapter: ArchAdapter, prune: PruneConfig, target: int, what: str) -> None:
    """``ConfigError`` naming the smallest reachable count and what lowers it when ``target`` is below it."""
    floor = smallest_size(model, adapter, prune)
    if target >= floor:
        return
    fixed = "" if "hidden" in prune.dims else f" ({outside_layers(model, adapter):,} of them outside the decoder "
    fixed += "layers: embeddings and norms, never pruned)" if fixed else ""
    raise ConfigError(
        f"{what} ({target:,} parameters) is below the smallest size the floors allow: {floor:,}{fixed}; "
        f"choose a target >= {floor:,}{_lowering(model, adapter, prune, floor)}"
    )


def smallest_size(model: nn.Module, adapter: ArchAdapter, prune: PruneConfig) -> int:
    """The fewest parameters ``prune`` lets a run reach from ``model`` (module docstring)."""
    if not prune.reshapes:
        return smallest_reachable(model, adapter, prune)
    source = current_shape(model, adapter)
    dims = set(prune.dims)
    floor = ModelShape(
        layers=min(prune.min_layers, source.layers) if "layers" in dims else source.layers,
        hidden=_lowest(source.hidden, prune.min_hidden, prune.hidden_multiple) if "hidden" in dims else source.hidden,
        groups=min(prune.min_groups, source.groups) if "groups" in dims else source.groups,
        neurons=_lowest(source.neurons, prune.min_neurons, prune.neuron_multiple)
        if "neurons" in dims
        else source.neurons,
    )
    biases = prune.mean_compensation or layer_compensation_applies(prune, adapter, model.config)
    return shape_params(model, floor, biases, adapter)


def _lowest(count: int, floor: int, multiple: int) -> int:
    """The smallest kept count of a dimension removed in chunks down to ``floor`` on multiples of ``multiple``."""
    return count - sum(neuron_chunk_sizes(count, floor, multiple))


def outside_layers(model: nn.Module, adapter: ArchAdapter) -> int:
    """Parameters outside the decoder layers (embeddings, LM head, final norm)."""
    inside = {id(p) for layer in adapter.decoder_layers(model) for p in layer.parameters()}
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in inside)


def relaxations(prune: PruneConfig) -> list[tuple[str, dict]]:
    """(what to write, the changed fields) for every setting that may lower the smallest size."""
    dims = list(prune.dims)
    out = [(f"add {d} to prune.dims", {"dims": [*dims, d]}) for d in PruneConfig.DIMS if d not in dims]
    lower = {"min_neurons": 0, "min_groups": 1, "neuron_multiple": 1, "min_layers": 1, "min_hidden": 1}
    lower["hidden_multiple"] = 1
    for name, value in lower.items():
        if getattr(prune, name) > value:
            out.append((f"prune.{name}={value} (now {getattr(prune, name)})", {name: value}))
    if prune.allocation in ("adaptive", "accumulating"):
        out.append(
            (f"prune.allocation=uniform ({prune.allocation} keeps 1% of every layer)", {"allocation": "uniform"})
        )
    if prune.mean_compensation:
        out.append(("prune.compensation=none (no o/down bias slots)", {"compensation": "none"}))
    return out


def _lowering(model: nn.Module, adapter: ArchAdapter, prune: PruneConfig, floor: int) -> str:
    """'; or lower it: add layers to prune.dims (-> 1,234), ...': the settings that help most, best first."""
    gains = []
    for text, change in relaxations(prune):
        try:
            relaxed = dataclasses.replace(prune, same_ratio=False, sparsity_scope="stage", **change)
        except ConfigError:
            continue
        lowered = smallest_size(model, adapter, relaxed)
        if lowered < floor:
            gains.append((lowered, text))
    if not gains:
        return "; no prune.* setting lowers it"
    return "; or lower it: " + ", ".join(f"{text} -> {count:,}" for count, text in sorted(gains)[:3])
