"""Documents -> tokens -> packed sequences -> shuffled training batches, resumable exactly.

Each rank reads its own shards: per epoch, a seeded permutation of the train shards is dealt out
round-robin when ``world_size`` divides their number or there are many of them (``split_dataset_by_node``'s
rule, widened to uneven deals of many shards, with a shard order that changes every epoch); else every
rank reads all shards and keeps every ``world_size``-th packed sequence, which works for any number of
documents (a single text file is one). Each rank
tokenizes each document with EOS appended and packs the concatenation into ``seq_len`` sequences
(the tail under ``seq_len`` at the end of an epoch is dropped). Sequences are shuffled in blocks
of ``shuffle_buffer``: a block is read whole, permuted by a generator seeded from
(seed, rank, epoch, block) and emitted. A position is therefore a handful of integers (where the
block began in the document stream and how much of it was emitted), and resuming re-reads at most
one block: no shuffle buffer needs saving (``IterableDataset.state_dict()`` would not save one).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from itertools import islice
from typing import Any

import numpy as np
import torch

from .sources import CorpusError, Source

STATE_VERSION = 1
DOCS_PER_CALL = 8  # at most this many documents per tokenizer call ...
CHARS_PER_CALL = 16_384  # ... and no more once they hold this many characters (reads stay close to need)
MANY_SHARDS = 4  # with at least this many shards per rank, ranks get whole shards even if unevenly


def tokenize(docs: Iterable[tuple[Any, str]], tokenizer) -> Iterator[tuple[Any, list[int]]]:
    """(key, token ids with EOS appended) per document, a few short documents per tokenizer call."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    chunk: list[tuple[Any, str]] = []
    chars = 0
    for key, text in docs:
        chunk.append((key, text))
        chars += len(text)
        if len(chunk) == DOCS_PER_CALL or chars >= CHARS_PER_CALL:
            yield from _encode(chunk, tokenizer, eos)
            chunk, chars = [], 0
    yield from _encode(chunk, tokenizer, eos)


def _encode(chunk: list[tuple[Any, str]], tokenizer, eos: list[int]) -> Iterator[tuple[Any, list[int]]]:
    if chunk:
        ids = tokenizer([text for _, text in chunk], add_special_tokens=False, verbose=False)["input_ids"]
        for (key, _), one in zip(chunk, ids):
            yield key, list(one) + eos


def pack_documents(
    docs: Iterable[tuple[Any, list[int]]], seq_len: int, start: tuple[Any, int] | None = None
) -> Iterator[tuple[torch.Tensor, Any, int]]:
    """Cut the documents' concatenated tokens into ``(seq_len,)`` sequences.

    Yields (sequence, key, used): the next sequence starts at token ``used`` of document ``key``
    (what is left over is always a suffix of the current document). ``start=(key, used)`` drops
    the first ``used`` tokens of document ``key``, continuing from such a position.
    """
    buffer: list[int] = []
    for key, ids in docs:
        if start is not None and key == start[0]:
            buffer.extend(ids[start[1] :])
        else:
            buffer.extend(ids)
        cut = 0
        while len(buffer) - cut >= seq_len:
            sequence = torch.tensor(buffer[cut : cut + seq_len], dtype=torch.long)  # (L,)
            cut += seq_len
            yield sequence, key, len(ids) - (len(buffer) - cut)
        buffer = buffer[cut:]


@dataclass(frozen=True)
class Position:
    """Where a rank's training stream stands: block ``block`` of ``epoch`` began at document ``doc`` of the
    ``slot``-th shard in this epoch's order, at its token ``offset``; ``taken`` of its sequences were used."""

    epoch: int = 0
    block: int = 0
    slot: int = 0
    doc: int = 0
    offset: int = 0
    seq: int = 0  # packed sequences of the whole epoch before (slot, doc, offset), every rank's
    taken: int = 0


