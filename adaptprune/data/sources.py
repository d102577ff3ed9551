"""Where a corpus's documents come from: every form of ``data.corpus`` as streaming ``datasets``.

A :class:`Source` holds the train split as an ``IterableDataset`` whose shards (files, or parts of
them) are read in order, and the held-out documents: the corpus's own held-out split (every 8th
Shakespeare play or KJV book, a validation/test split, the last 10% of a text file or of a
folder's files) or, for a dataset with only a train split, its first ``data.heldout_docs``
documents, which the train iteration then skips. Nothing is read whole: documents stream.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Features, IterableDataset, IterableDatasetDict, Value, load_dataset

from ..assets import is_heldout_part, kjv_file, shakespeare_files

DEFAULT_CORPUS = "shakespeare"
TEXT_SUFFIXES = (".txt", ".md")
DATA_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
HELDOUT_SPLITS = ("validation", "test")  # a corpus's own held-out split, first found wins
RESHARD_BELOW = 1024  # fewer train shards than this: parquet is split into row groups (finer shuffling, resume)
ROWS_PER_READ = 64  # documents converted to Python per read


class CorpusError(ValueError):
    """A corpus that cannot serve the request (missing, empty, too short, not UTF-8); one line for the user."""


@dataclass
class Source:
    """A corpus's train shards and held-out documents, as streaming datasets with one text column."""

    name: str
    train: IterableDataset
    heldout: IterableDataset | None  # None: the held-out documents are the reserved head of ``train``
    text_field: str = "text"
    reserved: dict[int, int] = field(default_factory=dict)  # shard -> its leading documents held out

    @property
    def num_shards(self) -> int:
        return self.train.num_shards

    def docs(self, shard: int, start: int = 0, stride: int = 1, phase: int = 0) -> Iterator[tuple[int, str]]:
        """(index in the shard, text) of train shard ``shard`` from document ``start`` on, held-out ones skipped.

        With ``stride`` > 1 only documents whose index is ``phase`` modulo ``stride`` are kept (one
        rank's share when the ranks cannot split whole shards evenly).
        """
        first = max(start, self.reserved.get(shard, 0))
        yield from _rows(self.shard(shard), self.text_field, self.name, first, None, stride, phase)

    def heldout_docs(self) -> Iterator[str]:
        """The held-out documents in order; never part of :meth:`docs`."""
        if self.heldout is not None:
            parts = [(self.heldout, None)]
        else:
            parts = [(self.shard(shard), count) for shard, count in sorted(self.reserved.items())]
        for dataset, stop in parts:
            for _, text in _rows(dataset, self.text_field, self.name, 0, stop):
                yield text

    def shard(self, shard: int) -> IterableDataset:
        """Train shard ``shard`` alone (a file, or part of one), reserved documents included."""
        return self.train if self.num_shards == 1 else self.train.shard(self.num_shards, shard)


def _rows(
    dataset: IterableDataset,
    text_field: str,
    name: str,
    start: int = 0,
    stop: int | None = None,
    stride: int = 1,
    phase: int = 0,
) -> Iterator[tuple[int, str]]:
    """(index, text) of rows ``[start, stop)`` whose index is ``phase`` mod ``stride``; empty texts are skipped."""
    index = start
    part = dataset.skip(start) if start else dataset
    try:
        for batch in part.iter(batch_size=ROWS_PER_READ):
            for text in batch[text_field]:
                if stop is not None and index >= stop:
                    return
                if index % stride == phase and text:
                    if not isinstance(text, str):
                        raise CorpusError(
                            f"column '{text_field}' of corpus '{name}' holds {type(text).__name__} values, not text; "
                            "set data.text_field to a text column"
                        )
                    yield index, text
                index += 1
    except UnicodeDecodeError as err:
        raise _not_utf8(name, err) from None


# ---- data.corpus -> Source ------------------------------------------------------------------
def resolve(name: str, corpus_config: str = "", text_field: str = "text", heldout_docs: int = 1000) -> Source:
    """The :class:`Source` of a ``data.corpus`` value; a :class:`CorpusError` line for anything unusable."""
    try:
        return _resolve(name, corpus_config, text_field, heldout_docs)
    except UnicodeDecodeError as err:  # datasets reading a json/text data file while inferring its columns
        raise _not_utf8(name, err) from None


def _not_utf8(name: str, err: UnicodeDecodeError) -> CorpusError:
    return CorpusError(f"corpus '{name}' is not UTF-8 text ({err.reason}); convert it, e.g. iconv -t utf-8")


