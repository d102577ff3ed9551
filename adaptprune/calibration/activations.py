"""Streaming calibration: one pass over calibration text collects what scoring and compensation need.

Per decoder layer, with hooks that are always removed afterwards:

- **Channel statistics** of the inputs of the two output-side projections (the adapter's
  ``mlp_output`` = down, ``attention_output`` = o), i.e. of the unit activations: per input
  channel the mean μ, the population variance σ² and the second moment E[x²], accumulated in
  float64 (batch moments merged with Chan et al.'s parallel update, so a channel with a large
  mean and a small variance keeps its variance exactly). Optionally the raw second-moment
  matrix Σ = E[x xᵀ] (C×C per layer and kind, summed in float64 from chunk products taken in the
  activations' precision) for energy and least-squares compensation.
- **Block influence** (ShortGPT, arXiv 2403.03853; Adapt-Pruner, arXiv 2502.03460):
  I_l = 1 − mean over tokens of cos(h_in, h_out) of the residual stream around the layer.
  It is ALGORITHMS.md's −cos shifted by 1, so I_l ∈ [0, 2] and 0 means the layer leaves the
  stream's direction unchanged (least important); the allocator only uses the normalised form
  Ĩ = (I − mean I)/max|I − mean I|, which the shift does not change.
- **Residual-stream statistics**, when ``collect_residual``: the same per-channel moments of the
  stream h itself at its L+1 sampled points (each layer's input h_in, then the last layer's
  output), for hidden-size and depth scoring (``importance.residual``). Costs nothing otherwise.
- **First-order Taylor terms** (``gradients``), when ``taylor_batches > 0``: for each unit u,
  t_u = Σ over the unit's coupled weights of W ⊙ ∂L/∂W, L the mean token loss over the first
  ``taylor_batches`` mini-batches (the ``taylor`` metric scores |t_u|), and with
  ``taylor_elementwise`` also e_u = Σ |W ⊙ ∂L/∂W| (the ``taylor_param_first`` metric). During
  those batches only the coupled weights require gradients, so peak memory is the model, the
  coupled weights' gradients and one batch of activations kept for backward.

Memory: activations are never stored; the accumulators are O(C) per layer and kind, plus
O(C²) each when ``collect_cov`` (for a 1536-neuron MLP that is 19 MB per layer). Statistics
are accumulated on the device of the activations they summarise and handed back on the device of the
model's weights: the same device, except where a pruning step runs the layers on the accelerator
while the weights wait on the host (``pruning.staging``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..arch import ATTENTION, MLP, UNIT_KINDS, ArchAdapter, get_adapter
from .gradients import TaylorAccumulator, first_order_terms  # noqa: F401  (first_order_terms: re-exported)


@dataclass
class ChannelStats:
    """Per-input-channel statistics of one output-side projection's inputs (float64)."""

    count: int  # tokens seen
    mean: Tensor  # (C,) μ
    var: Tensor  # (C,) population variance σ²
    sq_mean: Tensor  # (C,) E[x²] = σ² + μ²
    cov: Tensor | None = None  # (C, C) raw second moment E[x xᵀ], only with collect_cov
    # A sequential pass rebuilding towards the layer as it was before the step (``pruning.sequential``):
    # E[x_before xᵀ] (C, C), rows the inputs before the step, columns the inputs now, and E[x_before] (C,)
    cross: Tensor | None = None
    before_mean: Tensor | None = None

    @property
    def std(self) -> Tensor:
        return self.var.clamp_min(0).sqrt()

    def to(self, device: torch.device) -> ChannelStats:
        """These statistics on ``device`` (themselves when they are there already)."""
        values = ((f.name, getattr(self, f.name)) for f in fields(self))
        return replace(self, **{name: v.to(device) for name, v in values if torch.is_tensor(v)})


