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
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from .arch import CHECKPOINT_CLASSES, ArchAdapter, get_adapter, hf_compat
from .assets import EMBEDDED_MODELS, RANDOM_MODELS, cache_root, embedded_model_dir, is_embedded_model, package_dir
from .config import ConfigError, ModelConfig


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
    """The (config, model) classes that load ``config``: a registered checkpoint class of no family (the
    SliceGPT baseline's sliced Llama: the comparison trains and reloads one), else its family's pair."""
    if config.model_type in CHECKPOINT_CLASSES:
        return CHECKPOINT_CLASSES[config.model_type]
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


# ---- a model without its weights (plan, target shapes) -----------------------------------------
SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


def shipped_config_dir(name: str) -> Path | None:
    """``configs/models/<org>--<name>`` when it holds a ``config.json`` for hub id ``name``."""
    folder = SHIPPED_CONFIGS / name.replace("/", "--")
    return folder if (folder / "config.json").is_file() else None


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub's host accepts a connection: one quick probe instead of the hub client's retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def read_model_config(model: ModelConfig) -> tuple[PretrainedConfig, str]:
    """(the model's HF config, where it came from), reading no weights.

    Found the way a run would (embedded name, local folder, hub id); a hub id it cannot reach falls back
    to the copy shipped in ``configs/models/<org>--<name>/config.json``. Only the dry run and target
    shapes use that fallback: a real run still needs the weights.
    """
    name, remote = model.name, model.trust_remote_code
    key = name.lower()
    if key in RANDOM_MODELS:
        values = dict(RANDOM_MODELS[key])
        return AutoConfig.for_model(values.pop("model_type"), **values), f"embedded {key} (built from its config)"
    if key in EMBEDDED_MODELS:
        cached = cache_root() / "models" / key
        if (cached / "config.json").is_file():
            return AutoConfig.from_pretrained(cached), f"embedded {key} ({cached}/config.json)"
        asset = EMBEDDED_MODELS[key]  # not converted yet: the GGUF header has the config
        folder = package_dir(asset.package, asset.pip_name)
        return AutoConfig.from_pretrained(folder, gguf_file=asset.filename), f"embedded {key} (GGUF header)"
    if Path(name).is_dir():
        return AutoConfig.from_pretrained(name, trust_remote_code=remote), f"{name}/config.json"
    online = hub_reachable()
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=remote, local_files_only=not online)
        return config, f"hub {name}" if online else f"hub {name} (local cache)"
    except (OSError, ValueError) as err:
        shipped = shipped_config_dir(name)
        if shipped is None:
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"model.name={name!r}: cannot read its config.json from the hub ({why}) and no copy is shipped "
                f"as {SHIPPED_CONFIGS.name}/{name.replace('/', '--')}/config.json; name a local folder instead"
            ) from None
        shown = shipped.relative_to(SHIPPED_CONFIGS.parents[1])
        return AutoConfig.from_pretrained(shipped), f"{shown}/config.json, shipped copy (hub not reachable)"


def meta_model(config: PretrainedConfig) -> tuple[nn.Module, ArchAdapter]:
    """The family's heterogeneous class (what ``load_model`` builds) on the meta device: shapes, no memory."""
    adapter = get_adapter(config)
    adapter.check_geometry(config)
    config_cls, model_cls = adapter.hetero_classes()
    if not isinstance(config, config_cls):
        config = adapter.to_hetero_config(config)
    with torch.device("meta"):
        model = model_cls(config)
    return model, adapter
