"""Everything a run checks before it writes or trains: model, adapter, tokenizer, target, disk, output.

A doomed run must fail in seconds with one line, before hours of work and without leaving a
trace in ``output.dir``. ``preflight`` returns what the checks had to load anyway (the dense model,
its tokenizer and adapter, the stage targets), so the controller loads nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..arch import ArchAdapter, get_adapter
from ..checkpoint import load_config as load_model_config
from ..checkpoint import load_model, load_tokenizer, meta_model, resolve_model_path
from ..compat import require_safetensors
from ..config import RunConfig
from ..pruning.shape.target import ModelShape, ShapeWalk
from ..pruning.surgery import count_parameters
from .feasibility import size_run
from .rundir import RunDir
from .schedule import stage_targets


@dataclass
class Prepared:
    """The checked inputs of a run."""

    dense: nn.Module
    tokenizer: object
    adapter: ArchAdapter
    original: int  # parameters of the dense model
    target: int  # parameters after the last stage
    targets: list[int]  # parameters after each stage
    walk: ShapeWalk | None = None  # prune.target_shape: the shape of every stage
    candidates: list[ModelShape] | None = None  # prune.target_shape=search: the shapes to probe before stage 1


def preflight(cfg: RunConfig, run_dir: RunDir, resume: bool, dense: nn.Module | None = None) -> Prepared:
    """Check the run's inputs in order of cost; nothing is written. ``dense``: the model, if already loaded.

    The target is checked on the meta device (``feasibility``) before the tokenizer or any weights load."""
    run_dir.check(resume)
    model_cfg = cfg.model
    require_safetensors(resolve_model_path(model_cfg.name))
    hf_config = load_model_config(model_cfg.name, trust_remote_code=model_cfg.trust_remote_code)
    get_adapter(hf_config).check_geometry(hf_config)
    sizing = size_run(cfg, *(meta_model(hf_config) if dense is None else (dense, None)))
    tokenizer = load_tokenizer(model_cfg.tokenizer or model_cfg.name, trust_remote_code=model_cfg.trust_remote_code)
    if dense is None:
        dense = load_model(model_cfg.name, dtype=model_cfg.dtype, trust_remote_code=model_cfg.trust_remote_code)
    adapter = get_adapter(dense)
    original = count_parameters(dense)
    targets = stage_targets(original, sizing.target, max(1, round(cfg.prune.step_fraction * original)))
    run_dir.check_disk(checkpoint_bytes(dense))
    return Prepared(dense, tokenizer, adapter, original, sizing.target, targets, sizing.walk, sizing.candidates)


def checkpoint_bytes(model: nn.Module) -> int:
    """Disk one stage checkpoint needs: the model, AdamW's two moments... as model + optimizer + a temp copy."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters())


def load_teacher(cfg: RunConfig, device) -> nn.Module | None:
    """The frozen unpruned model a distilling trainer learns from (None when the trainer needs none)."""
    from trainers import get_trainer

    if not get_trainer(cfg.train.trainer).needs_teacher:
        return None
    from trainers.distill import resolved_teacher_dtype

    m = cfg.model
    dtype = resolved_teacher_dtype(cfg.train.distill.teacher_dtype, m.dtype, device)
    teacher = load_model(m.name, dtype=dtype, trust_remote_code=m.trust_remote_code)
    return teacher.to(device).eval().requires_grad_(False)
