"""Calibration one decoder layer at a time: the hidden states entering a layer, cached, and run on.

A sequential pruning pass (``pruning.sequential``) rebuilds layer l from the inputs the already
pruned layers 0..l−1 give it. It needs, for every calibration mini-batch, the residual stream
entering layer l and whatever else the family's model hands its layers (rotary position
embeddings, masks, a Gemma 3 layer's local or global rotary table), then runs only layer l:

- ``LayerCalls.capture`` runs the whole model once per mini-batch with a pre-hook on every layer
  and keeps the stream entering layer 0 and each layer's other arguments. The arguments are
  references to tensors the model builds once per forward (masks and rotary tables are shared by
  its layers), so they cost one layer's worth, not L.
- ``LayerCalls.run`` applies one layer to cached hidden states, batch by batch, and returns the
  outputs: the stream entering the next layer. Two streams (before and after this step's removal)
  share one ``LayerCalls``.
- ``projection_inputs`` runs a layer only as far as one projection and returns what reached it,
  so the statistics of layer l's o or down inputs are collected without the rest of the layer.

Memory: the cached stream is tokens × hidden × the activations' bytes per stream (8,192 tokens at
Llama-3.2-3B's 3,072 in fp32: 100 MB), plus the per-forward extras of one mini-batch per batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..arch import ArchAdapter


class _Reached(Exception):
    """Raised by a pre-hook to stop a forward once the input it wanted has been seen."""


@dataclass
class _Call:
    """One mini-batch's call of one decoder layer, without its hidden states."""

    args: tuple  # positional arguments after the hidden states
    kwargs: dict  # keyword arguments, ``hidden_states`` removed


def _split_hidden(args: tuple, kwargs: dict) -> tuple[Tensor, _Call]:
    """(hidden states, the rest) of a decoder layer's call, whichever way the family passes the stream."""
    if args:
        return args[0], _Call(tuple(args[1:]), dict(kwargs))
    rest = dict(kwargs)
    return rest.pop("hidden_states"), _Call((), rest)


def _layer_output(output) -> Tensor:
    """A decoder layer returns a tensor or (hidden states, ...) depending on the family and version."""
    return output[0] if isinstance(output, tuple) else output


class LayerCalls:
    """Every decoder layer's call arguments for each calibration mini-batch, and the stream entering layer 0."""

    def __init__(self, calls: list[list[_Call]], first: list[Tensor]) -> None:
        self.calls = calls  # [layer][batch]
        self.first = first  # [batch] (B, T, H): the stream entering layer 0

    @classmethod
    @torch.no_grad()
    def capture(cls, model: nn.Module, sequences: Tensor, adapter: ArchAdapter, batch_size: int = 4) -> LayerCalls:
        """One forward per mini-batch of ``sequences`` (N, L), keeping what each layer is called with."""
        layers = adapter.decoder_layers(model)
        device = next(model.parameters()).device
        calls: list[list[_Call]] = [[] for _ in layers]
        first: list[Tensor] = []

        def keep(idx: int):
            def hook(_module, args, kwargs):
                hidden, call = _split_hidden(args, kwargs)
                calls[idx].append(call)
                if idx == 0:
                    first.append(hidden.detach().clone())
                if idx == len(layers) - 1:
                    raise _Reached  # nothing after the last layer's inputs is needed

            return hook

        handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
        was_training = model.training
        try:
            model.eval()
            for batch in torch.split(sequences, batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False, logits_to_keep=1)
                except _Reached:
                    pass
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        return cls(calls, first)

    @torch.no_grad()
    def for_text(self, model: nn.Module, sequences: Tensor, adapter: ArchAdapter, batch_size: int = 4) -> LayerCalls:
        """The calls for other text: the same call arguments where the mini-batches have the same shapes (masks
        and rotary tables depend on shapes, not tokens), so only the stream entering layer 0 is computed."""
        batches = torch.split(sequences, batch_size)
        if [tuple(b.shape) for b in batches] != [tuple(h.shape[:2]) for h in self.first]:
            return LayerCalls.capture(model, sequences, adapter, batch_size)
        first: list[Tensor] = []

        def keep(_module, args, kwargs):
            first.append(_split_hidden(args, kwargs)[0].detach().clone())
            raise _Reached

        handle = adapter.decoder_layers(model)[0].register_forward_pre_hook(keep, with_kwargs=True)
        device = next(model.parameters()).device
        try:
            for batch in batches:
                try:
                    model(input_ids=batch.to(device), use_cache=False, logits_to_keep=1)
                except _Reached:
                    pass
        finally:
            handle.remove()
        return LayerCalls(self.calls, first)

    @property
    def batches(self) -> int:
        return len(self.first)

    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.first)

    @torch.no_grad()
    def run(self, layer_idx: int, layer: nn.Module, hidden: list[Tensor]) -> list[Tensor]:
        """``layer`` (decoder layer ``layer_idx`` or a stand-in of it) applied to each batch's ``hidden``."""
        return [_layer_output(layer(h, *c.args, **c.kwargs)) for h, c in zip(hidden, self.calls[layer_idx])]

    def projection_inputs(self, layer_idx: int, layer: nn.Module, path: str, hidden: list[Tensor]) -> Iterator[Tensor]:
        """What reaches ``layer``'s submodule ``path`` for each batch of ``hidden``, (B, T, C); the forward stops there."""
        seen: list[Tensor] = []

        def hook(_module, args):
            seen.append(args[0].detach())
            raise _Reached

        handle = layer.get_submodule(path).register_forward_pre_hook(hook)
        try:
            for h, c in zip(hidden, self.calls[layer_idx]):
                with torch.no_grad():
                    try:
                        layer(h, *c.args, **c.kwargs)
                    except _Reached:
                        pass
                yield seen.pop()
        finally:
            handle.remove()