def _resolve(name: str, corpus_config: str, text_field: str, heldout_docs: int) -> Source:
    if name == DEFAULT_CORPUS:
        train, heldout = shakespeare_files()
        return _text_files(name, train, heldout)
    if name == "kjv":
        return _kjv()
    path = Path(name).expanduser()
    if path.is_dir():
        return _folder(path, corpus_config, text_field, heldout_docs)
    if path.is_file():
        if path.suffix in TEXT_SUFFIXES:
            return _single_text_file(path)
        if _builder(path) is None:
            raise CorpusError(
                f"corpus file {path} has an unsupported type; use .txt/.md text or .parquet/.jsonl/.json/.arrow data"
            )
        splits = _load(f"corpus file {path}", _builder(path), data_files={"train": [str(path)]})
        return _from_splits(str(path), splits, text_field, heldout_docs)
    if _looks_like_path(name, path):
        kind = "file" if path.suffix else "folder"
        raise CorpusError(f"corpus {kind} {path} does not exist")
    try:
        splits = load_dataset(name, corpus_config or None, streaming=True)
    except Exception as err:  # offline, a typo, a missing config name, ...
        raise CorpusError(
            f"corpus '{name}' is not an embedded corpus ('{DEFAULT_CORPUS}', 'kjv') nor a local file or folder, and "
            f"the datasets hub could not load it ({_first_line(err)}); a hub dataset needs network access, "
            "otherwise give a local copy (a folder of its parquet/jsonl files)"
        ) from None
    return _from_splits(name, splits, text_field, heldout_docs)


def _looks_like_path(name: str, path: Path) -> bool:
    known = path.suffix in TEXT_SUFFIXES or _builder(path) is not None
    return known or name.startswith(("/", "./", "../", "~")) or ("/" in name and path.parent.exists())


def _builder(path: Path) -> str | None:
    """The ``datasets`` builder of a data file by its suffix (``.jsonl.gz`` is json), else None."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return DATA_BUILDERS.get(suffixes[-1]) if suffixes else None


def _load(what: str, *args, **kwargs) -> IterableDatasetDict:
    try:
        return load_dataset(*args, streaming=True, **kwargs)
    except UnicodeDecodeError:
        raise
    except StopIteration:  # datasets found no row to infer the features from
        raise CorpusError(f"{what} is empty: datasets found no rows in it") from None
    except Exception as err:  # a corrupt file, mixed schemas, a bad config name, ...
        raise CorpusError(f"{what} could not be read by datasets: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def _from_splits(name: str, splits: IterableDatasetDict, text_field: str, heldout_docs: int) -> Source:
    """A dataset's train split, and its validation/test split or else a reserved head of train as held-out."""
    if "train" not in splits:
        raise CorpusError(f"corpus '{name}' has no 'train' split; it has: {', '.join(splits)}")
    train = splits["train"]
    if train.num_shards < RESHARD_BELOW:
        train = train.reshard()  # parquet: one shard per row group, same row order; other formats unchanged
    train = _text_column(train, name, text_field, "train")
    held = next((s for s in HELDOUT_SPLITS if s in splits), None)
    if held is not None:
        return Source(name, train, _text_column(splits[held], name, text_field, held), text_field)
    source = Source(name, train, None, text_field)
    source.reserved = _reserve(source, heldout_docs)
    return source


def _text_column(dataset: IterableDataset, name: str, text_field: str, split: str) -> IterableDataset:
    columns = dataset.column_names
    if columns is None:  # features unknown until read (some json files): look at the first row
        first = next(iter(dataset.take(1)), None)
        columns = list(first) if first is not None else []
    if not columns:
        raise CorpusError(f"corpus '{name}' is empty: its {split} split has no documents")
    if text_field not in columns:
        raise CorpusError(
            f"corpus '{name}' has no column '{text_field}' (data.text_field); its columns are: {', '.join(columns)}"
        )
    return dataset.select_columns([text_field])


def _reserve(source: Source, count: int) -> dict[int, int]:
    """Shard -> leading documents held out, so that the first ``count`` documents of train are held out."""
    reserved: dict[int, int] = {}
    left = count
    for shard in range(source.num_shards):
        seen = 0
        for batch in source.shard(shard).iter(batch_size=max(ROWS_PER_READ, min(left + 1, 4096))):
            seen += len(batch[source.text_field])
            if seen > left:
                break
        if min(seen, left):
            reserved[shard] = min(seen, left)
        if seen > left:  # documents remain for training
            return reserved
        left -= seen
    total = count - left
    if total == 0:
        raise CorpusError(f"corpus '{source.name}' is empty: its train split has no documents")
    raise CorpusError(
        f"corpus '{source.name}' has only {total:,} documents and no validation/test split; "
        f"data.heldout_docs={count:,} would hold out all of them: lower data.heldout_docs"
    )


