"""``adaptprune eval``: perplexity on held-out texts, lm-eval tasks and speed, in one table.

Perplexity uses every given corpus's held-out split with one fixed context and stride and
reports the token count beside it; tasks run offline through ``evaluation.tasks``; speed is
prefill/decode tokens/s, against a baseline model when one is given.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..data import load_corpus, token_stream
from .perplexity import perplexity
from .speed import compare_speed, measure_speed
from .tasks import run_tasks


def heldout_perplexities(
    model: nn.Module, tokenizer, texts: Sequence[str], tokens: int, context: int, stride: int | None = None
) -> dict[str, dict]:
    """{corpus name: {ppl, tokens, context, stride}} on each corpus's held-out split."""
    context = min(context, getattr(model.config, "max_position_embeddings", context))
    out = {}
    for name in texts:
        stream = token_stream(load_corpus(name)["heldout"], tokenizer, tokens)
        out[name] = perplexity(model, stream, context=context, stride=stride).as_dict()
    return out


def evaluate(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    texts: Sequence[str] = ("shakespeare",),
    ppl_tokens: int = 4096,
    context: int = 1024,
    stride: int | None = None,
    speed: bool = False,
    baseline: nn.Module | None = None,
) -> dict:
    """Everything ``adaptprune eval`` reports, as one JSON-able dict."""
    result: dict = {}
    lm_tasks = [t for t in tasks if t != "ppl"]
    if "ppl" in tasks:
        result["perplexity"] = heldout_perplexities(model, tokenizer, texts, ppl_tokens, context, stride)
    if lm_tasks:
        result["tasks"] = run_tasks(model, tokenizer, lm_tasks, limit=limit)
        result["task_limit"] = limit
    if speed:
        result["speed"] = (
            compare_speed(baseline, model, tokenizer) if baseline is not None else measure_speed(model, tokenizer)
        )
    return result


def format_eval(result: dict) -> str:
    """A plain text table of ``evaluate``'s output."""
    lines = []
    for name, p in result.get("perplexity", {}).items():
        lines.append(
            f"ppl[{name}] = {p['ppl']:.3f}  ({p['tokens']:,} tokens, context {p['context']}, stride {p['stride']})"
        )
    for task, metrics in result.get("tasks", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("stderr") and k != "samples")
        lines.append(f"{task:<15} {shown}  (n={metrics.get('samples', '?')})")
    if "speed" in result:
        lines.append(
            "speed: "
            + ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in _flat(result["speed"]).items()
            )
        )
    return "\n".join(lines)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str)):
            out[f"{prefix}{k}"] = v
    return out
