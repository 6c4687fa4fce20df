"""Tokenizers: text to token ids and back. Three kinds share one interface (`Tokenizer`):

- `char`: one token per Unicode code point, fitted on the training text. New models always reserve an unknown
  token: characters never seen in training (or rarer than `min_frequency`) map to it, so any text can be scored
  and prompted. Encoding is vectorised over code points with a lookup table (hundreds of MB/s).
- `byte`: the UTF-8 bytes, vocabulary 256; nothing is ever unknown.
- `bpe`: byte-level BPE trained with the Hugging Face `tokenizers` library (optional extra `bpe`), stored as its
  JSON; nothing is ever unknown either, since every byte is in its alphabet.

A byte or BPE token may hold part of a character: `stream_decoder` holds incomplete UTF-8 sequences back until
they complete and turns invalid ones into U+FFFD. `tokenizer_from_dict` rebuilds any of them from `to_dict()`.
"""

from __future__ import annotations

import codecs
import itertools
from collections.abc import Iterable
from typing import Any

import numpy as np

from fundamentallm.errors import UserError

UNKNOWN = "\ufffd"  # how the unknown token is shown when decoded
MAX_CODE_POINT = 0x110000
BPE_INSTALL_HINT = "pip install 'fundamentallm[bpe]' (the Hugging Face tokenizers library)"


def code_points(text: str) -> np.ndarray:
    """The text as an array of uint32 code points."""
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)


def count_code_points(text: str) -> np.ndarray:
    """Histogram of code points (length MAX_CODE_POINT); add histograms of chunks to fit on a stream."""
    return np.bincount(code_points(text), minlength=MAX_CODE_POINT)


def smallest_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise AssertionError("unreachable: vocabularies fit in uint32")


class StreamDecoder:
    """Token ids in, text out as soon as it is complete (for streaming generation)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        raw = self._tokenizer.token_bytes(token)
        return self._tokenizer.decode([token]) if raw is None else self._utf8.decode(raw)

    def flush(self) -> str:
        """What is still held back at the end: an incomplete sequence becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """What every tokenizer offers; the subclasses below fill it in."""

    kind = ""
    has_unknown = False
    unknown_id = -1

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def boundary_id(self) -> int | None:
        """The token declared as beginning and end of text to tools that need one (lm-evaluation-harness starts
        a rolling log-likelihood from it), as `export` declares it: our models have no such token, so it is one
        that ordinary text does not need. Byte and BPE models: byte 0 (NUL); char models: the unknown token."""
        ids = self.encode_array("\x00")
        return int(ids[0]) if len(ids) == 1 else None

    @property
    def dtype(self) -> np.dtype:
        return smallest_dtype(self.vocab_size)

    def encode_array(self, text: str, dtype: np.dtype | type = np.int64) -> np.ndarray:
        raise NotImplementedError

    def unknown_chars(self, text: str) -> list[str]:
        """The distinct characters of `text` outside the vocabulary (only a char tokenizer has any)."""
        return []

    def encode(self, text: str, what: str = "text", strict: bool = False) -> list[int]:
        """Token ids of `text`. Characters outside the vocabulary become the unknown token, unless `strict` (or
        the tokenizer has no unknown token): then a UserError names them."""
        unseen = self.unknown_chars(text)
        if unseen and (strict or not self.has_unknown):
            shown = ", ".join(repr(c) for c in unseen[:10]) + (" ..." if len(unseen) > 10 else "")
            why = ("--strict refuses them; without it they count as the unknown token" if self.has_unknown else
                   "this model has no unknown token (it was trained before FundamentaLLM reserved one), so it "
                   "cannot handle them: remove or replace them")
            raise UserError(f"the {what} contains {len(unseen)} character(s) the model never saw in training: "
                            f"{shown}; {why}")
        return self.encode_array(text).tolist()

    def token_bytes(self, token: int) -> bytes | None:
        """The UTF-8 bytes a token stands for; None for a char tokenizer (its tokens are whole characters)."""
        return None

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return b"".join(self.token_bytes(int(t)) or b"" for t in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def describe(self) -> str:
        return f"{self.kind} tokenizer, vocabulary {self.vocab_size:,}"

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError


def tokenizer_from_dict(data: Any) -> Tokenizer:
    """Any tokenizer from its `to_dict()`; a ValueError says what is wrong with `data`."""
    kind = data.get("type") if isinstance(data, dict) else None
    classes: dict[Any, Any] = {"char": CharTokenizer, "byte": ByteTokenizer, "bpe": BPETokenizer}
    if kind not in classes:
        raise ValueError(f"unknown tokenizer type {kind!r}")
    return classes[kind].from_dict(data)


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: list[str], has_unknown: bool = False) -> None:
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("tokenizer characters must be distinct single characters")
        self.chars = list(chars)
        self.has_unknown = bool(has_unknown)
        self._id = {c: i for i, c in enumerate(self.chars)}
        self.unknown_id = len(self.chars) if has_unknown else -1
        self._luts: dict[np.dtype, np.ndarray] = {}

    @classmethod
    def fit(cls, counts: np.ndarray, min_frequency: int = 1, reserve_unknown: bool = False) -> CharTokenizer:
        """Build the vocabulary from a code-point histogram of the training text."""
        kept = np.flatnonzero(counts >= min_frequency)
        rare = int(np.count_nonzero((counts > 0) & (counts < min_frequency)))
        chars = [chr(int(cp)) for cp in kept]
        return cls(chars, has_unknown=reserve_unknown or rare > 0)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + (1 if self.has_unknown else 0)

    @property
    def boundary_id(self) -> int | None:
        return self.unknown_id if self.has_unknown else None  # a model from before the unknown token: none

    def _lookup(self, dtype: np.dtype) -> np.ndarray:
        if dtype not in self._luts:
            lut = np.full(MAX_CODE_POINT, self.unknown_id, dtype=np.int64)
            lut[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
            self._luts[dtype] = lut.astype(dtype)  # an unsigned table holds -1 as its maximum value
        return self._luts[dtype]

    def encode_array(self, text: str, dtype: np.dtype | type = np.int64) -> np.ndarray:
        """Token ids of `text`; characters outside the vocabulary become the unknown id, or -1 without one.

        With an unsigned `dtype` (e.g. `self.dtype`, to write the token cache without an int64 intermediate) the
        caller must know that every character is in the vocabulary or that there is an unknown token."""
        return self._lookup(np.dtype(dtype))[code_points(text)]

    def unknown_chars(self, text: str) -> list[str]:
        if self.has_unknown:
            if not (self.encode_array(text) == self.unknown_id).any():
                return []
        elif not (self.encode_array(text) < 0).any():
            return []
        return sorted({ch for ch in text if ch not in self._id})

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        chars, n = self.chars, len(self.chars)
        return "".join(chars[i] if i < n else UNKNOWN for i in (int(t) for t in ids))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "char", "chars": "".join(self.chars), "has_unknown": self.has_unknown}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        chars, has_unknown = data.get("chars"), data.get("has_unknown", False)
        if data.get("type") != "char" or not isinstance(chars, str) or not isinstance(has_unknown, bool):
            raise ValueError("not a character tokenizer")
        surrogate = next((c for c in chars if "\ud800" <= c <= "\udfff"), None)
        if surrogate is not None:  # half of a UTF-16 pair: no text holds it, and it cannot be written as UTF-8
            raise ValueError(f"its vocabulary holds a lone surrogate (U+{ord(surrogate):04X}), not a character")
        return cls(list(chars), has_unknown=has_unknown)


