"""Target shapes: prune to a named architecture, walking to it in the controller's ~5% steps.

A target shape fixes the final model's layers, hidden size, KV groups and MLP neurons per layer
(Sheared-LLaMA's targeted structured pruning, arXiv 2310.06694; Minitron's export config,
arXiv 2407.14679). It is given as a mapping (``layers``, ``hidden``, ``kv_groups`` or ``heads``,
``neurons``; a missing key keeps the source's value) or as a model: an embedded name, a hub id, a
model folder or a ``config.json`` file, whose *reachable projection* is taken. Reachable means the
source can be cut down to it: the same head width and query heads per KV group (whole groups are
removed, never reshaped) and no dimension larger than the source's; anything else is refused in
one line naming the dimension.

The shape decides *how much* of each dimension goes; importance still decides *which* layers,
channels, groups and neurons (``pruning.prune_step`` with ``shape=``). The parameter target follows
from the shape (``shape_params``, counted on the meta device with the surgery itself). The walk
(``shape_between``) moves every dimension by the same fraction of its way at each stage, so all
arrive together at the last stage; hidden sizes and neuron counts in between are multiples of
``prune.hidden_multiple`` / ``prune.neuron_multiple`` (a dimension whose one-stage share is smaller
than a multiple moves a whole multiple every few stages).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from ...arch import ATTENTION, MLP, ArchAdapter, get_adapter
from ...config import ConfigError

MAPPING_KEYS = ("layers", "hidden", "kv_groups", "heads", "neurons")
SEARCH = "search"  # prune.target_shape's value for a shape chosen before stage 1 (``shape_choice``)


@dataclass(frozen=True)
class ModelShape:
    """The sizes a target shape fixes: decoder layers, residual width, KV groups and MLP neurons per layer."""

    layers: int
    hidden: int
    groups: int
    neurons: int

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self, heads_per_group: int) -> str:
        return (
            f"{self.layers} layers, hidden {self.hidden}, {self.groups} KV groups x {heads_per_group} heads, "
            f"{self.neurons} MLP neurons per layer"
        )


def current_shape(model: nn.Module, adapter: ArchAdapter | None = None) -> ModelShape:
    """The model's shape; per-layer groups and neurons as their (rounded) mean over layers."""
    adapter = adapter or get_adapter(model)
    shapes = [adapter.layer_shape(model, i) for i in range(len(adapter.decoder_layers(model)))]
    return ModelShape(
        layers=len(shapes),
        hidden=int(model.config.hidden_size),
        groups=round(sum(s.groups for s in shapes) / len(shapes)),
        neurons=round(sum(s.neurons for s in shapes) / len(shapes)),
    )


# ---- parsing and reachability ------------------------------------------------------------------
def resolve_target_shape(spec: str | dict, model: nn.Module, adapter: ArchAdapter | None = None) -> ModelShape:
    """``prune.target_shape`` as a ``ModelShape`` reachable from ``model``; ``ConfigError`` otherwise."""
    adapter = adapter or get_adapter(model)
    source = current_shape(model, adapter)
    per_group, head_dim = adapter.heads_per_group(model.config), adapter.head_dim(model.config)
    if isinstance(spec, dict):
        shape = _from_mapping(spec, source, per_group)
    else:
        shape = _from_config(_target_config(str(spec)), per_group, head_dim, str(spec))
    _check_reachable(shape, source)
    return shape


def _from_mapping(spec: dict, source: ModelShape, per_group: int) -> ModelShape:
    unknown = sorted(set(spec) - set(MAPPING_KEYS))
    if unknown:
        raise ConfigError(f"prune.target_shape: unknown keys {unknown}; use {', '.join(MAPPING_KEYS)}")
    values = {}
    for key in MAPPING_KEYS:
        if key in spec and (isinstance(spec[key], bool) or not isinstance(spec[key], int) or spec[key] < 1):
            raise ConfigError(f"prune.target_shape.{key} must be a positive integer, got {spec[key]!r}")
    if "heads" in spec and "kv_groups" in spec and spec["heads"] != spec["kv_groups"] * per_group:
        raise ConfigError(
            f"prune.target_shape: heads={spec['heads']} and kv_groups={spec['kv_groups']} disagree: this model has "
            f"{per_group} query heads per KV group"
        )
    groups = spec.get("kv_groups", source.groups)
    if "heads" in spec:
        if spec["heads"] % per_group:
            raise ConfigError(
                f"prune.target_shape.heads={spec['heads']} is unreachable: whole KV groups of {per_group} query "
                f"heads are removed, so heads must be a multiple of {per_group}"
            )
        groups = spec["heads"] // per_group
    values = {
        "layers": spec.get("layers", source.layers),
        "hidden": spec.get("hidden", source.hidden),
        "groups": groups,
        "neurons": spec.get("neurons", source.neurons),
    }
    return ModelShape(**values)


def _target_config(name: str):
    """The target model's HF config from a config.json file, a folder, an embedded name or a hub id."""
    from transformers import AutoConfig

    from ...checkpoint import read_model_config
    from ...config import ModelConfig

    path = Path(name)
    if path.is_file():
        if path.name != "config.json":
            raise ConfigError(f"prune.target_shape={name!r}: a file must be a model's config.json")
        return AutoConfig.from_pretrained(path.parent)
    return read_model_config(ModelConfig(name=name))[0]


