"""The pre-streaming helpers, kept thin for callers not yet moved to :func:`open_corpus`.

``load_corpus`` now returns streaming splits (nothing is read until iterated); ``token_stream``
still joins a whole split into one tensor unless ``max_tokens`` is given, so it is only for small
corpora or bounded reads (compare.py, oneshot.py, evaluation/runner.py, scripts, some tests).
"""

from __future__ import annotations

import torch
from datasets import IterableDatasetDict

from .sources import DEFAULT_CORPUS, CorpusError, resolve


def load_corpus(name: str = DEFAULT_CORPUS) -> IterableDatasetDict:
    """Streaming ``train`` and ``heldout`` splits with a ``text`` column (the held-out never in train)."""
    source = resolve(name)
    if source.heldout is not None:
        return IterableDatasetDict({"train": source.train, "heldout": source.heldout})
    # Reserved held-out documents are the first ones in file order, which an unsharded skip/take also is.
    count = sum(source.reserved.values())
    return IterableDatasetDict({"train": source.train.skip(count), "heldout": source.train.take(count)})


def token_stream(dataset, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """All documents tokenized and joined by EOS into one 1-D LongTensor (cut at max_tokens)."""
    eos = tokenizer.eos_token_id
    pieces: list[int] = []
    for text in dataset["text"]:
        pieces.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            pieces.append(eos)
        if max_tokens is not None and len(pieces) >= max_tokens:
            break
    if not pieces:
        raise CorpusError("the corpus split is empty: no tokens")
    stream = torch.tensor(pieces, dtype=torch.long)
    return stream[:max_tokens] if max_tokens is not None else stream


def pack(stream: torch.Tensor, seq_len: int, num_sequences: int | None = None, offset: int = 0) -> torch.Tensor:
    """Non-overlapping fixed-length sequences ``(N, seq_len)`` cut from the stream."""
    available = (stream.numel() - offset) // seq_len
    wanted = available if num_sequences is None else num_sequences
    if wanted > available or available == 0:
        raise CorpusError(
            f"asked for {wanted} sequences of {seq_len} tokens ({wanted * seq_len:,} tokens) but the text "
            f"has {max(stream.numel() - offset, 0):,} tokens"
        )
    return stream[offset : offset + wanted * seq_len].view(wanted, seq_len)
