"""Write a (pruned) checkpoint as a GGUF file that llama.cpp runs, in its family's own architecture.

The family's ``Layout`` (``gguf_layout``; registered in ``gguf_llama`` and ``gguf_families``) picks
llama.cpp's architecture for the checkpoint (build 11434): ``llama``/``deci`` for the Llama,
Mistral and Qwen2 families, ``qwen3``/``openelm`` for Qwen3, ``gemma3`` for Gemma 3, ``phi3`` (or
``llama``/``deci``) for Phi-3, and refuses in one line what none can hold. Architectures that read
per-layer sizes (``deci``, ``openelm``) get ``feed_forward_length`` and both head counts as arrays;
the others get scalars.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGML_QUANT_VERSION, MODEL_TENSOR, TENSOR_NAMES, GGUFWriter
from torch import nn

from ..arch import get_adapter, hf_compat
from . import gguf_families, gguf_llama  # noqa: F401  (register the layouts)
from .errors import ExportError
from .gguf_layout import LayerSizes, Layout, check_exportable, layer_sizes, layout_for, tensor_name
from .gguf_tokenizer import copy_gguf_tokenizer, hf_tokenizer_meta
from .quant import EXPORT_DTYPES, encode, quant_fallbacks, summarize_tensors


@dataclass
class ExportReport:
    """What was written: the architecture, per-layer sizes and every fallback or adjustment."""

    path: Path
    arch: str
    dtype: str
    sizes: list[LayerSizes]
    tensors: dict[str, tuple[int, ...]]  # name -> numpy shape
    fallbacks: dict[str, dict[str, str]] = field(default_factory=dict)  # quant type -> {tensor: stored as}
    warnings: list[str] = field(default_factory=list)
    per_layer: bool = False  # sizes written as per-layer arrays


def collect_tensors(model: nn.Module, sizes: list[LayerSizes], arch: str, warnings: list[str]) -> dict:
    """Every tensor of the GGUF file, float32, under llama.cpp's names (numpy order: rows first)."""
    adapter, layout = get_adapter(model), layout_for(model)
    out = layout.global_tensors(model, arch)
    for i, layer in enumerate(adapter.decoder_layers(model)):
        out.update(layout.layer_tensors(layer, i, sizes[i], arch, warnings))
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    placed = {p.data_ptr() for p in model.parameters()}
    known = {embed.data_ptr(), head.data_ptr(), model.get_submodule(adapter.final_norm_path(model)).weight.data_ptr()}
    known |= {p.data_ptr() for layer in adapter.decoder_layers(model) for p in layer.parameters()}
    if placed - known:
        raise ExportError("the model has parameters outside the embedding, decoder layers, final norm and head")
    return out


