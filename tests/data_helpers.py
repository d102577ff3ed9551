"""Numbered corpora for the streaming-data tests: every word is its own token, so checks are exact.

Word ``w{i}`` is token ``i`` (0 is EOS) and each document holds a run of words no other document
has, so a token id names the one document it came from: overlap, coverage and order of training,
calibration and held-out text are checked by content with set arithmetic.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS = 0
Docs = list[list[list[int]]]  # shard -> document -> token ids (without EOS)


def word_tokenizer(words: int) -> PreTrainedTokenizerFast:
    """A fast word-level tokenizer of ``w1 .. w{words}`` (ids 1..words) with EOS id 0."""
    vocab = {"<eos>": EOS, **{f"w{i}": i for i in range(1, words + 1)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<eos>")


def numbered_docs(doc_counts: list[int], seed: int = 0, min_len: int = 3, max_len: int = 40) -> Docs:
    """Shards of documents with consecutive, never repeated word ids and random lengths."""
    rng = np.random.default_rng(seed)
    shards, next_id = [], 1
    for count in doc_counts:
        shard = []
        for _ in range(count):
            length = int(rng.integers(min_len, max_len + 1))
            shard.append(list(range(next_id, next_id + length)))
            next_id += length
        shards.append(shard)
    return shards


def write_jsonl(folder: Path, docs: Docs, split: str = "train", extra: bool = True) -> list[Path]:
    """One ``{split}-NNNNN.jsonl`` file per shard (``text`` plus an unrelated ``id`` column)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, shard in enumerate(docs):
        path = folder / f"{split}-{s:05d}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for d, ids in enumerate(shard):
                row = {"text": " ".join(f"w{i}" for i in ids), **({"id": d} if extra else {})}
                f.write(json.dumps(row) + "\n")
        paths.append(path)
    return paths


def write_parquet(folder: Path, docs: Docs, row_group_size: int) -> list[Path]:
    """One ``train-NNNNN.parquet`` file per shard, in row groups (which become shards when read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, shard in enumerate(docs):
        path = folder / f"train-{s:05d}.parquet"
        table = pa.table({"text": [" ".join(f"w{i}" for i in ids) for ids in shard], "id": list(range(len(shard)))})
        pq.write_table(table, path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def words_in(tensor: torch.Tensor) -> list[int]:
    """Token ids of a tensor other than EOS."""
    return [t for t in tensor.flatten().tolist() if t != EOS]


def natural_stream(docs: Docs, skip_docs: int = 0) -> list[int]:
    """The train split's tokens in file order (documents + EOS), after the first ``skip_docs`` documents."""
    flat = [ids for shard in docs for ids in shard][skip_docs:]
    return [t for ids in flat for t in [*ids, EOS]]
