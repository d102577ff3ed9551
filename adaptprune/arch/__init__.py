"""Architecture adapters, one per model family, and the registry that picks one for a model."""

from __future__ import annotations

import importlib
import pkgutil

from transformers import AutoConfig, AutoModelForCausalLM

from .base import (
    ADAPTERS,
    ATTENTION,
    CHECKPOINT_CLASSES,
    MLP,
    UNIT_KINDS,
    ArchAdapter,
    Coupling,
    LayerShape,
    UnsupportedArchitectureError,
    register_adapter,
    register_checkpoint_class,
)
from .stream import NORM, READ, WRITE, HiddenCoupling, StreamLayout

# Every module here is imported, so each @register_adapter class is known: a new family is its
# adapter file (plus the heterogeneous checkpoint class it names, which travels with checkpoints).
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .hetero_sliced_llama import AdaptSlicedLlamaForCausalLM  # noqa: E402

# The SliceGPT baseline's format; its file travels with checkpoints, so it registers here, importing nothing of ours.
register_checkpoint_class(AdaptSlicedLlamaForCausalLM)


def supported_families() -> list[str]:
    return [a.family for a in ADAPTERS]


def get_adapter(model_or_config) -> ArchAdapter:
    """The adapter for a model or config, or one clear error naming the supported families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    known = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ADAPTERS)
    raise UnsupportedArchitectureError(f"model type '{model_type}' is not supported; supported families: {known}")


def register_auto_classes() -> None:
    """Let ``AutoModelForCausalLM.from_pretrained`` load our heterogeneous checkpoints."""
    for adapter in ADAPTERS:
        config_cls, model_cls = adapter.hetero_classes()
        AutoConfig.register(adapter.hetero_model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    for model_type, (config_cls, model_cls) in CHECKPOINT_CLASSES.items():  # e.g. the SliceGPT baseline's
        AutoConfig.register(model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


__all__ = [
    "ADAPTERS",
    "ATTENTION",
    "CHECKPOINT_CLASSES",
    "MLP",
    "NORM",
    "READ",
    "UNIT_KINDS",
    "WRITE",
    "ArchAdapter",
    "Coupling",
    "HiddenCoupling",
    "LayerShape",
    "StreamLayout",
    "UnsupportedArchitectureError",
    "get_adapter",
    "register_adapter",
    "register_auto_classes",
    "register_checkpoint_class",
    "supported_families",
]