def write_hparams(writer: GGUFWriter, model: nn.Module, sizes: list[LayerSizes], layout: Layout, arch: str) -> list:
    """The architecture's hyper-parameters: per-layer arrays where ``arch`` reads them, else scalars."""
    config, adapter = model.config, get_adapter(model)
    head_dim, warnings = adapter.head_dim(config), []
    context = int(hf_compat.global_value(config, "max_position_embeddings"))
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window and window < context and not layout.native_sliding_window:
        warnings.append(f"sliding window {window}: llama.cpp attends over the whole context; context_length={window}")
        context = int(window)
    pick = list if arch in layout.per_layer_archs else (lambda values: values[0])
    ff = [max(s.neurons, 1) for s in sizes]  # an empty MLP is written as one zero neuron
    writer.add_context_length(context)
    writer.add_embedding_length(int(hf_compat.global_value(config, "hidden_size")))
    writer.add_block_count(len(sizes))
    writer.add_feed_forward_length(pick(ff))
    writer.add_head_count(pick([s.heads for s in sizes]))
    writer.add_head_count_kv(pick([s.kv_heads for s in sizes]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(layout.rope_base(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(model.get_input_embeddings().weight.shape[0]))
    return warnings + layout.write_hparams(writer, model, arch)


def export_gguf(
    model: nn.Module,
    tokenizer,
    out: str | os.PathLike,
    dtype: str = "f32",
    tokenizer_gguf: str | os.PathLike | None = None,
    check_quants: tuple[str, ...] = (),
    name: str | None = None,
) -> ExportReport:
    """Write ``model`` (in memory, any exportable family and sizes) as a GGUF file, atomically.

    ``dtype`` types the 2-D weights (norms and biases stay F32; a q8_0 row that 32 does not divide
    stays F16). ``tokenizer_gguf`` copies the ``tokenizer.*`` keys of another GGUF instead of
    converting ``tokenizer``. ``check_quants`` names llama-quantize types (e.g. ``Q4_K_M``) whose
    fallbacks are reported in advance.
    """
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype '{dtype}' is not one of {', '.join(EXPORT_DTYPES)}")
    check_exportable(model.config)
    sizes = layer_sizes(model)
    if sizes[0].heads == 0:
        raise ExportError("layer 0 has no attention heads; llama.cpp reads the head size from layer 0's head count")
    layout = layout_for(model)
    arch = layout.architecture(model, sizes)
    report = ExportReport(Path(out), arch, dtype, sizes, tensors={}, per_layer=arch in layout.per_layer_archs)
    tensors = collect_tensors(model, sizes, arch, report.warnings)
    report.tensors = {k: tuple(v.shape) for k, v in tensors.items()}
    for qtype in dict.fromkeys((dtype, *check_quants)):
        fallbacks = quant_fallbacks(report.tensors, qtype) if qtype not in ("f32", "f16", "bf16") else {}
        report.fallbacks[qtype] = fallbacks
        for kind in sorted(set(fallbacks.values())):
            names = [t for t, f in fallbacks.items() if f == kind]
            stored = "F16" if kind == "F16" else "a 32-block type"
            hint = "; prune with prune.neuron_multiple=32 or 256 to fit ffn_down" if _has_ffn_down(names) else ""
            report.warnings.append(
                f"{qtype}: {len(names)} tensor(s) would fall back to {stored} (row length not a multiple of "
                f"the block): {summarize_tensors(names)}{hint}"
            )
    _write(report, model, tokenizer, tensors, tokenizer_gguf, name)
    return report


def _has_ffn_down(names: list[str]) -> bool:
    return any(n.endswith(f"{TENSOR_NAMES[MODEL_TENSOR.FFN_DOWN].split('.')[-1]}.weight") for n in names)


def _write(report: ExportReport, model, tokenizer, tensors: dict, tokenizer_gguf, name: str | None) -> None:
    """Header, metadata, tokenizer and tensor data into a temporary file renamed into place."""
    report.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = report.path.with_name(f".{report.path.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(str(tmp), report.arch)
    try:
        writer.add_name(name or getattr(model.config, "_name_or_path", "") or "adaptprune model")
        report.warnings += write_hparams(writer, model, report.sizes, layout_for(model), report.arch)
        ttype, file_type = EXPORT_DTYPES[report.dtype]
        writer.add_file_type(int(file_type))
        if report.dtype == "q8_0":
            writer.add_quantization_version(GGML_QUANT_VERSION)
        n_vocab = report.tensors[tensor_name(MODEL_TENSOR.TOKEN_EMBD)][0]
        if tokenizer_gguf is not None:
            copy_gguf_tokenizer(tokenizer_gguf, writer, n_vocab)
        else:
            hf_tokenizer_meta(tokenizer, n_vocab).write(writer)
        for tname, value in tensors.items():
            data, qtype = encode(value.contiguous().numpy(), report.dtype)
            writer.add_tensor(tname, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, report.path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def resolve_checkpoint(model_dir: str | os.PathLike) -> str:
    """A checkpoint folder, an embedded model name, or an ``adaptprune prune --out`` folder (its ``model/``)."""
    from ..checkpoint import resolve_model_path

    path = Path(resolve_model_path(str(model_dir)))
    if not path.exists() and str(model_dir).startswith(("/", ".", "~")):
        raise ExportError(f"{model_dir} does not exist")
    if not (path / "config.json").exists() and (path / "model" / "config.json").exists():
        return str(path / "model")
    return str(path)


def export_model_dir(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "f32",
    tokenizer_dir: str | None = None,
    tokenizer_gguf: str | os.PathLike | None = None,
    check_quants: tuple[str, ...] = (),
) -> ExportReport:
    """``adaptprune export``: check the config, then load the checkpoint (fp32) and its tokenizer and write the GGUF."""
    from ..checkpoint import load_config, load_model, load_tokenizer

    path = resolve_checkpoint(model_dir)
    check_exportable(load_config(path))  # before minutes of loading: SliceGPT, unsupported families
    model = load_model(path)
    tokenizer = None if tokenizer_gguf is not None else load_tokenizer(tokenizer_dir or path)
    return export_gguf(model, tokenizer, out, dtype, tokenizer_gguf, check_quants, name=Path(path).name)
