"""The one error class of the export package (kept apart so every export module can raise it)."""

from __future__ import annotations


class ExportError(ValueError):
    """A model, tokenizer or request that cannot be written in the asked format; the message says why."""
