"""Serving formats for pruned checkpoints: GGUF for llama.cpp, each family in its own architecture (gguf_families)."""

from .errors import ExportError
from .gguf import ExportReport, export_gguf, export_model_dir
from .gguf_layout import LayerSizes, choose_architecture, layer_sizes
from .quant import EXPORT_DTYPES, block_size, quant_fallbacks

__all__ = [
    "EXPORT_DTYPES",
    "ExportError",
    "ExportReport",
    "LayerSizes",
    "block_size",
    "choose_architecture",
    "export_gguf",
    "export_model_dir",
    "layer_sizes",
    "quant_fallbacks",
]