class TrainStream:
    """One rank's endless, shuffled stream of packed training sequences, each with the position after it."""

    def __init__(self, source: Source, tokenizer, seq_len: int, *, seed: int, rank: int, world_size: int, buffer: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.seed, self.rank, self.world_size, self.buffer = seed, rank, world_size, buffer

    # ---- this rank's share of an epoch --------------------------------------------------------
    def shard_order(self, epoch: int) -> tuple[list[int], int]:
        """(shards this rank reads in ``epoch``, in order; sequence stride: 1, or world_size when ranks share them)."""
        order = np.random.default_rng([_u32(self.seed), epoch]).permutation(self.source.num_shards).tolist()
        if len(order) % self.world_size == 0 or len(order) >= MANY_SHARDS * self.world_size:
            return order[self.rank :: self.world_size], 1  # whole shards, dealt round-robin
        return order, self.world_size  # few shards that do not split evenly: every world_size-th sequence

    def _packed(self, epoch: int, slot: int, doc: int, offset: int, seq: int) -> Iterator[tuple[torch.Tensor, tuple]]:
        """This rank's packed sequences of ``epoch`` from (slot, doc, offset, seq) on, each with that tuple after it."""
        shards, stride = self.shard_order(epoch)

        def docs() -> Iterator[tuple[tuple[int, int], str]]:
            for s in range(slot, len(shards)):
                for index, text in self.source.docs(shards[s], doc if s == slot else 0):
                    yield (s, index), text

        count = seq
        for sequence, key, used in pack_documents(
            tokenize(docs(), self.tokenizer), self.seq_len, ((slot, doc), offset)
        ):
            count += 1
            if stride == 1 or (count - 1) % stride == self.rank:
                yield sequence, (*key, used, count)

    # ---- shuffled blocks ----------------------------------------------------------------------
    def sequences(self, position: Position) -> Iterator[tuple[torch.Tensor, Position]]:
        """Sequences from ``position`` on, each with the position that resumes right after it."""
        epoch, block, taken = position.epoch, position.block, position.taken
        start = (position.slot, position.doc, position.offset, position.seq)
        while True:
            packed = self._packed(epoch, *start)
            seen = block > 0 or taken > 0 or start != (0, 0, 0, 0)
            while chunk := list(islice(packed, self.buffer)):
                seen = True
                order = np.random.default_rng([_u32(self.seed), self.rank, epoch, block]).permutation(len(chunk))
                after = chunk[-1][1]
                for j in range(taken, len(chunk)):
                    done = j + 1 == len(chunk)
                    next_pos = Position(epoch, block + 1, *after, 0) if done else Position(epoch, block, *start, j + 1)
                    yield chunk[order[j]][0], next_pos
                block, start, taken = block + 1, after, 0
            if not seen:
                raise CorpusError(
                    f"rank {self.rank} of {self.world_size} gets fewer than seq_len={self.seq_len} training tokens "
                    f"from corpus '{self.source.name}' ({self.source.num_shards} shards): use more text or fewer ranks"
                )
            epoch, block, start, taken = epoch + 1, 0, (0, 0, 0, 0), 0

    # ---- batches and their state --------------------------------------------------------------
    def batches(self, batch_size: int, state: dict | None = None) -> Iterator[tuple[torch.Tensor, dict]]:
        """Endless ``(B, L)`` batches from ``state`` on (None: the start), each with the state after it."""
        position, count = self.restore(state)
        sequences = self.sequences(position)
        while True:
            rows = list(islice(sequences, batch_size))
            count += 1
            yield torch.stack([row for row, _ in rows]), self.state(rows[-1][1], count)  # (B, L)

    def state(self, position: Position, batches: int) -> dict:
        """A small JSON-able dict: this stream's settings (checked on restore), its position, batches so far."""
        return {**self._settings(), **asdict(position), "batches": batches}

    def restore(self, state: dict | None) -> tuple[Position, int]:
        """(position, batches) of a saved state; a CorpusError if it was saved with other data settings."""
        if state is None:
            return Position(), 0
        expected = self._settings()
        changed = [f"{k}={state.get(k)!r} (now {v!r})" for k, v in expected.items() if state.get(k) != v]
        if changed:
            raise CorpusError(
                f"the saved data position was made with other data settings: {', '.join(changed)}; resume with the "
                "same data and train settings, or start a fresh run"
            )
        names = [f.name for f in fields(Position)]
        return Position(**{k: int(state.get(k, 0)) for k in names}), int(state.get("batches", 0))

    def _settings(self) -> dict:
        return {
            "version": STATE_VERSION,
            "corpus": self.source.name,
            "shards": self.source.num_shards,
            "seq_len": self.seq_len,
            "shuffle_buffer": self.buffer,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
        }


def _u32(seed: int) -> int:
    """A seed numpy accepts (non-negative), the same for the same config seed."""
    return seed & 0xFFFFFFFF
