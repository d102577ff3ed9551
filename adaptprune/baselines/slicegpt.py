"""SliceGPT (Ashkboos et al., ICLR 2024, arXiv 2401.15024): slice the residual stream along its PCA basis.

1. Fold every RMSNorm scale g into the linears that read the norm (W ← W·diag(g)): input_layernorm
   into q/k/v, post_attention_layernorm into gate/up, the final norm into the head (untied from
   the embedding, as the original does). A scale-free RMSNorm commutes with any orthogonal Q:
   norm(x Q) = norm(x) Q, so the network is invariant to rotating its residual stream (Thm. 1).
2. At each of the 2L+1 stream positions (embedding output, between attention and MLP, after the
   MLP), PCA of the residual stream X on calibration text. X is the un-normalised input of the
   next RMSNorm, as the original code collects it (``get_signals``), so high-norm tokens weigh more:
   C = Σ XᵀX (float64, + damping·mean(diag C)·I), eigh, eigenvectors sorted by eigenvalue → Q.
3. Rotate: writers of the stream W_out ← Qᵀ W_out (o_proj, down_proj, embedding E ← E Q), readers
   W_in ← W_in Q (q/k/v, gate/up, head); the residual connection between two positions gets
   Q_inᵀ Q_out. Keep the first (1−s)·D directions (floored to a multiple of ``round_to``): delete
   the matching rows/columns and slice the shortcut matrices to kept × kept (Eq. 8–9).
Layers are processed in order on the already-sliced activations, so each PCA sees the error of the
slices before it (the original's ``rotate_and_slice``). See ``arch/hetero_sliced_llama.py`` for the
model that runs the result and how its norms treat the deleted directions.

"As published" (``slice_head=False``, the original default): the head reads the full, rotated D,
so it stays unsliced and the last MLP writes all D directions; with a tied embedding the head is
an extra V×D matrix. Its slicing ratio is a hidden-size fraction, not a parameter fraction:
compare methods at equal parameter count with ``slice_to_params``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch.hetero_sliced_llama import AdaptSlicedLlamaConfig, AdaptSlicedLlamaForCausalLM

log = logging.getLogger(__name__)

LLAMA_TYPES = ("llama", "adaptprune_llama")
ATTN_INPUTS = ("q_proj", "k_proj", "v_proj")
MLP_INPUTS = ("gate_proj", "up_proj")


# ---- sizes (pure) ------------------------------------------------------------------------------
def sliced_width(hidden_size: int, sparsity: float, round_to: int = 8) -> int:
    """Kept residual width: floor((1 − s)·D), then floored to a multiple of ``round_to``."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"slicing ratio must be in [0, 1), got {sparsity}")
    width = int((1.0 - sparsity) * hidden_size)
    width -= width % round_to
    if width < 1:
        raise ValueError(f"slicing {sparsity} of {hidden_size} with round_to={round_to} keeps nothing")
    return width


def stream_dims(config, sparsity: float, *, round_to: int = 8, slice_head: bool = False) -> list[int]:
    """Residual width at the 2L+1 stream positions (see ``AdaptSlicedLlamaConfig``)."""
    width = sliced_width(config.hidden_size, sparsity, round_to)
    dims = [width] * (2 * config.num_hidden_layers + 1)
    if not slice_head:
        dims[-1] = config.hidden_size  # the last MLP writes, and the head reads, the full rotated D
    return dims


def count_sliced_params(config, sparsity: float, *, round_to: int = 8, slice_head: bool = False) -> int:
    """Exact parameter count of the sliced model built from a dense Llama ``config``.

    Embedding V·d_0, head V·d_2L (untied), per layer the q/k/v/o and gate/up/down matrices at the
    stream widths, two shortcut matrices d_in·d_mid + d_mid·d_out; the norms have no parameters.
    """
    dims = stream_dims(config, sparsity, round_to=round_to, slice_head=slice_head)
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    inter = config.intermediate_size
    total = config.vocab_size * (dims[0] + dims[-1])
    for layer in range(config.num_hidden_layers):
        d_in, d_mid, d_out = dims[2 * layer : 2 * layer + 3]
        attention = d_in * (q_out + 2 * kv_out) + q_out * d_mid
        mlp = d_mid * 2 * inter + inter * d_out
        if config.attention_bias:
            attention += q_out + 2 * kv_out + d_mid
        if config.mlp_bias:
            mlp += 2 * inter + d_out
        total += attention + mlp + d_in * d_mid + d_mid * d_out
    return total