# ---- text files and the embedded corpora ----------------------------------------------------
def _folder(path: Path, corpus_config: str, text_field: str, heldout_docs: int) -> Source:
    """A folder of parquet/jsonl/arrow files (splits inferred by datasets) or else of .txt/.md documents."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
    if any(_builder(p) for p in files):
        splits = _load(f"corpus folder {path}", str(path), corpus_config or None)
        return _from_splits(str(path), splits, text_field, heldout_docs)
    texts = [p for p in files if p.suffix in TEXT_SUFFIXES]
    if len(texts) < 2:
        raise CorpusError(
            f"corpus folder {path} needs parquet/jsonl/arrow files or at least 2 .txt/.md files (1 is held out); "
            f"found {len(texts)}"
        )
    cut = max(1, len(texts) // 10)  # the last 10% of the files (sorted by path) are held out
    return _text_files(str(path), texts[:-cut], texts[-cut:])


def _hidden(relative: Path) -> bool:
    return any(part.startswith((".", "__")) for part in relative.parts)


def _text_files(name: str, train: list[Path], heldout: list[Path]) -> Source:
    """Each text file one document (one shard each)."""
    for path in [*train, *heldout]:
        _check_text_file(path)
    splits = load_dataset(
        "text",
        data_files={"train": [str(p) for p in train], "heldout": [str(p) for p in heldout]},
        sample_by="document",
        streaming=True,
    )
    return Source(name, splits["train"], splits["heldout"])


def _single_text_file(path: Path) -> Source:
    """One text file, one document: its first 90% of characters train, the last 10% are held out."""
    characters, has_text = _check_text_file(path)
    if not has_text:
        raise CorpusError(f"corpus file {path} is empty ({characters} characters, none but whitespace)")
    document = load_dataset("text", data_files={"train": [str(path)]}, sample_by="document", streaming=True)["train"]
    return Source(str(path), document.map(_head_of_text), document.map(_tail_of_text))


def _head_of_text(row: dict) -> dict:
    return {"text": row["text"][: int(len(row["text"]) * 0.9)]}


def _tail_of_text(row: dict) -> dict:
    return {"text": row["text"][int(len(row["text"]) * 0.9) :]}


def _check_text_file(path: Path) -> tuple[int, bool]:
    """(characters, whether any is not whitespace) of a UTF-8 text file read in 1 MiB blocks; else a CorpusError."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, characters, has_text = 0, 0, False
    with path.open("rb") as f:
        while True:
            block = f.read(1 << 20)
            pending = len(decoder.getstate()[0])  # undecoded bytes carried over from the previous block
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                raise CorpusError(
                    f"{path} is not UTF-8 text (byte {offset - pending + err.start}); convert it, e.g. iconv -t utf-8"
                ) from None
            characters += len(text)
            has_text = has_text or (bool(text) and not text.isspace())
            offset += len(block)
            if not block:
                return characters, has_text


def _kjv() -> Source:
    """The King James Bible: one document per chapter, every 8th book (canonical order) held out."""
    path = os.fspath(kjv_file())
    features = Features({"text": Value("string")})
    train = IterableDataset.from_generator(kjv_chapters, gen_kwargs={"path": path, "heldout": False}, features=features)
    held = IterableDataset.from_generator(kjv_chapters, gen_kwargs={"path": path, "heldout": True}, features=features)
    return Source("kjv", train, held)


def kjv_chapters(path: str, heldout: bool) -> Iterator[dict]:
    """Chapters (verses joined by newlines) of the held-out books, or of the others, in canonical order."""
    verses = load_dataset("json", data_files=path, split="train", streaming=True)
    book, chapter, lines, book_index = None, None, [], -1
    for batch in verses.select_columns(["book", "chapter", "text"]).iter(batch_size=1000):
        for b, c, text in zip(batch["book"], batch["chapter"], batch["text"]):
            if (b, c) != (book, chapter):
                if lines and is_heldout_part(book_index) == heldout:
                    yield {"text": "\n".join(lines)}
                book_index += b != book
                book, chapter, lines = b, c, []
            lines.append(text)
    if lines and is_heldout_part(book_index) == heldout:
        yield {"text": "\n".join(lines)}
