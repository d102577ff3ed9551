"""Peak memory of the streaming path does not grow with the corpus (21M tokens vs a tenth of that).

Each corpus is opened in a fresh subprocess that checks the size, reads held-out text, calibrates
three stages and draws 20 training batches with the embedded tiny model's BPE, then reports its
peak RSS; the two peaks must agree within a small margin. The older path tokenized a whole train
split into one Python list: about 1 GB for 21M tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from adaptprune.checkpoint import load_tokenizer

SHARDS = 10  # the large corpus; the small one is its first shard
DOCS, WORDS = 400, 1000  # per shard and per document: about 2.2M tiny-BPE tokens a shard
MARGIN_MB = 48

PROBE = r"""
import json, resource, sys
from itertools import islice
from adaptprune.checkpoint import load_tokenizer
from adaptprune.config import DataConfig
from adaptprune.data import open_corpus

tok = load_tokenizer("tiny-random-llama")
cfg = DataConfig(corpus=sys.argv[1], heldout_docs=20)
corpus = open_corpus(cfg, tok, seed=0, batch_size=4)
held = corpus.heldout(cfg.eval_tokens)
calibration = [corpus.calibration(stage, cfg.calib_tokens, cfg.seq_len) for stage in (0, 1, 5)]
batches = [batch for batch, _ in islice(corpus.train_batches(4, cfg.seq_len), 20)]
assert held.numel() == cfg.eval_tokens and len(batches) == 20 and batches[-1].shape == (4, cfg.seq_len)
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _write_shards(folder: Path, shards: int, seed: int = 0) -> int:
    """Parquet shards of random lowercase words; returns the number of characters written."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = np.array(["".join(rng.choice(letters, size=k)) for k in rng.integers(2, 10, size=4096)])
    folder.mkdir(parents=True)
    chars = 0
    for s in range(shards):
        texts = [" ".join(vocab[row]) for row in rng.integers(0, len(vocab), size=(DOCS, WORDS))]
        pq.write_table(pa.table({"text": texts}), folder / f"train-{s:05d}.parquet", row_group_size=64)
        chars += sum(map(len, texts))
    return chars


def _peak_mb(corpus: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(corpus)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    large = tmp_path / "large"
    chars = _write_shards(large, SHARDS)
    small = tmp_path / "small"
    small.mkdir()
    shutil.copy(large / "train-00000.parquet", small)

    tok = load_tokenizer("tiny-random-llama")
    sample = pq.read_table(large / "train-00000.parquet").column("text").to_pylist()[:40]
    per_char = sum(len(ids) for ids in tok(sample, add_special_tokens=False)["input_ids"]) / sum(map(len, sample))
    assert chars * per_char >= 20e6, f"the large corpus has only about {chars * per_char:,.0f} tokens"

    peak_small, peak_large = _peak_mb(small), _peak_mb(large)
    print(
        f"peak RSS: {peak_small:.0f} MB for ~{chars * per_char / SHARDS / 1e6:.1f}M tokens, "
        f"{peak_large:.0f} MB for ~{chars * per_char / 1e6:.1f}M tokens"
    )
    assert peak_large <= peak_small + MARGIN_MB, (peak_small, peak_large)