def ratio_for_params(
    config, target_params: int, *, round_to: int = 1, slice_head: bool = False, tolerance: float = 0.005
) -> float:
    """The slicing ratio whose exact count is nearest ``target_params`` (bisection on the ratio).

    The count is a step function of the kept width, one step per ``round_to`` dimensions (≈2% of
    SmolLM2 per 8 dims), hence ``round_to=1`` by default. Raises if no width lands within
    ``tolerance`` (relative) of the target.
    """
    count = lambda s: count_sliced_params(config, s, round_to=round_to, slice_head=slice_head)  # noqa: E731
    lo, hi = 0.0, 1.0 - (round_to + 0.5) / config.hidden_size  # hi keeps exactly round_to dims
    if not count(hi) <= target_params <= count(lo):
        raise ValueError(
            f"target {target_params:,} is outside what slicing can reach "
            f"[{count(hi):,}, {count(lo):,}] (slice_head={slice_head})"
        )
    while hi - lo > 1e-9:  # invariant: count(lo) >= target > count(hi)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) >= target_params else (lo, mid)
    best = min((lo, hi), key=lambda s: abs(count(s) - target_params))
    error = abs(count(best) - target_params) / target_params
    if error > tolerance:
        raise ValueError(
            f"nearest count {count(best):,} misses target {target_params:,} by {error:.2%} > {tolerance:.2%}; "
            f"lower round_to (now {round_to})"
        )
    return best


# ---- PCA (pure) --------------------------------------------------------------------------------
def gram(signals: list[torch.Tensor]) -> torch.Tensor:
    """Σ XᵀX over tokens of every batch, in float64: (D, D)."""
    total = None
    for x in signals:
        x = x.reshape(-1, x.shape[-1]).double()  # (tokens, D)
        total = x.T @ x if total is None else total.addmm_(x.T, x)
    return total


