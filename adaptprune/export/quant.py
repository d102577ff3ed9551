"""GGUF tensor encodings and llama.cpp's quantization fallbacks, predicted from tensor shapes.

A quantized GGUF row is cut into blocks: 32 values for the legacy types (Q4_0, Q5_0, Q8_0, ...)
and 256 for the k-quants (Q2_K ... Q6_K) and most i-quants. llama.cpp's quantizer
(``tensor_type_fallback`` in ``src/llama-quant.cpp``, build 11434) stores a tensor whose row
length (GGUF ``ne[0]``, the input width of a linear) is not a multiple of the block size in a
32-block type instead, and in F16 when even 32 does not divide it ("unusual shape"). A pruned MLP
with 968 neurons therefore keeps every ``ffn_down`` in F16 at Q4_K_M: what pruning saved, the file
loses again. ``prune.neuron_multiple`` rounds the sizes so this does not happen.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants as gguf_quants

from .errors import ExportError

# --dtype of ``adaptprune export``: (tensor type of 2-D weights, general.file_type)
EXPORT_DTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
LEGACY_BLOCK = 32  # the smallest block of any quantized type llama.cpp falls back to
# Tensors llama.cpp's quantizer types by its own rule (Q8_0/Q6_K for the head) before any fallback.
HEAD_TENSORS = ("token_embd.weight", "output.weight")


def quant_type(name: str) -> GGMLQuantizationType:
    """The base tensor type of a llama-quantize type name: ``Q4_K_M`` -> Q4_K, ``q8_0`` -> Q8_0."""
    key = name.strip().upper()
    while key:
        if key in GGMLQuantizationType.__members__:
            return GGMLQuantizationType[key]
        if "_" not in key:
            break
        key = key.rsplit("_", 1)[0]  # drop a mix suffix: _M, _S, _L, _XL
    known = ", ".join(sorted(t.lower() for t in GGMLQuantizationType.__members__))
    raise ExportError(f"unknown quantization type '{name}'; known: {known}")


def block_size(name: str) -> int:
    """Values per quantization block of a type name (1 for the float types)."""
    return GGML_QUANT_SIZES[quant_type(name)][0]


def fallback_type(ncols: int, name: str) -> str | None:
    """What llama.cpp stores a row of ``ncols`` values in instead of type ``name``; None if it fits."""
    block = block_size(name)
    if ncols % block == 0:
        return None
    if block > LEGACY_BLOCK and ncols % LEGACY_BLOCK == 0:
        return "32-block"  # Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, IQ* -> IQ4_NL
    return "F16"


def quant_fallbacks(shapes: Mapping[str, Sequence[int]], name: str) -> dict[str, str]:
    """``{tensor: fallback}`` for every 2-D tensor that type ``name`` cannot hold.

    ``shapes`` are numpy shapes (rows, ncols). The head and token embedding get llama.cpp's own
    choice when the block does not fit (Q8_0), so only an F16 fallback is reported for them.
    """
    out = {}
    for tensor, shape in shapes.items():
        if len(shape) != 2:
            continue  # norms and biases stay F32, never quantized
        fallback = fallback_type(int(shape[-1]), name)
        if fallback is None or (tensor in HEAD_TENSORS and fallback != "F16"):
            continue
        out[tensor] = fallback
    return out


def summarize_tensors(names: Sequence[str]) -> str:
    """``blk.3.ffn_down.weight, blk.4.ffn_down.weight`` -> ``ffn_down.weight in layers 3-4``."""
    per_kind: dict[str, list[int]] = {}
    loose = []
    for name in names:
        match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        if match:
            per_kind.setdefault(match.group(2), []).append(int(match.group(1)))
        else:
            loose.append(name)
    parts = [f"{kind} in layers {_ranges(sorted(layers))}" for kind, layers in per_kind.items()]
    return "; ".join(parts + loose)


def _ranges(values: list[int]) -> str:
    spans, start = [], values[0]
    for prev, cur in zip(values, values[1:] + [None]):
        if cur != prev + 1:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(spans)


def encode(array: np.ndarray, dtype: str) -> tuple[np.ndarray, GGMLQuantizationType]:
    """One tensor's data in the export dtype: 1-D tensors stay F32 (llama.cpp's norms and biases);
    a row length the block does not divide falls back to F16, as llama-quantize does."""
    target, _ = EXPORT_DTYPES[dtype]
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim < 2 or target == GGMLQuantizationType.F32:
        return array, GGMLQuantizationType.F32
    if target == GGMLQuantizationType.F16 or fallback_type(array.shape[-1], dtype) is not None:
        return array.astype(np.float16), GGMLQuantizationType.F16
    return gguf_quants.quantize(array, target), target
