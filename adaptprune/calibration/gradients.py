"""First-order Taylor terms per structural unit, from gradients of the LM loss.

For a unit u (an MLP neuron or a KV group) with coupled weights W_u (rows of gate/up or q/k/v,
columns of down or o; ``ArchAdapter.couplings``) and g = ∂L/∂W, where L is the mean token loss
over the Taylor sequences, two sums are kept per unit:

- **signed group term** t_u = Σ_{w ∈ W_u} w·g: the first-order change of L when the whole unit
  is zeroed at once (Molchanov et al. 2019's group Taylor term, there squared). The ``taylor``
  metric scores |t_u|. Terms of opposite sign cancel across the unit's rows and columns before
  the absolute value, so it is neither of LLM-Pruner's scores: its *vector-wise* score takes
  |Σ w·g| per row or column and sums those, its *element-wise* score takes Σ |w·g|.
- **element-wise term** e_u = Σ_{w ∈ W_u} |w·g| (``elementwise``): LLM-Pruner's element¹
  (arXiv 2305.11627 Eq. 4, its code's ``--taylor param_first``), the score Adapt-Pruner runs
  (research4pan/AdaptPruner ``experiments/*.sh``: ``--pruner_type taylor --taylor param_first``);
  the ``taylor_param_first`` metric.

**Gradient.** g is accumulated over every Taylor mini-batch *before* the absolute value, as
upstream does (``utils/hf_prune.py``: ``loss.backward()`` per mini-batch into ``.grad``, then
``hf_pruner.TaylorImportance`` takes |w·grad|); nothing is per sample. Each mini-batch's mean
token loss is weighted by its share of the sequences, so g is the gradient of the mean token
loss over all of them (equal-length sequences). Upstream sums the unweighted mini-batch losses,
a constant factor (the number of mini-batches) that changes no ranking: every allocator
normalises scores per layer and kind.

Memory: only the coupled weights require gradients. The signed terms are linear in g, so they
are folded in and the gradients freed after every mini-batch; the element-wise terms are not,
so in that mode the gradients stay (accumulated in ``.grad``, in the weights' dtype) until the
last mini-batch, which is what one backward pass needs anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..arch import UNIT_KINDS, ArchAdapter, Coupling

Terms = list[dict[str, Tensor]]  # per layer, per kind: (units,) float64


def first_order_terms(weight: Tensor, grad: Tensor, coupling: Coupling, units: int, absolute: bool = False) -> Tensor:
    """Σ of W ⊙ G (or of |W ⊙ G| with ``absolute``) over each unit's slice of one matrix: (units,) float64.

    Positions along ``coupling.dim`` are summed over the other dimension, then added into the
    unit that owns them, so a fused or multi-column unit gets all of its weights.
    """
    products = weight.detach().double() * grad.double()
    per_position = (products.abs() if absolute else products).sum(dim=1 - coupling.dim)  # (positions,)
    ids = coupling.unit_ids.to(per_position.device)
    return torch.zeros(units, dtype=torch.float64, device=per_position.device).index_add_(0, ids, per_position)


class TaylorAccumulator:
    """Context manager: only the coupled weights train; ``step`` per mini-batch, ``finish`` at the end.

    ``signed`` holds t_u after ``finish``; ``absolute`` holds e_u when ``elementwise`` (else None).
    ``requires_grad`` flags and ``.grad`` are restored on exit, also after a failure.
    """

    def __init__(self, model: nn.Module, adapter: ArchAdapter, sequences: int, elementwise: bool = False) -> None:
        if sequences < 1:
            raise ValueError(f"the Taylor pass needs at least one sequence, got {sequences}")
        self.model, self.sequences, self.elementwise = model, sequences, elementwise
        self.layers = adapter.decoder_layers(model)
        self.couplings = [{k: adapter.couplings(model, i, k) for k in UNIT_KINDS} for i in range(len(self.layers))]
        self.units = [{k: adapter.count_units(model, i, k) for k in UNIT_KINDS} for i in range(len(self.layers))]
        self.signed: Terms = self._zeros()
        self.absolute: Terms | None = None
        self.saved = {name: p.requires_grad for name, p in model.named_parameters()}
        self.weights = {
            id(layer.get_submodule(c.path).weight)
            for layer, by_kind in zip(self.layers, self.couplings, strict=True)
            for cs in by_kind.values()
            for c in cs
        }

    def _zeros(self) -> Terms:
        return [{k: torch.zeros(n, dtype=torch.float64) for k, n in by_kind.items()} for by_kind in self.units]

    def __enter__(self) -> TaylorAccumulator:
        for p in self.model.parameters():
            p.requires_grad_(id(p) in self.weights)
            p.grad = None
        return self

    def __exit__(self, *exc) -> None:
        for name, p in self.model.named_parameters():
            p.grad = None
            p.requires_grad_(self.saved[name])

    def step(self, input_ids: Tensor) -> None:
        """Backward on this mini-batch's share of the mean loss; signed mode folds and frees the grads."""
        with torch.enable_grad():
            loss = self.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            (loss * (input_ids.shape[0] / self.sequences)).backward()
        if not self.elementwise:
            self._fold(self.signed, absolute=False)
            for p in self.model.parameters():
                p.grad = None

    def finish(self) -> None:
        """Element-wise mode: fold the accumulated gradient into t_u and e_u (call inside the context)."""
        if self.elementwise:
            self._fold(self.signed, absolute=False)
            self.absolute = self._fold(self._zeros(), absolute=True)

    def _fold(self, into: Terms, absolute: bool) -> Terms:
        for idx, layer in enumerate(self.layers):
            for kind in UNIT_KINDS:
                for c in self.couplings[idx][kind]:
                    w = layer.get_submodule(c.path).weight
                    t = first_order_terms(w, w.grad, c, self.units[idx][kind], absolute=absolute)
                    into[idx][kind] = into[idx][kind].to(t.device) + t
        return into
