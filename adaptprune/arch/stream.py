"""The residual stream and the layer stack of a model family: what hidden-size and depth pruning cut.

Every module that holds residual channels is a ``HiddenCoupling``: its path from the model root,
the dimension of its ``weight`` the channels lie on, and whether it writes into the stream, reads
from it or normalises it. Removing a channel cuts the same position in all of them, so the stream
keeps one width everywhere and the config one ``hidden_size``. Removing a layer re-indexes the
per-layer config lists (``layer_types``) and every module's ``layer_idx``. ``ArchAdapter`` inherits
this class; a family overrides what its layout needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

# roles of a module that holds residual-stream channels
WRITE = "write"  # adds into the stream: embeddings (columns), o/down/fc2/project_in rows and biases
READ = "read"  # reads the stream: q/k/v, gate/up/fc1 input columns, LM head, project_out
NORM = "norm"  # RMSNorm/LayerNorm over the stream: weight (and bias) entries


@dataclass(frozen=True)
class HiddenCoupling:
    """One module holding residual channels: ``path`` from the model root, the dimension of its
    ``weight`` the channels lie on (embedding 1, writer rows 0, reader columns 1, norm 0; a row
    cut also cuts the bias) and its ``role`` (WRITE, READ or NORM)."""

    path: str
    dim: int
    role: str


class StreamLayout(ABC):
    """Residual-stream holders, norms and per-layer config lists of one family."""

    family: ClassVar[str]
    mlp_output: ClassVar[str]  # (``ArchAdapter``) the MLP's output-side linear
    layers_path: ClassVar[str]  # the decoder-layer list from the model root, e.g. "model.layers"
    hidden_readers: ClassVar[tuple[str, ...]]  # linears reading the stream (input columns), per layer
    hidden_writers: ClassVar[tuple[str, ...]]  # linears writing the stream (output rows and bias), per layer
    hidden_norms: ClassVar[tuple[str, ...]]  # every norm over the stream width, per layer
    input_norm: ClassVar[str]  # the norm that reads a layer's input h_in
    mid_norm: ClassVar[str | None]  # the norm that reads the stream between attention and MLP
    hidden_size_attributes: ClassVar[tuple[str, ...]] = ("hidden_size",)  # module ints HF copies from the config

    @abstractmethod
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's list of decoder layers (``ArchAdapter``)."""

    @abstractmethod
    def head_dim(self, config) -> int:
        """Width of one attention head (``ArchAdapter``)."""

    @abstractmethod
    def stream_couplings(self, model: nn.Module) -> list[HiddenCoupling]:
        """Model-level holders of residual channels: embeddings, final norm, LM head, projections."""

    @abstractmethod
    def final_norm_path(self, model: nn.Module) -> str | None:
        """The norm that reads the last layer's output (None when the model has none)."""

    def hidden_couplings(self, model: nn.Module) -> list[HiddenCoupling]:
        """Every module holding residual channels. Removing a channel cuts the same position in
        all of them, so the stream keeps one width everywhere and the config one ``hidden_size``."""
        couplings = self.stream_couplings(model)
        for i in range(len(self.decoder_layers(model))):
            prefix = f"{self.layers_path}.{i}."
            couplings += [HiddenCoupling(prefix + p, 1, READ) for p in self.hidden_readers]
            couplings += [HiddenCoupling(prefix + p, 0, WRITE) for p in self.hidden_writers]
            couplings += [HiddenCoupling(prefix + p, 0, NORM) for p in self.hidden_norms]
        return couplings

    def stream_norm_paths(self, model: nn.Module) -> list[str | None]:
        """The norm reading the stream at each of its L+1 sampled points (layer inputs, final)."""
        layers = [f"{self.layers_path}.{i}.{self.input_norm}" for i in range(len(self.decoder_layers(model)))]
        return layers + [self.final_norm_path(model)]

    def norm_gain(self, norm: nn.Module) -> torch.Tensor | None:
        """The per-channel multiplier a norm applies after normalising (None: no affine weight)."""
        weight = getattr(norm, "weight", None)
        return None if weight is None else weight.detach()

    def scale_norm_gain(self, norm: nn.Module, factor: float) -> None:
        """Multiply the norm's gain (``norm_gain``) by ``factor``, in place (RMSNorm: its weight)."""
        with torch.no_grad():
            norm.weight.mul_(factor)

    def new_norm(self, norm: nn.Module, width: int) -> nn.Module:
        """An empty norm of ``norm``'s type over ``width`` channels (same eps); HF RMSNorms here."""
        eps = getattr(norm, "variance_epsilon", None)
        return type(norm)(width, eps=norm.eps if eps is None else eps)

    def new_embedding(self, embedding: nn.Embedding, width: int) -> nn.Embedding:
        """An empty embedding of ``width`` channels with the same rows and padding index."""
        if type(embedding) is not nn.Embedding:
            raise TypeError(f"{self.family}: no rule to resize a {type(embedding).__name__}")
        return nn.Embedding(embedding.num_embeddings, width, embedding.padding_idx)

    def stream_bias_path(self, config) -> str | None:
        """The linear (relative to a layer) whose bias is added straight into the stream at the
        layer's output, where a removed layer's mean contribution can go; None when a norm sits
        in between (then no bias there shifts the stream by a constant)."""
        return self.mlp_output

    def hidden_config_updates(self, config, width: int) -> dict:
        """Config attributes to set when the stream shrinks to ``width`` channels. ``head_dim`` is
        pinned: ``hidden_size // num_heads`` no longer gives it."""
        return {"head_dim": self.head_dim(config), "hidden_size": width}

    def depth_config_updates(self, config, kept_layers: list[int]) -> dict:
        """Config attributes to set when only ``kept_layers`` (old indices, ascending) remain:
        the layer count, and per-layer lists such as ``layer_types`` (sliding/full) re-indexed."""
        updates: dict = {"num_hidden_layers": len(kept_layers)}
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            updates["layer_types"] = [layer_types[i] for i in kept_layers]
        return updates

    def reindex_layers(self, model: nn.Module) -> None:
        """Point every module's ``layer_idx`` (the KV-cache slot HF attention writes) at the
        layer's current position, as a freshly built model of this depth would have it."""
        for new_idx, layer in enumerate(self.decoder_layers(model)):
            for module in layer.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_idx

    def refresh_hidden_attributes(self, model: nn.Module, old: int, width: int) -> None:
        """Set the ints HF's modules copied from ``hidden_size`` at construction to ``width``
        (unused by the forward passes here, but a reloaded model has them so)."""
        for module in model.modules():
            for attr in self.hidden_size_attributes:
                if getattr(module, attr, None) == old and isinstance(getattr(module, attr), int):
                    setattr(module, attr, width)
