"""Tokenizer metadata for a GGUF file: from a Hugging Face byte-level BPE, or copied from a GGUF.

llama.cpp's ``gpt2`` tokenizer model is a byte-level BPE: the vocabulary, the merges, a type per
token and a *pre-tokenizer name* (``tokenizer.ggml.pre``) that selects the regular expressions
splitting text before BPE (``llama-vocab.cpp``). The name is read off the ``tokenizer.json``
pre-tokenizer, so llama.cpp splits text exactly as the checkpoint's own tokenizer does; a layout
without a known llama.cpp counterpart is refused rather than guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGUFReader, GGUFValueType, GGUFWriter, TokenType

from .errors import ExportError

# tokenizer.json regexes of the Split pre-tokenizers llama.cpp knows (byte-level BPE after them).
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
SPECIAL_IDS = ("bos", "eos", "unk", "pad")


@dataclass
class TokenizerMeta:
    """What llama.cpp needs to tokenize like the checkpoint: one entry per embedding row."""

    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]  # gguf.TokenType per token
    merges: list[str]  # "left right", in rank order
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def write(self, writer: GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a ``tokenizer.json`` pre-tokenizer (its regexes split text the same way)."""
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    kinds = [(s or {}).get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is not None and kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"  # single digits, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        name = SPLIT_NAMES.get(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise ExportError(
        f"tokenizer pre-tokenizer {json.dumps(pre)[:200]} has no known llama.cpp counterpart; "
        "pass --tokenizer-gguf FILE to copy the tokenizer of a GGUF that has it"
    )


def hf_tokenizer_meta(tokenizer, n_vocab: int) -> TokenizerMeta:
    """Metadata from a Hugging Face fast tokenizer whose model is a byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{type(tokenizer).__name__} has no tokenizer.json backend; only byte-level BPE exports")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE (byte_fallback)" if model.get("byte_fallback") else model.get("type")
        raise ExportError(
            f"tokenizer model {kind} is not supported yet (only byte-level BPE); "
            "pass --tokenizer-gguf FILE to copy the tokenizer of a GGUF of the same model"
        )
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    by_id = {int(i): tok for tok, i in model["vocab"].items()}
    kinds = {int(i): int(TokenType.NORMAL) for i in by_id}
    for added in spec.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        kinds[int(added["id"])] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    if max(by_id) >= n_vocab:
        raise ExportError(f"tokenizer has token id {max(by_id)} but the model's embedding has only {n_vocab} rows")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]  # rows no token uses: padding
    types = [kinds.get(i, int(TokenType.UNUSED)) for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {k: getattr(tokenizer, f"{k}_token_id", None) for k in SPECIAL_IDS}
    add_bos, add_eos = _added_specials(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    return TokenizerMeta(
        pre=pre, tokens=tokens, types=types, merges=merges,
        special_ids={k: int(v) for k, v in special.items() if v is not None},
        add_bos=add_bos, add_eos=add_eos, chat_template=template if isinstance(template, str) else None,
    )  # fmt: skip


def _added_specials(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS in front / EOS at the end, observed rather than read from flags."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = len(full) > len(plain) and bos is not None and full[0] == bos
    add_eos = len(full) > len(plain) and eos is not None and full[-1] == eos
    return add_bos, add_eos


def copy_gguf_tokenizer(source: str | Path, writer: GGUFWriter, n_vocab: int) -> int:
    """Copy every ``tokenizer.*`` key of another GGUF (e.g. the original SmolLM2 file); returns the count."""
    reader = GGUFReader(str(source))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ExportError(f"{source} has no tokenizer.ggml.tokens")
    if len(tokens.data) != n_vocab:
        raise ExportError(f"{source} has {len(tokens.data)} tokens but the model's embedding has {n_vocab} rows")
    copied = 0
    for key, fld in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = fld.types[0]
        sub_type = fld.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, fld.contents(), vtype, sub_type=sub_type)
        copied += 1
    return copied
