"""Text corpora as streaming ``datasets``: held-out tokens, calibration sequences, resumable training batches.

``open_corpus(cfg.data, tokenizer, seed=..., rank=..., world_size=...)`` is the entry point (see
``corpus``); ``sources`` resolves every form of ``data.corpus``, ``stream`` tokenizes, packs,
shuffles and keeps the position. ``load_corpus``/``token_stream``/``pack`` are the older helpers.
"""

from .corpus import Corpus, heldout_tokens, open_corpus, open_source
from .legacy import load_corpus, pack, token_stream
from .sources import DEFAULT_CORPUS, CorpusError, Source
from .stream import Position, TrainStream

__all__ = [
    "DEFAULT_CORPUS",
    "Corpus",
    "CorpusError",
    "Position",
    "Source",
    "TrainStream",
    "heldout_tokens",
    "load_corpus",
    "open_corpus",
    "open_source",
    "pack",
    "token_stream",
]