def _from_config(config, per_group: int, head_dim: int, name: str) -> ModelShape:
    """The reachable projection of a target model's config (its head width and grouping must match)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    width = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    if width != head_dim:
        raise ConfigError(
            f"prune.target_shape={name!r}: head_dim {width} is unreachable from this model's head_dim {head_dim} "
            "(heads are removed whole, never narrowed); give a mapping with layers/hidden/kv_groups/neurons instead"
        )
    if heads != kv * per_group:
        raise ConfigError(
            f"prune.target_shape={name!r}: heads {heads} in {kv} KV groups ({heads / kv:g} per group) are "
            f"unreachable: this model has {per_group} query heads per KV group"
        )
    neurons = getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None)
    return ModelShape(int(text.num_hidden_layers), int(text.hidden_size), kv, int(neurons))


def _check_reachable(shape: ModelShape, source: ModelShape) -> None:
    names = {"layers": "layers", "hidden": "hidden", "groups": "kv_groups", "neurons": "neurons"}
    for field, key in names.items():
        want, have = getattr(shape, field), getattr(source, field)
        if want > have:
            raise ConfigError(
                f"prune.target_shape: {key} {want} is unreachable: the model has {have} (pruning only removes)"
            )
        if want < 1:
            raise ConfigError(f"prune.target_shape: {key} must be at least 1, got {want}")


# ---- the walk --------------------------------------------------------------------------------------
def shape_between(
    source: ModelShape, target: ModelShape, fraction: float, hidden_multiple: int = 1, neuron_multiple: int = 1
) -> ModelShape:
    """The shape ``fraction`` of the way from ``source`` to ``target`` (1: exactly ``target``).

    Every dimension moves by the same fraction of its own distance, rounded to the nearest multiple
    (hidden and neurons; never past the target or above the source), layers and groups to integers.
    """
    if fraction >= 1.0:
        return target

    def at(a: int, b: int, multiple: int = 1) -> int:
        value = a - fraction * (a - b)
        stepped = multiple * round(value / multiple)
        return min(a, max(b, stepped))

    return ModelShape(
        layers=at(source.layers, target.layers),
        hidden=at(source.hidden, target.hidden, hidden_multiple),
        groups=at(source.groups, target.groups),
        neurons=at(source.neurons, target.neurons, neuron_multiple),
    )


def walk_fraction(original: int, final: int, stage_target: int) -> float:
    """How far a stage's parameter target lies along the run: 0 at the dense model, 1 at the final size."""
    return 1.0 if original <= final else min(1.0, max(0.0, (original - stage_target) / (original - final)))


# ---- the size of a shape ---------------------------------------------------------------------------
def shape_params(model: nn.Module, shape: ModelShape, with_output_biases: bool, adapter: ArchAdapter | None = None):
    """Parameters of ``model`` cut to ``shape`` (uniform layers), counted by running the surgery on the meta device.

    ``with_output_biases``: mean compensation's o/down bias slots count, as they do in a run.
    """
    from ...checkpoint import meta_model
    from ..surgery import apply_plan, count_parameters, ensure_output_biases
    from .reshape import remove_hidden_channels, remove_layers

    meta, adapter = meta_model(copy.deepcopy(model.config))  # the surgery edits its config: never the model's
    if with_output_biases:
        ensure_output_biases(meta, adapter)
    if shape.layers < len(adapter.decoder_layers(meta)):
        remove_layers(meta, list(range(shape.layers)), adapter)
    if shape.hidden < int(meta.config.hidden_size):
        remove_hidden_channels(meta, list(range(shape.hidden)), adapter)
    plan = {}
    for i in range(shape.layers):
        sizes = adapter.layer_shape(meta, i)
        plan[i] = {
            ATTENTION: list(range(min(shape.groups, sizes.groups))),
            MLP: list(range(min(shape.neurons, sizes.neurons))),
        }
    apply_plan(meta, plan, adapter)
    return count_parameters(meta)


@dataclass(frozen=True)
class ShapeWalk:
    """A run's way from the dense shape to the target: the shape of every stage, from its parameter target."""

    source: ModelShape
    target: ModelShape
    original: int  # parameters of the dense model
    final: int  # parameters of the target shape (the run's target)
    hidden_multiple: int = 1
    neuron_multiple: int = 1

    def at(self, stage_target: int) -> ModelShape:
        fraction = walk_fraction(self.original, self.final, stage_target)
        return shape_between(self.source, self.target, fraction, self.hidden_multiple, self.neuron_multiple)


def with_bias_slots(prune, source: ModelShape, target: ModelShape) -> bool:
    """Whether a cut to ``target`` adds the o/down bias slots mean or layer compensation writes into."""
    return prune.mean_compensation or (prune.layer_compensation and target.layers < source.layers)


def plan_walk(
    model: nn.Module, prune, adapter: ArchAdapter | None = None, searched: ModelShape | None = None
) -> ShapeWalk | None:
    """The walk ``prune.target_shape`` asks for (None without one), sized on the meta device.

    ``searched``: the shape ``prune.target_shape: search`` chose (``shape_choice``); without it such a
    config is refused, since only a job with training text can search."""
    if prune.target_shape is None:
        return None
    adapter = adapter or get_adapter(model)
    source = current_shape(model, adapter)
    if searched is None and prune.target_shape == SEARCH:
        raise ConfigError(
            "prune.target_shape=search chooses the shape on a run's training text: use it with a training job "
            "(train_prune.py, adaptprune train, compare's training rows) or adaptprune prune"
        )
    target = searched or resolve_target_shape(prune.target_shape, model, adapter)
    if target.neurons % prune.neuron_multiple and target.neurons != source.neurons:
        raise ConfigError(
            f"prune.target_shape: neurons {target.neurons} is not a multiple of prune.neuron_multiple="
            f"{prune.neuron_multiple}; set one that divides it"
        )
    biases = with_bias_slots(prune, source, target)
    from ..surgery import count_parameters

    return ShapeWalk(
        source,
        target,
        original=count_parameters(model),
        final=shape_params(model, target, biases, adapter),
        hidden_multiple=prune.hidden_multiple,
        neuron_multiple=prune.neuron_multiple,
    )
