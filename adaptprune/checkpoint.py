"""Loading any supported model as its heterogeneous class, and saving pruned checkpoints.

A saved folder is a standard HF checkpoint: safetensors weights, ``config.json`` with the
per-layer sizes in ``per_layer_config``, the tokenizer, and the family's modeling file with an
``auto_map`` so it also loads with ``trust_remote_code=True`` where adaptprune is absent.
Writes are atomic: a temporary sibling folder is renamed into place when complete.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from .arch import get_adapter, hf_compat
from .assets import embedded_model_dir, is_embedded_model


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be loaded; the message says which file and what to do."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> str:
    """An embedded model name becomes its cached folder, a local folder stays; a hub id is passed through.

    What is clearly meant as a local path (absolute, ``./``, ``../``, ``~``) but is no folder is refused in
    our words, instead of the hub client's "Repo id must use alphanumeric chars".
    """
    if is_embedded_model(name_or_path):
        return str(embedded_model_dir(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_file():
        raise ModelLoadError(f"{name_or_path} is a file, not a model folder (one holding config.json and the weights)")
    if not path.is_dir() and (path.is_absolute() or name_or_path.startswith((".", "~"))):
        raise ModelLoadError(f"no such folder: {name_or_path}")
    return str(path) if path.is_dir() else name_or_path


def model_folder(name_or_path: str) -> str:
    """``resolve_model_path`` of a *model* (not a tokenizer): a local folder must hold config.json."""
    path = resolve_model_path(name_or_path)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise ModelLoadError(f"{name_or_path} is not a model folder: it has no config.json")
    return path


def load_config(name_or_path: str, trust_remote_code: bool = False):
    return AutoConfig.from_pretrained(model_folder(name_or_path), trust_remote_code=trust_remote_code)


def _model_classes(config) -> tuple[type, type]:
    """The (config, model) classes that load ``config``: its family's heterogeneous pair, or the SliceGPT
    baseline's sliced Llama (no family adapter: adaptprune never prunes a sliced model further, but the
    comparison trains and reloads one)."""
    from .arch.hetero_sliced_llama import AdaptSlicedLlamaConfig, AdaptSlicedLlamaForCausalLM

    if config.model_type == AdaptSlicedLlamaConfig.model_type:
        return AdaptSlicedLlamaConfig, AdaptSlicedLlamaForCausalLM
    return get_adapter(config).hetero_classes()  # one clear error for unsupported families


def load_model(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    """Load a causal LM as its family's heterogeneous class (uniform models load unchanged)."""
    path = model_folder(name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    config_cls, model_cls = _model_classes(config)
    if not isinstance(config, config_cls):
        config = get_adapter(config).to_hetero_config(config)
    try:
        model = model_cls.from_pretrained(path, config=config, dtype=DTYPES[dtype], use_safetensors=True)
    except SafetensorError as err:  # a truncated or corrupt weights file
        raise ModelLoadError(
            f"the weights in {path} cannot be read ({err}); the file is truncated or corrupt"
        ) from None
    model.eval()
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer of a model folder or hub id; one line naming what is missing when it cannot load."""
    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, TypeError) as err:
        folder = Path(path)
        if folder.is_dir():
            found = [f for f in TOKENIZER_FILES if (folder / f).exists()]
            raise ModelLoadError(
                f"no usable tokenizer in {folder} (found {', '.join(found) or 'none'} of {', '.join(TOKENIZER_FILES)}); "
                f"copy the tokenizer files there or name another folder with model.tokenizer / --tokenizer"
            ) from None
        raise ModelLoadError(f"cannot load the tokenizer '{name_or_path}': {str(err).splitlines()[0]}") from None


def to_heterogeneous(model: nn.Module) -> nn.Module:
    """An in-memory HF model as its family's heterogeneous class, weights copied exactly."""
    adapter = get_adapter(model)
    config_cls, model_cls = adapter.hetero_classes()
    if isinstance(model, model_cls):
        return model
    config = adapter.to_hetero_config(model.config)
    hetero = model_cls(config).to(dtype=next(model.parameters()).dtype)
    hetero.load_state_dict(model.state_dict())
    hetero.train(model.training)
    return hetero


def modeling_files(model: nn.Module) -> list[Path]:
    """The self-contained source files a checkpoint needs for ``trust_remote_code`` loading."""
    return [Path(inspect.getfile(type(model))), Path(inspect.getfile(hf_compat))]


@contextmanager
def atomic_dir(target: str | os.PathLike):
    """Yield a temporary folder beside ``target``; it replaces ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write a reloadable heterogeneous checkpoint atomically; returns its folder."""
    if getattr(model, "self_contained_checkpoint", False):  # e.g. SliceGPT: its class is the format
        config_cls, model_cls = type(model.config), type(model)
    else:
        model = to_heterogeneous(model)
        config_cls, model_cls = get_adapter(model).hetero_classes()
    files = modeling_files(model)
    module = files[0].stem
    model.config.auto_map = {
        "AutoConfig": f"{module}.{config_cls.__name__}",
        "AutoModelForCausalLM": f"{module}.{model_cls.__name__}",
    }
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for f in files:
            shutil.copyfile(f, tmp / f.name)
    return Path(out_dir)
