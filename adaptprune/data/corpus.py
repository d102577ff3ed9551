"""A corpus opened for one run: held-out tokens, per-stage calibration text and this rank's training batches.

``open_corpus`` resolves ``data.corpus`` into streaming ``datasets`` (see ``sources``), so memory
does not grow with the corpus: held-out and calibration text are read only as far as needed,
training batches come from a bounded block shuffle (see ``stream``) whose position is a small
JSON-able dict, so a resumed run continues on exactly the next batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..config import DataConfig
from .sources import CorpusError, Source, resolve
from .stream import TrainStream, tokenize


def open_source(cfg: DataConfig) -> Source:
    """The streaming :class:`Source` of ``cfg.corpus`` (with its config name, text column, held-out size)."""
    return resolve(cfg.corpus, cfg.corpus_config, cfg.text_field, cfg.heldout_docs)


def open_corpus(
    cfg: DataConfig, tokenizer, *, seed: int, rank: int = 0, world_size: int = 1, batch_size: int | None = None
) -> Corpus:
    """Open ``cfg.corpus`` for rank ``rank`` of ``world_size``; with ``batch_size``, also check that the
    train split holds calibration plus one batch (reading no more than that)."""
    corpus = Corpus(open_source(cfg), tokenizer, cfg, seed=seed, rank=rank, world_size=world_size)
    if batch_size is not None:
        corpus.check_size(batch_size)
    return corpus


def heldout_tokens(name_or_cfg: str | DataConfig, tokenizer, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` held-out tokens ``(T,)`` of a corpus (name or DataConfig), documents joined
    by EOS; reads only the documents it needs. For other-domain perplexity (``data.eval_corpora``)."""
    cfg = name_or_cfg if isinstance(name_or_cfg, DataConfig) else DataConfig(corpus=name_or_cfg)
    return _first_tokens(open_source(cfg), tokenizer, max_tokens)


def _first_tokens(source: Source, tokenizer, max_tokens: int) -> torch.Tensor:
    ids: list[int] = []
    for _, doc in tokenize(((None, text) for text in source.heldout_docs()), tokenizer):
        ids.extend(doc)
        if len(ids) >= max_tokens:
            break
    if not ids:
        raise CorpusError(f"the held-out split of corpus '{source.name}' is empty: no tokens")
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


class Corpus:
    """One corpus for one rank. Held-out and calibration text are the same on every rank; training
    batches are this rank's own (disjoint shards or documents)."""

    def __init__(self, source: Source, tokenizer, cfg: DataConfig, *, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.source, self.tokenizer, self.cfg = source, tokenizer, cfg
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # Calibration walks the train split in file order as a cycle: remember where the last one ended.
        self._cursor: tuple[int, tuple[int, int], int] = (0, (0, 0), 0)  # (absolute token, (shard, doc), used)
        self._total: int | None = None  # tokens in one pass over the train split, once a pass was read

    @property
    def name(self) -> str:
        return self.source.name

    def heldout(self, max_tokens: int) -> torch.Tensor:
        """The first ``max_tokens`` tokens ``(T,)`` of the held-out split (never trained or calibrated on)."""
        return _first_tokens(self.source, self.tokenizer, max_tokens)

    def train_batches(
        self, batch_size: int, seq_len: int, state: dict | None = None
    ) -> Iterator[tuple[torch.Tensor, dict]]:
        """Endless shuffled ``(B, L)`` training batches of this rank, each with the (JSON-able) state after it;
        ``state`` given, the batches that would have followed it."""
        stream = TrainStream(
            self.source,
            self.tokenizer,
            seq_len,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            buffer=self.cfg.shuffle_buffer,
        )
        return stream.batches(batch_size, state)

    def calibration(self, stage: int, tokens: int, seq_len: int) -> torch.Tensor:
        """``(N, L)`` calibration sequences for pruning stage ``stage``, N = max(1, tokens // L).

        Stage s reads tokens [s*N*L, (s+1)*N*L) of the train split in file order, taken as a cycle:
        fresh text every stage until the split is used up, identical on every rank, deterministic.
        """
        count = max(1, tokens // seq_len)
        ids = self._cycle_tokens(stage * count * seq_len, count * seq_len)
        return torch.tensor(ids, dtype=torch.long).view(count, seq_len)  # (N, L)

    def check_size(self, batch_size: int) -> None:
        """A CorpusError unless the train split holds ``calib_tokens`` plus one batch (reads only that much)."""
        calib, batch = self.cfg.calib_tokens, batch_size * self.cfg.seq_len
        have = 0
        for _, ids in tokenize(self._train_docs((0, 0)), self.tokenizer):
            have += len(ids)
            if have >= calib + batch:
                return
        raise CorpusError(
            f"corpus '{self.name}' has {have:,} training tokens; calibration needs {calib:,} plus at least one "
            f"batch of {batch:,}"
        )

    def _train_docs(self, start: tuple[int, int]) -> Iterator[tuple[tuple[int, int], str]]:
        """((shard, index), text) of every train document in file order from ``start`` on (all ranks alike)."""
        shard, doc = start
        for s in range(shard, self.source.num_shards):
            for index, text in self.source.docs(s, doc if s == shard else 0):
                yield (s, index), text

    def _cycle_tokens(self, target: int, need: int) -> list[int]:
        """``need`` tokens from absolute token ``target`` of the train split repeated end to end."""
        if self._total is not None:
            self._check_calibration_size(need)
            target %= self._total
        at, key, used = self._cursor if self._cursor[0] <= target else (0, (0, 0), 0)
        out: list[int] = []
        while True:
            for doc_key, ids in tokenize(self._train_docs(key), self.tokenizer):
                base = used if doc_key == key else 0
                ids = ids[base:]  # at = absolute index of ids[0]
                if out or at + len(ids) > target:
                    low = 0 if out else target - at
                    piece = ids[low : low + need - len(out)]
                    out.extend(piece)
                    if len(out) == need:
                        self._cursor = (at + low + len(piece), doc_key, base + low + len(piece))
                        return out
                at += len(ids)
            self._total = at  # a whole pass was read: wrap around
            self._check_calibration_size(need)
            if not out:
                target %= self._total
            at, key, used = 0, (0, 0), 0

    def _check_calibration_size(self, need: int) -> None:
        if self._total < need:
            raise CorpusError(
                f"corpus '{self.name}' has {self._total:,} training tokens; calibration needs {need:,} "
                "(data.calib_tokens rounded down to whole data.seq_len sequences)"
            )
