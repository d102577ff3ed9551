"""Supported versions of the libraries whose behaviour adaptprune relies on, checked at start.

The ranges are pyproject.toml's pins (``tests/test_compat.py`` keeps the two equal and pins the
behaviours themselves: ``per_layer_config``, ``-1``-head reshapes in attention, peft LoRA on
``nn.Linear``, lm-eval's ``simple_evaluate(task_manager=...)``). A version outside its range is
a one-line warning on stderr, or an ``IncompatibleVersionError`` when
``$ADAPTPRUNE_STRICT_VERSIONS=1``. Only package metadata is read: checking imports nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# distribution name -> supported range (the pins in pyproject.toml)
SUPPORTED: dict[str, str] = {
    "torch": ">=2.4,<2.15",
    "transformers": ">=5.23,<5.24",
    "peft": ">=0.17,<0.22",
    "lm-eval": ">=0.4.9,<0.5",
    "accelerate": ">=1.10,<2",
    "safetensors": ">=0.4,<1",
}
STRICT_ENV = "ADAPTPRUNE_STRICT_VERSIONS"

_checked = False


class IncompatibleVersionError(RuntimeError):
    """An installed library is outside the supported range (strict mode only)."""


def version_problems(
    supported: dict[str, str] = SUPPORTED, installed: Callable[[str], str] = metadata.version
) -> list[str]:
    """One sentence per package that is missing or outside its range (empty when all fit)."""
    problems = []
    for package, spec in supported.items():
        try:
            found = installed(package)
        except metadata.PackageNotFoundError:
            problems.append(f"{package} is not installed; adaptprune supports {package}{spec}")
            continue
        try:
            ok = SpecifierSet(spec).contains(Version(found), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            problems.append(
                f"{package} {found} is installed; adaptprune supports {package}{spec} (pip install '{package}{spec}')"
            )
    return problems


def check_versions(strict: bool | None = None, force: bool = False) -> list[str]:
    """Check once per process; warn on stderr (or raise when strict) and return the problems."""
    global _checked
    if _checked and not force:
        return []
    _checked = True
    strict = os.environ.get(STRICT_ENV, "") == "1" if strict is None else strict
    problems = version_problems()
    if problems and strict:
        raise IncompatibleVersionError("; ".join(problems) + f" (unset {STRICT_ENV} to run anyway)")
    for problem in problems:
        print(f"adaptprune: warning: {problem}", file=sys.stderr)
    return problems


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class PickledWeightsError(ValueError):
    """A model folder whose weights exist only as pickles (``pytorch_model.bin``)."""


def require_safetensors(model_dir: str | os.PathLike) -> None:
    """Refuse a local model folder without ``*.safetensors`` weights: loading a pickle runs code.

    Hub ids and embedded names pass (embedded models are converted to safetensors).
    """
    from pathlib import Path

    folder = Path(model_dir)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PickledWeightsError(
            f"model folder {folder} has only pickled weights ({', '.join(pickles)}); adaptprune loads safetensors "
            f"only. If you trust the file, convert it once: load it with transformers and save_pretrained() "
            f"to a new folder (writes model.safetensors)"
        )


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in backward (non-reentrant). transformers 5.23 renamed
    ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old name warns)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX). Without it PyTorch emulates
    bf16 and autocast is far slower than fp32 (measured here on an AVX2-only AMD EPYC: about 5 vs
    60-100 training tokens/s). Uses torch's private probes; unknown (other torch builds) counts as yes."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [p for p in probes if callable(p)]
    return not probes or any(p() for p in probes)


@contextmanager
def one_gguf_parse() -> Iterator[None]:
    """Within the block, every ``gguf.GGUFReader`` of one file is the same reader.

    ``from_pretrained(gguf_file=...)`` parses the file's metadata three times (config, weights,
    tokenizer), and gguf's reader walks a 262k-token vocabulary element by element in Python:
    about 25 s per parse for Gemma-3-270M. transformers 5.23 imports the reader inside
    ``load_gguf_checkpoint`` at call time, so replacing the module attribute reaches it.
    """
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def shared_reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original
