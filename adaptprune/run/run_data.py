"""The text a run reads: training batches, calibration sequences and held-out streams, resumable.

The controller sees only this interface; ``adaptprune.data`` does the streaming, tokenising and
packing. Positions are small JSON-able dicts stored in every stage checkpoint: the training
stream's per rank, the calibration stream's once (it is the same on every rank).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..config import RunConfig
from ..data import Corpus, heldout_tokens, open_corpus


class TrainBatches:
    """This rank's endless training batches; ``state()`` is the position after the last one yielded."""

    def __init__(self, stream: Iterator[tuple[torch.Tensor, dict]], state: dict) -> None:
        self.stream, self.last = stream, state

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch, state in self.stream:
            self.last = state
            yield batch  # (B, L)

    def state(self) -> dict:
        return self.last


class CalibrationChunks:
    """Fresh calibration sequences per call: chunk c is the c-th ``calib_tokens`` of the train split.

    Stage s starts at chunk s (or after the chunks earlier stages used, when a stage draws several,
    e.g. one per inner pruning step), so no text is calibrated on twice until the split is used up.
    """

    def __init__(self, corpus: Corpus, cfg: RunConfig, stage: int, state: dict) -> None:
        self.corpus, self.tokens, self.seq_len = corpus, cfg.data.calib_tokens, cfg.data.seq_len
        self.chunk = max(stage, state.get("next_chunk", 0))

    def next(self) -> torch.Tensor:
        sequences = self.corpus.calibration(self.chunk, self.tokens, self.seq_len)  # (N, L)
        self.chunk += 1
        return sequences

    def state(self) -> dict:
        return {"next_chunk": self.chunk}


class RunData:
    """Training, calibration and held-out text of one run, for rank ``rank`` of ``world_size``."""

    def __init__(self, cfg: RunConfig, tokenizer, rank: int = 0, world_size: int = 1) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.corpus = open_corpus(
            cfg.data, tokenizer, seed=cfg.train.seed, rank=rank, world_size=world_size,
            batch_size=cfg.train.batch_size,
        )  # fmt: skip
        self._train: TrainBatches | None = None

    def heldout_texts(self, max_tokens: int) -> dict[str, torch.Tensor]:
        """{text name: 1-D held-out token stream}: the calibration domain first, then ``data.eval_corpora``."""
        return heldout_texts(self.cfg, self.tokenizer, self.corpus, max_tokens)

    def calibration_source(self, stage: int, state: dict) -> CalibrationChunks:
        return CalibrationChunks(self.corpus, self.cfg, stage, state)

    def train_batches(self, batch_size: int, seq_len: int, state: dict) -> TrainBatches:
        """Batches from ``state`` on. One stream serves consecutive phases (re-opening one from a
        state re-reads up to one shuffle block), so a new stream is opened only after a restore."""
        if self._train is None or self._train.state() != state:
            self._train = TrainBatches(self.corpus.train_batches(batch_size, seq_len, state or None), state)
        return self._train


def heldout_texts(cfg: RunConfig, tokenizer, corpus: Corpus | None = None, max_tokens: int | None = None) -> dict:
    """{name: held-out tokens} of the calibration domain and every ``data.eval_corpora`` text."""
    max_tokens = max_tokens or cfg.data.eval_tokens
    corpus = corpus or open_corpus(cfg.data, tokenizer, seed=cfg.train.seed)
    texts = {cfg.data.corpus: corpus.heldout(max_tokens)}
    for name in cfg.data.eval_corpora:
        if name not in texts:
            texts[name] = heldout_tokens(name, tokenizer, max_tokens)
    return texts


def shared_calibration(cfg: RunConfig, tokenizer) -> torch.Tensor:
    """(N, L) calibration sequences from the start of the train split: one set every method shares."""
    corpus = open_corpus(cfg.data, tokenizer, seed=cfg.train.seed)
    return corpus.calibration(0, cfg.data.calib_tokens, cfg.data.seq_len)


def training_chunks(cfg: RunConfig, tokenizer) -> Callable[[], torch.Tensor]:
    """Successive (N, L) calibration chunks from the start of the train split, for a run without a RunData."""
    return CalibrationChunks(open_corpus(cfg.data, tokenizer, seed=cfg.train.seed), cfg, 0, {}).next


def gather_rank_states(mine: dict, num_processes: int) -> dict:
    """Every rank's training-stream position, keyed by rank (the main process writes the checkpoint).

    A collective under DDP/FSDP: every rank calls it with its own position."""
    if num_processes == 1:
        return {"0": mine}
    from accelerate.utils import gather_object

    return {str(rank): state for rank, state in enumerate(gather_object([mine]))}