class ByteTokenizer(Tokenizer):
    """The UTF-8 bytes of the text: vocabulary 256, nothing unknown, no fitting."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode_array(self, text: str, dtype: np.dtype | type = np.int64) -> np.ndarray:
        # "replace": a lone surrogate (possible in a terminal prompt, never in validated files) becomes "?"
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(dtype)

    def token_bytes(self, token: int) -> bytes | None:
        return bytes((token,))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "byte"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ByteTokenizer:
        return cls()


def _tokenizers_library(alternative: str = "") -> Any:
    try:
        import tokenizers
    except ImportError:
        raise UserError(f"the bpe tokenizer needs the tokenizers package: {BPE_INSTALL_HINT}{alternative}") from None
    return tokenizers


def byte_of_symbol() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable character (the GPT-2 convention the tokenizers library
    follows): printable Latin-1 bytes stand for themselves, the other 68 bytes for code points 256 and up, in
    byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


class BPETokenizer(Tokenizer):
    """Byte-level BPE (Hugging Face `tokenizers`), kept as the library's own JSON."""

    kind = "bpe"

    def __init__(self, json_text: str) -> None:
        library = _tokenizers_library()
        try:
            self._tokenizer = library.Tokenizer.from_str(json_text)
        except Exception as exc:  # the library raises its own exception types on malformed JSON
            raise ValueError(f"not a BPE tokenizer: {exc}") from None
        self._json = json_text
        byte_of = byte_of_symbol()
        vocab = self._tokenizer.get_vocab()
        self._bytes: list[bytes] = [b""] * len(vocab)
        for symbol, token in vocab.items():
            if not 0 <= token < len(vocab) or any(ch not in byte_of for ch in symbol):
                raise ValueError("not a byte-level BPE tokenizer")
            self._bytes[token] = bytes(byte_of[ch] for ch in symbol)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn the merges from a stream of text chunks; only the words' counts are held in memory."""
        library = _tokenizers_library("; or train on characters: --set data.tokenizer=char (fast-cpu trains BPE)")
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tokenizer = library.Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[], show_progress=False)
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer.to_str())

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    def encode_array(self, text: str, dtype: np.dtype | type = np.int64) -> np.ndarray:
        # Line by line, in one batch: the library encodes the lines in parallel and without offsets (several
        # times faster than one long string), and a line's tokens do not depend on where a chunk was cut.
        encodings = self._tokenizer.encode_batch_fast(text.splitlines(keepends=True))
        total = sum(len(e.ids) for e in encodings)
        return np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=dtype, count=total)

    def token_bytes(self, token: int) -> bytes | None:
        return self._bytes[token]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "bpe", "json": self._json}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BPETokenizer:
        if not isinstance(data.get("json"), str):
            raise ValueError("a BPE tokenizer without its JSON")
        return cls(data["json"])