def pca_basis(gram_matrix: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """Eigenvectors of the damped Gram matrix as columns, by decreasing eigenvalue: (D, D) float64.

    Damping adds damping·mean(diag C) to the diagonal (as the original); it shifts all eigenvalues
    equally, so it only stabilises ``eigh`` when C is near-singular.
    """
    c = gram_matrix.double().clone()
    c.diagonal().add_(damping * c.diagonal().mean())
    eigenvalues, eigenvectors = torch.linalg.eigh(c)
    order = torch.argsort(eigenvalues, descending=True)
    return eigenvectors[:, order]


# ---- weight algebra (pure) ---------------------------------------------------------------------
def _reader(dense: nn.Linear, scale: torch.Tensor, basis: torch.Tensor) -> nn.Linear:
    """A linear reading the rotated stream: W·diag(g)·Q (out × kept); its bias is unchanged."""
    weight = (dense.weight.double() * scale.double()) @ basis  # (out, kept)
    return _linear_like(dense, weight, dense.bias)


def _writer(dense: nn.Linear, basis: torch.Tensor) -> nn.Linear:
    """A linear writing the rotated stream: Qᵀ·W, Qᵀ·b (kept × in)."""
    weight = basis.T @ dense.weight.double()  # (kept, in)
    bias = None if dense.bias is None else basis.T @ dense.bias.double()
    return _linear_like(dense, weight, bias)


def _linear_like(dense: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    ref = dense.weight
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _set_parameter(module: nn.Module, name: str, value: torch.Tensor, like: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(value.to(device=like.device, dtype=like.dtype).contiguous()))


# ---- orchestration -----------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by the capture hook once layer 0's inputs are recorded."""


@torch.no_grad()
def _layer0_inputs(model: nn.Module, sequences: torch.Tensor, batch_size: int) -> tuple[list, list]:
    """Per batch: layer 0's hidden states (B, T, D) and the keyword arguments HF passes every layer
    (mask, rotary cos/sin, positions), captured so the sliced layers run exactly as HF would."""
    hidden, kwargs = [], []

    def grab(_module, args, kw):
        hidden.append(args[0])
        kwargs.append(kw)
        raise _StopForward

    device = model.model.embed_tokens.weight.device
    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in sequences.split(batch_size):
            try:
                model.model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


def sliced_config(config, dims: list[int], **record) -> AdaptSlicedLlamaConfig:
    """The sliced model's config: the dense values, untied head, ``slice_dims`` and a record."""
    values = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "per_layer_config"):
        values.pop(key, None)
    values.update(tie_word_embeddings=False, slice_dims=list(dims), slicegpt=record)
    return AdaptSlicedLlamaConfig(**values)


def _check_supported(model: nn.Module) -> None:
    config = model.config
    if config.model_type not in LLAMA_TYPES:
        raise NotImplementedError(f"SliceGPT here supports Llama-family models, not '{config.model_type}'")
    if getattr(config, "is_heterogeneous", False) or getattr(config, "adaptprune_output_bias", False):
        raise NotImplementedError("SliceGPT starts from a dense, unpruned Llama (uniform layers, no output biases)")


def _branch(
    inputs: list[torch.Tensor],
    basis_in: torch.Tensor,
    run: Callable[[torch.Tensor, int], torch.Tensor],
    width: int,
    damping: float,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One residual branch on the sliced stream; returns its sliced outputs and the kept basis.

    ``run(x, batch)`` is the branch (norm → attention or MLP) with its writer still dense, so
    y = x·Q_inᵀ + run(x) is the dense-basis stream after the branch (B, T, D); its PCA gives Q_out.
    """
    back = basis_in.T.to(inputs[0].dtype)  # (d_in, D): sliced stream back to the dense basis
    signals = [x @ back + run(x, b) for b, x in enumerate(inputs)]  # (B, T, D) each
    basis_out = pca_basis(gram(signals), damping)[:, :width]  # (D, d_out)
    keep = basis_out.to(signals[0].dtype)
    return [y @ keep for y in signals], basis_out


@torch.no_grad()
def slicegpt_prune(
    model: nn.Module,
    sequences: torch.Tensor,
    sparsity: float,
    *,
    round_to: int = 8,
    damping: float = 0.01,
    slice_head: bool = False,
    batch_size: int = 16,
    progress: bool = True,
) -> AdaptSlicedLlamaForCausalLM:
    """SliceGPT a dense Llama-family model; returns a new ``AdaptSlicedLlamaForCausalLM``.

    ``sequences``: calibration token ids (N, T). ``sparsity``: the sliced fraction of the hidden
    size (not of the parameters). The input model is read, never modified. Memory: the model twice
    plus ≈3 copies of the calibration activations (N·T·D floats) and D×D float64 Gram matrices.
    """
    _check_supported(model)
    model.eval()
    dims = stream_dims(model.config, sparsity, round_to=round_to, slice_head=slice_head)
    record = dict(
        sparsity=sparsity,
        round_to=round_to,
        damping=damping,
        slice_head=slice_head,
        calibration_sequences=list(sequences.shape),
    )
    dtype, device = model.lm_head.weight.dtype, model.lm_head.weight.device
    sliced = AdaptSlicedLlamaForCausalLM(sliced_config(model.config, dims, **record)).to(device=device, dtype=dtype)
    sliced.config._attn_implementation = model.config._attn_implementation  # captured masks match it
    sliced.eval()

    hidden, kwargs = _layer0_inputs(model, sequences, batch_size)
    basis = pca_basis(gram(hidden), damping)[:, : dims[0]]  # (D, d_0)
    embed = model.model.embed_tokens.weight.double() @ basis  # E ← E·Q: (V, d_0)
    _set_parameter(sliced.model.embed_tokens, "weight", embed, model.model.embed_tokens.weight)
    hidden = [x @ basis.to(dtype) for x in hidden]

    layers = list(zip(model.model.layers, sliced.model.layers, strict=True))
    for idx, (dense, new) in enumerate(tqdm(layers, desc="SliceGPT: slicing layers", disable=not progress)):
        hidden, basis = _slice_layer(dense, new, hidden, kwargs, basis, dims[2 * idx + 1 : 2 * idx + 3], damping)

    # head ← W_head·diag(g_final)·Q (the head was tied to the embedding: this is a new matrix)
    sliced.lm_head = _reader(model.lm_head, model.model.norm.weight, basis)
    _check_sizes(sliced, model.config, sparsity, round_to, slice_head)
    log.info(
        "SliceGPT: slicing %.3f, widths %s, %s parameters", sparsity, sorted(set(dims)), f"{sliced.num_parameters():,}"
    )
    return sliced


def _slice_layer(
    dense: nn.Module,
    new: nn.Module,
    hidden: list,
    kwargs: list,
    basis_in: torch.Tensor,
    widths: list[int],
    damping: float,
) -> tuple[list, torch.Tensor]:
    """Rotate and slice one decoder layer (attention branch, then MLP branch) into ``new``."""
    attn, mlp = new.self_attn, new.mlp
    for name in ATTN_INPUTS:
        setattr(attn, name, _reader(getattr(dense.self_attn, name), dense.input_layernorm.weight, basis_in))
    attn.o_proj = dense.self_attn.o_proj  # dense writer while the branch output is measured

    def run_attention(x: torch.Tensor, batch: int) -> torch.Tensor:
        return attn(hidden_states=new.input_layernorm(x), **kwargs[batch])[0]

    hidden, basis_mid = _branch(hidden, basis_in, run_attention, widths[0], damping)
    attn.o_proj = _writer(dense.self_attn.o_proj, basis_mid)
    _set_parameter(new, "attn_shortcut", basis_in.T @ basis_mid, new.attn_shortcut)  # (d_in, d_mid)

    for name in MLP_INPUTS:
        setattr(mlp, name, _reader(getattr(dense.mlp, name), dense.post_attention_layernorm.weight, basis_mid))
    mlp.down_proj = dense.mlp.down_proj

    def run_mlp(x: torch.Tensor, batch: int) -> torch.Tensor:
        return mlp(new.post_attention_layernorm(x))

    hidden, basis_out = _branch(hidden, basis_mid, run_mlp, widths[1], damping)
    mlp.down_proj = _writer(dense.mlp.down_proj, basis_out)
    _set_parameter(new, "mlp_shortcut", basis_mid.T @ basis_out, new.mlp_shortcut)  # (d_mid, d_out)
    return hidden, basis_out


def _check_sizes(sliced: nn.Module, config, sparsity: float, round_to: int, slice_head: bool) -> None:
    """Invariant after surgery: the built model has exactly the planned parameter count."""
    planned = count_sliced_params(config, sparsity, round_to=round_to, slice_head=slice_head)
    actual = sum(p.numel() for p in sliced.parameters())
    if actual != planned:
        raise AssertionError(f"sliced model has {actual:,} parameters, plan says {planned:,}")


def slice_to_params(
    model: nn.Module,
    sequences: torch.Tensor,
    target_params: int,
    *,
    round_to: int = 1,
    slice_head: bool = False,
    tolerance: float = 0.005,
    **kwargs,
) -> AdaptSlicedLlamaForCausalLM:
    """SliceGPT at the ratio whose exact parameter count is nearest ``target_params``.

    Parameter-matched comparison (the project's protocol): the ratio comes from bisection on
    ``count_sliced_params``; then the model is sliced once. ``kwargs`` go to ``slicegpt_prune``.
    """
    ratio = ratio_for_params(model.config, target_params, round_to=round_to, slice_head=slice_head, tolerance=tolerance)
    log.info("SliceGPT: ratio %.4f for target %s parameters", ratio, f"{target_params:,}")
    return slicegpt_prune(model, sequences, ratio, round_to=round_to, slice_head=slice_head, **kwargs)