@dataclass
class LayerStats:
    """Everything calibration learned about one decoder layer."""

    mlp: ChannelStats
    attention: ChannelStats
    influence: float  # 1 − mean cos(h_in, h_out)

    def channels(self, kind: str) -> ChannelStats:
        """The statistics of the output-side inputs of ``kind`` ("mlp" or "attention")."""
        if kind not in UNIT_KINDS:
            raise ValueError(f"unit kind must be one of {UNIT_KINDS}, got '{kind}'")
        return self.mlp if kind == MLP else self.attention


@dataclass
class CalibrationResult:
    layers: list[LayerStats]
    # per layer, per kind: signed first-order terms t_u = Σ W ⊙ ∂L/∂W over each unit's
    # coupled weights, float64 (units,); None unless taylor_batches > 0
    taylor: list[dict[str, Tensor]] | None = None
    # likewise e_u = Σ |W ⊙ ∂L/∂W| (element-wise); None unless taylor_elementwise
    taylor_abs: list[dict[str, Tensor]] | None = None
    tokens: int = 0
    taylor_tokens: int = 0
    # per-channel moments of the residual stream at layer inputs 0..L-1 and the last layer's
    # output (L+1 entries, float64); None unless collect_residual
    residual: list[ChannelStats] | None = None


# ---- pure accumulators --------------------------------------------------------------------
CHUNK_BYTES = 3 * 2**20  # float64 rows handled at once by ChannelAccumulator (see update)


