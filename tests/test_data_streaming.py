"""Streaming corpora: exact resume, disjoint ranks, epochs, held-out slices, calibration, kjv, errors.

The corpora are numbered (see ``data_helpers``): each token id belongs to one document, so every
check on which text went where is exact set arithmetic, not a statistical test.
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from itertools import islice

import pytest
import torch

from adaptprune.config import DataConfig
from adaptprune.data import CorpusError, heldout_tokens, load_corpus, open_corpus, token_stream

from .data_helpers import EOS, natural_stream, numbered_docs, word_tokenizer, words_in, write_jsonl, write_parquet

SEQ = 16  # tokens per packed sequence in these tests


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(40_000)


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory):
    """A train-only jsonl dataset: 4 shards, 46 documents, about 1,000 tokens."""
    docs = numbered_docs([12, 9, 15, 10], seed=1)
    folder = tmp_path_factory.mktemp("four_shards")
    write_jsonl(folder, docs)
    return folder, docs


def _cfg(folder, heldout_docs: int = 4, shuffle_buffer: int = 7, **kw) -> DataConfig:
    return DataConfig(corpus=str(folder), heldout_docs=heldout_docs, shuffle_buffer=shuffle_buffer, **kw)


def _write(folder, docs, row_group: int) -> None:
    """jsonl files (one shard each), or parquet files in row groups of ``row_group`` documents (shards too)."""
    if row_group:
        write_parquet(folder, docs, row_group)
    else:
        write_jsonl(folder, docs)


def _draw(corpus, count: int, batch_size: int = 3, state: dict | None = None) -> list[tuple[torch.Tensor, dict]]:
    """``count`` batches with their states, each state passed through JSON as a checkpoint would."""
    stream = corpus.train_batches(batch_size, SEQ, state)
    return [(batch, json.loads(json.dumps(after))) for batch, after in islice(stream, count)]


# ---- resume, epochs, ranks ------------------------------------------------------------------
@pytest.mark.parametrize(
    "layout, world_size, row_group",
    [([12, 9, 15, 10], 1, 0), ([12, 9, 15, 10], 2, 0), ([10, 20, 16], 2, 0), ([46], 2, 5)],
    ids=["1-rank", "2-ranks-whole-shards", "2-ranks-striding", "2-ranks-parquet-row-groups"],
)
def test_resume_yields_exactly_the_batches_that_would_have_followed(tok, tmp_path, layout, world_size, row_group):
    docs = numbered_docs(layout, seed=1)
    _write(tmp_path, docs, row_group)
    cfg = _cfg(tmp_path)
    for rank in range(world_size):
        reference = _draw(open_corpus(cfg, tok, seed=3, rank=rank, world_size=world_size), 70)
        epochs = [state["epoch"] for _, state in reference]
        boundary = epochs.index(1)  # the first batch drawn (partly) from the second epoch
        assert epochs[-1] >= 2 and len(json.dumps(reference[-1][1])) < 400
        for p in sorted({0, 1, 6, boundary - 1, boundary, boundary + 1, 50}):
            fresh = open_corpus(cfg, tok, seed=3, rank=rank, world_size=world_size)  # as after a restart
            resumed = _draw(fresh, 8, state=reference[p][1])
            for (batch, state), (want, want_state) in zip(resumed, reference[p + 1 : p + 9], strict=True):
                assert torch.equal(batch, want) and state == want_state, (rank, p)


def test_each_epoch_reads_every_training_document_once_in_a_new_order(tok, four_shards):
    folder, docs = four_shards
    by_epoch = defaultdict(list)
    for batch, state in _draw(open_corpus(_cfg(folder), tok, seed=0), 200, batch_size=1):
        by_epoch[state["epoch"]].append(batch)  # with batch_size 1 a state's epoch is its sequence's
    train_words = set(natural_stream(docs, skip_docs=4)) - {EOS}
    for epoch in (0, 1, 2):
        words = words_in(torch.cat(by_epoch[epoch]))
        assert len(words) == len(set(words)), "a document was read twice in one epoch"
        assert len(train_words - set(words)) < SEQ  # only the tail under one sequence is dropped
    orders = [[b.tolist() for b in by_epoch[e]] for e in (0, 1)]
    assert orders[0] != orders[1]


@pytest.mark.parametrize(
    "layout, row_group",
    [([46], 0), ([10, 20, 16], 0), ([12, 9, 15, 10], 0), ([46], 4)],
    ids=["1-shard-striding", "3-shards-striding", "4-shards", "parquet-12-row-groups"],
)
def test_two_ranks_get_disjoint_data_covering_the_train_split(tok, tmp_path, layout, row_group):
    docs = numbered_docs(layout, seed=2)
    _write(tmp_path, docs, row_group)
    seen = []
    for rank in (0, 1):
        corpus = open_corpus(_cfg(tmp_path), tok, seed=5, rank=rank, world_size=2)
        words: list[int] = []
        for batch, state in _draw(corpus, 200, batch_size=1):
            if state["epoch"] > 0:
                break
            words += words_in(batch)
        seen.append(set(words))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    train_words = set(natural_stream(docs, skip_docs=4)) - {EOS}
    assert len(train_words - seen[0] - seen[1]) < 2 * SEQ  # each rank drops at most its epoch's tail


# ---- held-out and calibration ---------------------------------------------------------------
def test_train_only_dataset_reserves_a_heldout_slice_never_trained_or_calibrated_on(tok, four_shards):
    folder, docs = four_shards
    corpus = open_corpus(_cfg(folder, heldout_docs=14), tok, seed=0)  # 14 > 12: spans shards 0 and 1
    held = corpus.heldout(100_000)
    first_14 = natural_stream(docs)[: len(natural_stream(docs)) - len(natural_stream(docs, skip_docs=14))]
    assert held.tolist() == first_14
    trained = {w for batch, _ in _draw(corpus, 60, batch_size=4) for w in words_in(batch)}
    calibrated = {w for stage in range(8) for w in words_in(corpus.calibration(stage, 64, SEQ))}
    assert trained and calibrated
    assert not set(words_in(held)) & trained and not set(words_in(held)) & calibrated
    assert trained == set(natural_stream(docs, skip_docs=14)) - {EOS}  # 3+ epochs read all of the rest


def test_older_helpers_split_a_train_only_dataset_the_same_way(tok, tmp_path):
    docs = numbered_docs([700, 600], seed=4, max_len=5)  # more than the default 1,000 held-out documents
    write_jsonl(tmp_path, docs)
    splits = load_corpus(str(tmp_path))
    held, train = token_stream(splits["heldout"], tok), token_stream(splits["train"], tok)
    assert held.tolist() == natural_stream(docs)[: held.numel()]
    assert train.tolist() == natural_stream(docs, skip_docs=1000)


def test_a_validation_split_is_the_heldout_and_nothing_is_reserved(tok, tmp_path):
    docs = numbered_docs([10, 10], seed=3)
    write_jsonl(tmp_path, docs[:1], "train")
    write_jsonl(tmp_path, docs[1:], "validation")
    corpus = open_corpus(_cfg(tmp_path), tok, seed=0)
    assert corpus.heldout(10_000).tolist() == natural_stream(docs[1:])
    trained = {w for batch, _ in _draw(corpus, 40) for w in words_in(batch)}
    train_words = set(natural_stream(docs[:1])) - {EOS}
    assert trained <= train_words and len(train_words - trained) < SEQ  # one shard: the same tail drops each epoch


def test_text_files_keep_their_heldout_rules_and_compressed_jsonl_streams(tok, tmp_path):
    text = " ".join(f"w{i}" for i in range(1, 400))
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    cut = int(len(text) * 0.9)  # a single file: its last 10% of characters are held out
    corpus = open_corpus(DataConfig(corpus=str(tmp_path / "one.txt"), calib_tokens=64, seq_len=SEQ), tok, seed=0)
    assert corpus.heldout(10_000).tolist() == tok(text[cut:])["input_ids"] + [EOS]
    assert {w for batch, _ in _draw(corpus, 30) for w in words_in(batch)} <= set(tok(text[:cut])["input_ids"])

    folder = tmp_path / "plays"
    folder.mkdir()
    docs = numbered_docs([1] * 20, seed=5)
    for i, shard in enumerate(docs):  # a folder of .txt: the last 10% of the files (sorted) are held out
        (folder / f"{i:02d}.txt").write_text(" ".join(f"w{w}" for w in shard[0]), encoding="utf-8")
    plays = open_corpus(DataConfig(corpus=str(folder)), tok, seed=0)
    assert plays.heldout(10_000).tolist() == natural_stream(docs[18:])

    packed = tmp_path / "packed.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": " ".join(f"w{w}" for w in ids)}) + "\n" for ids in docs[0] + docs[1])
    assert open_corpus(_cfg(packed, heldout_docs=1), tok, seed=0).heldout(100).tolist() == natural_stream(docs[:1])


def test_calibration_is_fresh_per_stage_identical_on_every_rank_and_wraps(tok, four_shards):
    folder, docs = four_shards
    train = natural_stream(docs, skip_docs=4)  # the train split in file order
    rank0 = open_corpus(_cfg(folder), tok, seed=0, rank=0, world_size=2)
    rank1 = open_corpus(_cfg(folder), tok, seed=9, rank=1, world_size=2)
    for stage in [0, 1, 2, 7, 3, 40, 41]:  # out of order, and past the end of the split (wraps)
        got = rank0.calibration(stage, 100, SEQ)  # 100 // 16 = 6 sequences
        want = [train[(stage * 96 + i) % len(train)] for i in range(96)]
        assert got.shape == (6, SEQ) and got.flatten().tolist() == want, stage
        assert torch.equal(rank1.calibration(stage, 100, SEQ), got)
    assert not set(words_in(rank0.calibration(0, 100, SEQ))) & set(words_in(rank0.calibration(1, 100, SEQ)))


def test_shakespeare_through_the_new_and_the_old_helpers_agree():
    from adaptprune.checkpoint import load_tokenizer

    tiny = load_tokenizer("tiny-random-llama")
    assert torch.equal(heldout_tokens("shakespeare", tiny, 3000), token_stream(load_corpus()["heldout"], tiny, 3000))


# ---- the second domain: kjv -----------------------------------------------------------------
def test_kjv_loads_offline_with_every_eighth_book_held_out():
    from adaptprune.assets import kjv_file
    from adaptprune.checkpoint import load_tokenizer
    from adaptprune.data.sources import kjv_chapters

    verses = [json.loads(line) for line in kjv_file().read_text(encoding="utf-8").splitlines()]
    books = list(dict.fromkeys(v["book"] for v in verses))
    held_books = books[7::8]
    chapters = {(v["book"], v["chapter"]) for v in verses}
    train, held = list(kjv_chapters(str(kjv_file()), False)), list(kjv_chapters(str(kjv_file()), True))
    assert (len(verses), len(books), len(chapters), held_books[0]) == (31_103, 66, 1_189, "Ruth")
    assert len(held) == sum(book in held_books for book, _ in chapters) and len(train) + len(held) == 1_189
    assert not {c["text"] for c in train} & {c["text"] for c in held}
    assert sum(c["text"].count("\n") + 1 for c in train + held) == 31_103  # every verse once

    tiny = load_tokenizer("tiny-random-llama")
    tokens = heldout_tokens("kjv", tiny, 2048)
    assert tokens.shape == (2048,) and tiny.decode(tokens[:40]).startswith("Now it came to pass in the days")
    batch, _ = next(open_corpus(DataConfig(corpus="kjv"), tiny, seed=0).train_batches(2, 64))
    assert batch.shape == (2, 64)


# ---- one-line errors ------------------------------------------------------------------------
def _error(cfg: DataConfig, tokenizer, **kw) -> str:
    with pytest.raises(CorpusError) as info:
        open_corpus(cfg, tokenizer, seed=0, **kw)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_missing_unreadable_and_empty_corpora_are_one_line_errors(tok, tmp_path):
    for missing in ["nope.txt", "nope.parquet", "no/such/folder"]:
        assert "does not exist" in _error(DataConfig(corpus=str(tmp_path / missing)), tok)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait")
    assert all(n in _error(DataConfig(corpus=str(tmp_path / "latin1.txt")), tok) for n in ["not UTF-8", "byte 3"])
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    assert "not UTF-8" in _error(DataConfig(corpus=str(tmp_path / "latin1.jsonl")), tok)
    (tmp_path / "blank.txt").write_text("  \n\n ", encoding="utf-8")
    assert "is empty (5 characters" in _error(DataConfig(corpus=str(tmp_path / "blank.txt")), tok)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.jsonl").write_text("", encoding="utf-8")
    assert "is empty" in _error(DataConfig(corpus=str(tmp_path / "empty")), tok)
    (tmp_path / "table.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    assert "unsupported type" in _error(DataConfig(corpus=str(tmp_path / "table.csv")), tok)


def test_hub_name_offline_says_it_needs_network_or_a_local_copy(tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _error(DataConfig(corpus="HuggingFaceFW/fineweb-edu", corpus_config="sample-10BT"), tok)
    assert "network access" in message and "local copy" in message and "fineweb-edu" in message


def test_missing_text_column_names_the_columns_it_has(tok, tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"content": "w1 w2", "id": 0}) + "\n", encoding="utf-8")
    message = _error(DataConfig(corpus=str(tmp_path / "train.jsonl")), tok)
    assert "no column 'text' (data.text_field)" in message and "content, id" in message
    assert _error(DataConfig(corpus=str(tmp_path / "train.jsonl"), text_field="body"), tok).count("content") == 1


def test_too_little_text_for_calibration_plus_a_batch_or_for_the_heldout(tok, four_shards):
    folder, _ = four_shards
    message = _error(_cfg(folder, calib_tokens=4096), tok, batch_size=4)
    assert "training tokens; calibration needs 4,096 plus at least one batch of 1,024" in message  # seq_len 256
    assert "lower data.heldout_docs" in _error(_cfg(folder, heldout_docs=46), tok)


def test_a_saved_position_from_other_settings_is_refused(tok, four_shards):
    folder, _ = four_shards
    _, state = _draw(open_corpus(_cfg(folder), tok, seed=0), 3)[-1]
    with pytest.raises(CorpusError, match=r"shuffle_buffer=7 \(now 8\)"):
        next(open_corpus(_cfg(folder, shuffle_buffer=8), tok, seed=0).train_batches(3, SEQ, state))