class ChannelAccumulator:
    """Streams per-channel moments of rows x (n, C) without storing them (float64)."""

    def __init__(self, collect_cov: bool = False) -> None:
        self.collect_cov = collect_cov
        self.count = 0
        self.mean: Tensor | None = None  # (C,)
        self.m2: Tensor | None = None  # (C,) Σ (x − mean)²
        self.sq_sum: Tensor | None = None  # (C,) Σ x²
        self.outer: Tensor | None = None  # (C, C) Σ x xᵀ

    def update(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])  # (n, C)
        # Row chunks keep each float64 temporary near CHUNK_BYTES. Whole-batch temporaries (12 MB
        # for 1024 tokens x 1536 channels) fragment glibc's heap so that freed memory stays resident:
        # on SmolLM2-135M one-shot calibration peaked at 2.2x the model above the libraries' RSS,
        # with 3 MB chunks at 1.3x, at equal speed. The merge below is exact, so results do not change.
        rows = max(1, CHUNK_BYTES // (8 * x.shape[-1]))
        for chunk in x.split(rows):
            self._update_rows(chunk.to(torch.float64), chunk)

    def _update_rows(self, x: Tensor, raw: Tensor | None = None) -> None:
        n = x.shape[0]
        if n == 0:
            return
        if self.collect_cov:
            # Σ x xᵀ of one chunk in the activations' own precision (fp32: ~20x faster than float64 on a CPU,
            # and the inputs carry no more digits), summed into the float64 accumulator
            block = raw if raw is not None and raw.dtype == torch.float32 else x
            outer = (block.T @ block).double()
        batch_mean = x.mean(0)
        batch_m2 = (x - batch_mean).square().sum(0)
        batch_sq = batch_m2 + n * batch_mean.square()  # Σx², all terms non-negative: no cancellation
        if self.mean is None:
            self.mean, self.m2, self.sq_sum = batch_mean, batch_m2, batch_sq
            self.outer = outer if self.collect_cov else None
        else:
            # Chan et al. (1979): merge two sets' means and centred sums of squares exactly
            total = self.count + n
            delta = batch_mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + batch_m2 + delta.square() * (self.count * n / total)
            self.sq_sum = self.sq_sum + batch_sq
            if self.collect_cov:
                self.outer = self.outer + outer
        self.count += n

    def result(self) -> ChannelStats:
        if self.count == 0:
            raise RuntimeError("no activations reached this projection during calibration")
        cov = self.outer / self.count if self.outer is not None else None
        return ChannelStats(self.count, self.mean, self.m2 / self.count, self.sq_sum / self.count, cov)


class CrossAccumulator:
    """Streams E[a bᵀ] and E[a] of paired rows a, b (n, C) — the same tokens through two models (float64)."""

    def __init__(self) -> None:
        self.count = 0
        self.outer: Tensor | None = None  # (C, C) Σ a bᵀ
        self.sum: Tensor | None = None  # (C,) Σ a

    def update(self, a: Tensor, b: Tensor) -> None:
        a, b = a.detach().reshape(-1, a.shape[-1]), b.detach().reshape(-1, b.shape[-1])  # (n, C)
        rows = max(1, CHUNK_BYTES // (8 * a.shape[-1]))
        for ca, cb in zip(a.split(rows), b.split(rows)):
            # chunk products in the activations' precision, summed in float64 (as ChannelAccumulator's Σ)
            outer = (ca.T @ cb).double() if ca.dtype == torch.float32 else ca.double().T @ cb.double()
            total = ca.double().sum(0)
            self.outer = outer if self.outer is None else self.outer + outer
            self.sum = total if self.sum is None else self.sum + total
            self.count += ca.shape[0]

    def into(self, stats: ChannelStats) -> ChannelStats:
        """``stats`` (of b) with the cross moment and the mean of a added."""
        if self.count != stats.count:
            raise RuntimeError(f"paired inputs disagree: {self.count} tokens before the step, {stats.count} now")
        stats.cross, stats.before_mean = self.outer / self.count, self.sum / self.count
        return stats


class InfluenceAccumulator:
    """Streams 1 − mean over tokens of cos(h_in, h_out) (ShortGPT's block influence)."""

    def __init__(self) -> None:
        self.cos_sum = 0.0
        self.count = 0

    def update(self, h_in: Tensor, h_out: Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(h_in.detach().double(), h_out.detach().double(), dim=-1)  # (B, T)
        self.cos_sum += cos.sum().item()
        self.count += cos.numel()

    def result(self) -> float:
        return 1.0 - self.cos_sum / max(self.count, 1)


# ---- orchestration --------------------------------------------------------------------------
class _Hooks:
    """The calibration hooks of every decoder layer (``attach=False``: none yet, see ``attached``);
    ``remove`` undoes all of them."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ArchAdapter,
        collect_cov: bool,
        collect_residual: bool = False,
        attach: bool = True,
    ) -> None:
        self.handles: list = []
        self.adapter = adapter
        self.home = next(model.parameters()).device  # where the statistics are handed back
        layers = adapter.decoder_layers(model)
        self.residual = [ChannelAccumulator() for _ in range(len(layers) + 1)] if collect_residual else None
        self.channels = [{kind: ChannelAccumulator(collect_cov) for kind in UNIT_KINDS} for _ in layers]
        self.influence = [InfluenceAccumulator() for _ in layers]
        try:
            for idx, layer in enumerate(layers if attach else ()):
                self._attach(idx, layer)
        except BaseException:
            self.remove()
            raise

    def _attach(self, idx: int, layer: nn.Module) -> None:
        for kind, path in ((MLP, self.adapter.mlp_output), (ATTENTION, self.adapter.attention_output)):
            acc = self.channels[idx][kind]
            self.handles.append(
                layer.get_submodule(path).register_forward_pre_hook(lambda _m, args, acc=acc: acc.update(args[0]))
            )
        self.handles.append(layer.register_forward_hook(self._influence_hook(idx), with_kwargs=True))

    @contextmanager
    def attached(self, idx: int, layer: nn.Module) -> Iterator[None]:
        """Layer ``idx``'s hooks on ``layer`` (as it is now) for the duration of the block."""
        try:
            self._attach(idx, layer)
            yield
        finally:
            self.remove()

    def _influence_hook(self, idx: int):
        def hook(_module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            self.influence[idx].update(h_in, h_out)
            if self.residual is not None:  # stream at layer idx's input; the last layer's output too
                self.residual[idx].update(h_in)
                if idx == len(self.influence) - 1:
                    self.residual[idx + 1].update(h_out)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def layer_stats(self) -> list[LayerStats]:
        return [
            LayerStats(
                mlp=ch[MLP].result().to(self.home),
                attention=ch[ATTENTION].result().to(self.home),
                influence=inf.result(),
            )
            for ch, inf in zip(self.channels, self.influence, strict=True)
        ]


class LayerwiseStats:
    """What ``calibrate`` (no Taylor terms, no Σ) gives on ``sequences``, collected one decoder layer at a time
    while a sequential pass runs each layer, already pruned, on the text's cached hidden states
    (``pruning.sequential``): the next inner step's statistics without a calibration forward of its own."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter, sequences: Tensor) -> None:
        self.sequences = sequences
        self._hooks = _Hooks(model, adapter, collect_cov=False, attach=False)

    def collecting(self, idx: int, layer: nn.Module):
        """Context: statistics of layer ``idx`` from what ``layer`` computes inside the block."""
        return self._hooks.attached(idx, layer)

    def result(self) -> CalibrationResult:
        return CalibrationResult(layers=self._hooks.layer_stats(), tokens=self.sequences.numel())


def _check_sequences(sequences: Tensor, batch_size: int) -> None:
    if not isinstance(sequences, Tensor) or sequences.dim() != 2 or sequences.dtype != torch.long:
        raise ValueError("sequences must be a LongTensor of token ids shaped (N, L)")
    if sequences.shape[0] == 0 or sequences.shape[1] == 0:
        raise ValueError(f"need at least one calibration sequence with tokens, got shape {tuple(sequences.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def calibrate(
    model: nn.Module,
    sequences: Tensor,
    batch_size: int = 4,
    adapter: ArchAdapter | None = None,
    collect_cov: bool = False,
    taylor_batches: int = 0,
    collect_residual: bool = False,
    progress: bool = True,
    desc: str = "calibrating",
    taylor_elementwise: bool = False,
) -> CalibrationResult:
    """One pass over ``sequences`` (N, L): channel statistics, block influence, Taylor terms.

    The first ``min(taylor_batches, batches)`` mini-batches also run a backward pass on the LM
    loss (``taylor_elementwise``: keep Σ |W ⊙ G| too); all others run under ``torch.no_grad()``.
    The model runs in eval mode; hooks, the train/eval mode, ``requires_grad`` flags and ``.grad``
    are restored even when the pass fails.
    """
    _check_sequences(sequences, batch_size)
    adapter = adapter or get_adapter(model)
    device = next(model.parameters()).device
    batches = list(torch.split(sequences, batch_size))
    n_taylor = min(taylor_batches, len(batches))
    taylor_sequences = sum(b.shape[0] for b in batches[:n_taylor])
    taylor = TaylorAccumulator(model, adapter, taylor_sequences, taylor_elementwise) if n_taylor > 0 else None
    hooks = _Hooks(model, adapter, collect_cov, collect_residual)
    was_training = model.training
    try:
        model.eval()  # statistics of the deterministic forward (no dropout, no gradient checkpointing)
        with taylor if taylor is not None else nullcontext():
            for i, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, unit="batch")):
                batch = batch.to(device)  # (B, L)
                if taylor is not None and i < taylor_batches:
                    taylor.step(batch)
                else:
                    with torch.no_grad():
                        model(input_ids=batch, use_cache=False, logits_to_keep=1)  # no LM head over every token
            if taylor is not None:
                taylor.finish()
    finally:
        hooks.remove()
        model.train(was_training)
    return CalibrationResult(
        layers=hooks.layer_stats(),
        taylor=taylor.signed if taylor is not None else None,
        taylor_abs=taylor.absolute if taylor is not None else None,
        tokens=sequences.numel(),
        taylor_tokens=sum(b.numel() for b in batches[:n_taylor]),
        residual=[acc.result().to(hooks.home) for acc in hooks.residual] if hooks.residual is not None else None,
    )
