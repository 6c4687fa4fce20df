"""Text in, token arrays out: reading, validation, tokenization, the token cache, splits and batches.

    DATA paths -> data files (directories expanded; .gz/.xz/.zst read transparently)
               -> text chunks: strict UTF-8 in char-aligned chunks (errors name the file and byte offset), or the
                  text field of each record of JSON Lines, JSON, CSV, TSV and Parquet files (records.py)
               -> train / validation split by position of the characters (or --val-data files)
               -> tokenizer (char, byte or BPE) fitted on the training part -> token cache on disk (memory-mapped)
               -> random windows of sequence_length + 1 tokens

Nothing here holds the whole text in memory: every pass streams fixed-size chunks, so a 100M-character corpus
is prepared in bounded memory. The cache is keyed by the files' bytes and the tokenizer settings, so a second
run over the same data skips straight to training, and editing any file (or how records give their text)
re-tokenizes.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import lzma
import os
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from fundamentallm.config import Config
from fundamentallm.console import Progress, warn
from fundamentallm.errors import TrainingFailed, UserError
from fundamentallm.files import atomic_write, atomic_write_bytes, open_regular, remove_stale_temporaries
from fundamentallm.records import (
    DATA_SUFFIXES,
    TEXT,
    RecordFormat,
    Skipped,
    compression,
    file_format,
    open_binary,
    read_records,
)
from fundamentallm.tokenizer import (
    MAX_CODE_POINT,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    code_points,
    tokenizer_from_dict,
)

CACHE_FORMAT = 3  # of meta.json: 2 recorded text_bytes; 3 adds the tokenizer type and characters per split
KEY_FORMAT = 2  # of the cache key; 2: files hashed as stored on disk
CHUNK_BYTES = 2 << 20  # streaming unit: measured as fast as 8 or 16 MB chunks, and much less memory
_PROGRESS_MIN_BYTES = 32 << 20
_COPY_TOKENS = 16 << 20  # slice size when copying tokens to a device


# ----------------------------------------------------------------------------------------------------------
# Finding and reading files


def find_data_files(paths: list[str | Path]) -> list[Path]:
    """Expand DATA arguments: files are taken as given, directories contribute their data files (recursively):
    text, JSON Lines, CSV and TSV (each also compressed) and Parquet (not .json: see records.DATA_SUFFIXES)."""
    if not paths:
        raise UserError("no DATA given: pass a text file, several files, or a directory of .txt files")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
            if not found:
                raise UserError(f"directory {path} holds no data files (.txt, .jsonl, .csv, .tsv, .parquet, and .gz, "
                                f".xz or .zst compressed ones; a .json file is read when named); point DATA at a "
                                f"file or a folder of them")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise UserError(f"{path} is not a regular file or directory")
        else:
            raise UserError(f"data file {path} does not exist")
    return files


def iter_byte_chunks(path: Path, chunk_bytes: int | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, bytes) chunks that never split a UTF-8 sequence, so each decodes on its own."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES  # read at call time, so that tests can shrink it
    offset, carry = 0, b""
    try:
        with open_binary(path) as f:
            while True:
                block = f.read(chunk_bytes)
                if not block:
                    break
                data = carry + block
                cut = _last_char_boundary(data)
                carry = data[cut:]
                if cut:
                    yield offset, data[:cut]
                    offset += cut
    except (EOFError, OSError, lzma.LZMAError, zlib.error) as exc:
        raise UserError(f"cannot read {path}: {exc} (is the compressed file complete?)") from None
    if carry:
        yield offset, carry  # an incomplete sequence at the very end: decoding reports it


def _last_char_boundary(data: bytes) -> int:
    """Index where the last (possibly incomplete) UTF-8 sequence of `data` starts, or len(data)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead or ASCII byte
            needed = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return len(data) if needed <= back else len(data) - back
    return len(data)


def decode_chunk(path: Path, offset: int, data: bytes) -> str:
    """Strict UTF-8; an error names the file and the byte offset of the first bad byte."""
    try:
        text = codecs.decode(data, "utf-8", "strict")
    except UnicodeDecodeError as exc:
        bad = offset + exc.start
        where = "byte offset" if compression(path) == "none" else "uncompressed byte offset"
        raise UserError(f"{path} is not valid UTF-8: byte 0x{data[exc.start]:02x} at {where} {bad:,}. "
                        f"Convert it to UTF-8 first (for example: iconv -f latin1 -t utf-8)") from None
    if "\x00" in text:
        raise UserError(f"{path} looks like a binary file (it contains NUL bytes at byte offset "
                        f"{offset + data.index(0):,}); FundamentaLLM trains on UTF-8 text")
    return text


def iter_text(path: Path, fmt: RecordFormat, skipped: Skipped) -> Iterator[str]:
    """The text of one data file in chunks, whatever its format (bad records are counted in `skipped` when
    `fmt` skips them)."""
    if file_format(path) != TEXT:
        yield from read_records(path, fmt, skipped)
        return
    for offset, data in iter_byte_chunks(path):
        yield decode_chunk(path, offset, data)


def _count_chars(data: bytes) -> int:
    # Every UTF-8 character has exactly one byte that is not a continuation byte (10xxxxxx).
    arr = np.frombuffer(data, dtype=np.uint8)
    return len(arr) - int(np.count_nonzero((arr & 0xC0) == 0x80))


# ----------------------------------------------------------------------------------------------------------
# The token cache


@dataclass
class TokenData:
    """A tokenized corpus: the tokenizer and the train / validation token arrays (memory-mapped)."""

    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    files: list[Path]
    num_chars: int  # characters of all the text, training and validation
    fingerprint: str  # identifies the corpus and tokenizer settings; resume refuses a different one
    cache_dir: Path
    from_cache: bool
    text_bytes: int = 0  # UTF-8 bytes of the text (uncompressed)
    build_seconds: float = 0.0  # time spent building the token cache; 0 when it was reused
    val_files: list[Path] = field(default_factory=list)  # --val-data; empty: validation is the end of DATA
    train_chars: int = 0  # characters of each split: bits per character divide by these
    val_chars: int = 0


@dataclass(frozen=True)
class TokenizerSettings:
    """What decides the tokens besides the text: part of the cache key."""

    kind: str = "char"
    vocab_size: int = 0  # bpe only
    min_char_frequency: int = 1  # char only
    given: str = ""  # a tokenizer to use as it is (its JSON), instead of fitting one: fine-tuning keeps its own


def default_cache_dir() -> Path:
    env = os.environ.get("FUNDAMENTALLM_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fundamentallm" / "tokens"


def _file_kind(path: Path, as_text: bool = False) -> str:
    """A file's format and compression, as the cache key frames it (text files: the compression alone, as
    before other formats existed, so that their keys stay the same)."""
    kind = compression(path)
    return kind if as_text or file_format(path) == TEXT else f"{file_format(path)}-{kind}"


def _fingerprint(files: list[Path], val_files: list[Path], validation_split: float,
                 settings: TokenizerSettings, fmt: RecordFormat, as_text: bool = False) -> str:
    """Hash of every file's bytes as stored on disk, plus the split and tokenizer settings.

    Compressed files are hashed as they are stored, not decompressed: the key still changes whenever the text
    does, and a second run over a .xz corpus starts without decompressing it (decompression costs far more than
    hashing). This pass reads each file once at disk speed; nothing else happens when the cache is valid.
    A character model split by position keeps the key it had before other tokenizers existed, so that runs
    trained then still resume and find their validation split. Record files add how their text is taken (the
    field, the separator, whether bad records are skipped), so that changing any of it re-tokenizes.
    `as_text`: the key every file had when all were read as plain text (see text_fingerprint).
    """
    digest = hashlib.blake2b(digest_size=16)
    key: dict = {"format": KEY_FORMAT, "validation_split": None if val_files else validation_split,
                 "min_char_frequency": settings.min_char_frequency}
    if settings.kind != "char":
        key.update(tokenizer=settings.kind, vocab_size=settings.vocab_size if settings.kind == "bpe" else None)
    if settings.given:
        key.update(given=hashlib.sha256(settings.given.encode()).hexdigest())
    all_files = [*files, *val_files]
    if not as_text and any(file_format(path) != TEXT for path in all_files):
        key.update(text_field=fmt.text_field, record_separator=fmt.separator, skip_bad_records=fmt.skip_bad)
    digest.update(json.dumps(key).encode())
    sizes = [_file_size(path) for path in all_files]
    total = sum(sizes)
    bar = Progress(total, "Hashing", unit="B", unit_scale=True) if total >= _PROGRESS_MIN_BYTES else None
    for index, (path, size) in enumerate(zip(all_files, sizes, strict=True)):
        if index == len(files):
            digest.update(b"\x00validation\x00")  # the same files as DATA or as --val-data are different data
        # Kind and size frame each file, so that no two different file lists can feed the same byte stream.
        digest.update(f"\x00file\x00{_file_kind(path, as_text)}\x00{size}\x00".encode())
        try:
            with open_regular(path, "data file") as f:
                while block := f.read(CHUNK_BYTES):
                    digest.update(block)
                    if bar is not None:
                        bar.update(len(block))
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if bar is not None:
        bar.close(final_line=False)
    return digest.hexdigest()


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def _measure(files: list[Path], fmt: RecordFormat, skipped: Skipped) -> tuple[int, int]:
    """Characters and (uncompressed) UTF-8 bytes of the text: the split point is needed before the vocabulary
    pass. Text files are counted without decoding; record files are read."""
    chars = total_bytes = 0
    for path in files:
        if file_format(path) == TEXT:
            for _, data in iter_byte_chunks(path):
                chars += _count_chars(data)
                total_bytes += len(data)
            continue
        for text in read_records(path, fmt, skipped):
            chars += len(text)
            total_bytes += len(text.encode("utf-8"))
    return chars, total_bytes


def _stream_text(files: list[Path], desc: str, total_bytes: int, fmt: RecordFormat) -> Iterator[tuple[Path, str]]:
    show = total_bytes >= _PROGRESS_MIN_BYTES
    bar = Progress(total_bytes, desc, unit="B", unit_scale=True) if show else None
    for path in files:
        # Bad records were counted when the text was measured; later passes skip the same ones.
        for text in iter_text(path, fmt, Skipped()):
            yield path, text
            if bar is not None:
                bar.update(len(text) if text.isascii() else len(text.encode("utf-8")))
    if bar is not None:
        bar.close(final_line=False)


@dataclass
class _Plan:
    """Where the text is and how it splits: the first `train_chars` characters of `files` train, unless
    validation files are given (then all of `files` trains and `val_files` validate)."""

    files: list[Path]
    val_files: list[Path]
    names: str
    total_bytes: int
    train_chars: int
    val_chars: int
    fmt: RecordFormat
    skipped: list[str]  # the report of bad records passed over

    def pieces(self, desc: str) -> Iterator[tuple[str, bool]]:
        """The text in chunks, each marked True when it belongs to the training split."""
        seen = 0
        val = set(self.val_files)
        for path, text in _stream_text([*self.files, *self.val_files], desc, self.total_bytes, self.fmt):
            if self.val_files:
                yield text, path not in val
                continue
            head = max(0, min(len(text), self.train_chars - seen))
            seen += len(text)
            if head:
                yield text[:head], True
            if head < len(text):
                yield text[head:], False


def prepare_tokens(
    paths: list[str | Path],
    validation_split: float,
    min_char_frequency: int = 1,
    cache_dir: Path | None = None,
    *,
    tokenizer: str = "char",
    vocab_size: int = 0,
    val_paths: list[str | Path] | None = None,
    given: Tokenizer | None = None,
    fmt: RecordFormat | None = None,
) -> TokenData:
    """Tokenize DATA (or reuse the cached tokens) and split it into train and validation: by position (the last
    `validation_split` of the characters validate), or, with `val_paths`, training on DATA and validating on those.
    `fmt` says how record files (JSON Lines, JSON, CSV, TSV, Parquet) give their text."""
    fmt = fmt or RecordFormat()
    files = find_data_files(paths)
    val_files = find_data_files(val_paths) if val_paths else []
    both = {f.resolve() for f in files} & {f.resolve() for f in val_files}
    if both:
        raise UserError(f"{sorted(both)[0]} is given both as DATA and with --val-data; validation text must be "
                        f"text the model does not train on")
    settings = TokenizerSettings(tokenizer, vocab_size, min_char_frequency,
                                 json.dumps(given.to_dict(), sort_keys=True) if given is not None else "")
    key = _fingerprint(files, val_files, validation_split, settings, fmt)
    cache_dir = Path(cache_dir or default_cache_dir()) / key
    meta = _load_cache(cache_dir)
    from_cache = meta is not None
    build_seconds = 0.0
    if meta is None:
        start = time.perf_counter()
        meta = _build_cache(_plan(files, val_files, validation_split, fmt), cache_dir, settings)
        build_seconds = time.perf_counter() - start
    for line in meta.get("skipped", []):  # said again when the cache is reused: the tokens lack those records
        warn(line)
    tokens = np.memmap(cache_dir / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r",
                       shape=(meta["num_tokens"],))
    split = meta["num_train"]
    return TokenData(
        tokenizer=tokenizer_from_dict(meta["tokenizer"]), train=tokens[:split], val=tokens[split:],
        files=files, num_chars=meta["train_chars"] + meta["val_chars"], fingerprint=key, cache_dir=cache_dir,
        from_cache=from_cache, text_bytes=meta["text_bytes"], build_seconds=build_seconds, val_files=val_files,
        train_chars=meta["train_chars"], val_chars=meta["val_chars"],
    )


def prepare_data(config: Config, paths: list[str | Path], val_paths: list[str | Path] | None = None,
                 cache_dir: Path | None = None, given: Tokenizer | None = None) -> TokenData:
    """`prepare_tokens` with the split and tokenizer settings of `config` (or the `given` tokenizer)."""
    return prepare_tokens(paths, config.training.validation_split, config.data.min_char_frequency, cache_dir,
                          tokenizer=config.data.tokenizer, vocab_size=config.data.vocab_size, val_paths=val_paths,
                          given=given, fmt=record_format(config))


def text_fingerprint(config: Config, paths: list[str | Path], val_paths: list[str | Path] | None = None) -> str:
    """The key (TokenData.fingerprint) that DATA had when every file was read as plain text, record files too:
    what a run trained on a .jsonl, .json, .csv or .tsv file before they were read as records recorded."""
    files, val_files = find_data_files(paths), find_data_files(val_paths) if val_paths else []
    settings = TokenizerSettings(config.data.tokenizer, config.data.vocab_size, config.data.min_char_frequency)
    return _fingerprint(files, val_files, config.training.validation_split, settings, RecordFormat(), as_text=True)


def trained_as_text(fingerprint: str, config: Config, paths: list[str | Path],
                    val_paths: list[str | Path] | None = None) -> Path | None:
    """The record file (.jsonl, .json, .csv or .tsv) among `paths` that a run with this data `fingerprint` trained on
    as its raw text (syntax and all), before such files were read as records; None when it did not (or a file
    cannot be read: the error about it says more)."""
    try:
        records = [f for f in find_data_files([*paths, *(val_paths or [])]) if file_format(f) != TEXT]
        if records and text_fingerprint(config, paths, val_paths) == fingerprint:
            return Path(records[0])
    except UserError:
        pass
    return None


def record_format(config: Config) -> RecordFormat:
    """How record files give their text, from the data section of `config`."""
    return RecordFormat(config.data.text_field, config.data.record_separator, config.data.skip_bad_records)


def characters_in(paths: list[str | Path], fmt: RecordFormat) -> set[str]:
    """Every distinct character of the text in `paths` (one streamed pass, bounded memory)."""
    seen = np.zeros(MAX_CODE_POINT, dtype=bool)
    for _, text in _stream_text(find_data_files(paths), "Reading", 0, fmt):
        seen[code_points(text)] = True
    return {chr(int(cp)) for cp in np.flatnonzero(seen)}


def _names(files: list[Path]) -> str:
    return ", ".join(str(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def _plan(files: list[Path], val_files: list[Path], validation_split: float, fmt: RecordFormat) -> _Plan:
    skipped = Skipped()
    num_chars, total_bytes = _measure(files, fmt, skipped)
    if num_chars == 0:
        raise UserError(f"{_names(files)}: no text (the input is empty{_all_bad(skipped)})")
    if not val_files:
        train_chars = num_chars - max(1, round(num_chars * validation_split))
        return _Plan(files, [], _names(files), total_bytes, train_chars, num_chars - train_chars, fmt,
                     skipped.report())
    val_chars, val_bytes = _measure(val_files, fmt, skipped)
    if val_chars == 0:
        raise UserError(f"--val-data {_names(val_files)}: no text (the input is empty{_all_bad(skipped)})")
    return _Plan(files, val_files, _names(files), total_bytes + val_bytes, num_chars, val_chars, fmt,
                 skipped.report())


def _all_bad(skipped: Skipped) -> str:
    return f", or every record was bad: {'; '.join(skipped.report())}" if skipped.counts else ""


def _load_cache(cache_dir: Path) -> dict | None:
    try:
        meta = json.loads((cache_dir / "meta.json").read_text("utf-8"))
        size = (cache_dir / "tokens.bin").stat().st_size
    except (OSError, ValueError):
        return None
    if meta.get("format") != CACHE_FORMAT or size != meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize:
        return None
    return meta


def _build_cache(plan: _Plan, cache_dir: Path, settings: TokenizerSettings) -> dict:
    # Pass 1 (after measuring): validate the text and fit the tokenizer on the training part.
    tokenizer = tokenizer_from_dict(json.loads(settings.given)) if settings.given else _fit(plan, settings)
    # Pass 2: encode chunk by chunk straight into the cache file, in the smallest integer type that holds the
    # vocabulary. Every character is in a char tokenizer's vocabulary or maps to its unknown token (always
    # reserved), so the lookup can produce that type directly, with no int64 intermediate.
    dtype = tokenizer.dtype
    num_train = 0

    def write_tokens(f: BinaryIO) -> None:
        nonlocal num_train
        for text, training in plan.pieces("Tokenizing"):
            ids = tokenizer.encode_array(text, dtype)
            num_train += len(ids) if training else 0
            f.write(ids.tobytes())

    # A build killed midway leaves its temporary file; one untouched for 10 minutes is not being written.
    remove_stale_temporaries(cache_dir, idle_seconds=600)
    try:
        atomic_write(cache_dir / "tokens.bin", write_tokens)
        num_tokens = (cache_dir / "tokens.bin").stat().st_size // dtype.itemsize
        meta = {"format": CACHE_FORMAT, "dtype": dtype.name, "num_tokens": num_tokens, "num_train": num_train,
                "train_chars": plan.train_chars, "val_chars": plan.val_chars, "text_bytes": plan.total_bytes,
                "tokenizer": tokenizer.to_dict(), "files": [str(f) for f in plan.files],
                "val_files": [str(f) for f in plan.val_files], "skipped": plan.skipped}
        atomic_write_bytes(cache_dir / "meta.json", json.dumps(meta).encode())  # last: marks the cache whole
    except TrainingFailed:
        raise UserError(f"the disk is full while writing the token cache in {cache_dir}; free some space, or set "
                        f"FUNDAMENTALLM_CACHE_DIR to a directory on a disk with room") from None
    except UserError as exc:
        raise UserError(f"cannot write the token cache ({exc}); set FUNDAMENTALLM_CACHE_DIR to a writable "
                        f"directory") from None
    return meta


def _fit(plan: _Plan, settings: TokenizerSettings) -> Tokenizer:
    """One pass over all the text: check it (strict UTF-8, not only whitespace) and fit the tokenizer on the
    training part (a character histogram, or BPE merges learned from the streamed chunks)."""
    train_counts = np.zeros(MAX_CODE_POINT, dtype=np.int64)
    val_counts = np.zeros(MAX_CODE_POINT, dtype=np.int64)
    has_text = False

    def training_text() -> Iterator[str]:
        nonlocal has_text
        for text, training in plan.pieces("Reading"):
            has_text = has_text or not text.isspace()
            if settings.kind == "char":
                _add_counts(train_counts if training else val_counts, code_points(text))
            elif training:
                yield text

    if settings.kind == "bpe":
        tokenizer: Tokenizer = BPETokenizer.train(training_text(), settings.vocab_size)
        if tokenizer.vocab_size < settings.vocab_size:
            warn(f"the training text yields only {tokenizer.vocab_size - 256:,} BPE merges, so the vocabulary "
                 f"holds {tokenizer.vocab_size:,} tokens instead of data.vocab_size={settings.vocab_size:,}")
    else:
        for _ in training_text():
            pass
    if not has_text:
        raise UserError(f"{plan.names}: the text is only whitespace; there is nothing to learn from")
    if settings.kind == "char" and settings.min_char_frequency > train_counts.max():
        # Every character would be the unknown token: a one-token model has nothing to learn.
        raise UserError(f"data.min_char_frequency = {settings.min_char_frequency:,} is more than the count of every "
                        f"character in the training text of {plan.names} (the most frequent occurs "
                        f"{int(train_counts.max()):,} times); lower it, e.g. --set data.min_char_frequency=1")
    if settings.kind != "bpe":
        tokenizer = ByteTokenizer() if settings.kind == "byte" else \
            CharTokenizer.fit(train_counts, settings.min_char_frequency, reserve_unknown=True)
    if settings.kind == "char":
        unseen = int(np.count_nonzero((val_counts > 0) & (train_counts < settings.min_char_frequency)))
        if unseen:
            warn(f"{unseen} distinct character(s) in the validation text never occur (often enough) in the "
                 f"training text; they map to the unknown token")
    return tokenizer


def _add_counts(counts: np.ndarray, cps: np.ndarray) -> None:
    # Histogram only up to the largest code point present: far less than all 1.1M for most chunks.
    if len(cps):
        hist = np.bincount(cps)
        counts[: len(hist)] += hist


@dataclass
class EncodedText:
    """Text to score, encoded with a model's tokenizer."""

    tokens: np.ndarray
    num_chars: int
    unknown_chars: int  # characters outside the vocabulary, encoded as the unknown token


def encode_files(paths: list[str | Path], tokenizer: Tokenizer, strict: bool = False,
                 fmt: RecordFormat | None = None) -> EncodedText:
    """Tokenize DATA with an existing tokenizer (for evaluation). Characters outside its vocabulary become the
    unknown token and are counted; with `strict` (or without an unknown token) they are an error. `fmt` says how
    record files give their text."""
    files = find_data_files(paths)
    parts, chars, unknown = [], 0, 0
    skipped = Skipped()
    for path in files:
        for text in iter_text(path, fmt or RecordFormat(), skipped):
            chars += len(text)
            if tokenizer.unknown_chars(text):
                tokenizer.encode(text, what=f"file {path}", strict=strict)  # raises when they are refused
            ids = tokenizer.encode_array(text)
            unknown += int(np.count_nonzero(ids == tokenizer.unknown_id)) if tokenizer.has_unknown else 0
            parts.append(ids.astype(tokenizer.dtype))
    for line in skipped.report():
        warn(line)
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=tokenizer.dtype)
    if len(tokens) < 2:
        raise UserError(f"{', '.join(map(str, files))}: too little text to evaluate (need at least 2 tokens)")
    return EncodedText(tokens, chars, unknown)


# ----------------------------------------------------------------------------------------------------------
# Batches


def as_tensor(tokens: np.ndarray, device: torch.device) -> torch.Tensor:
    """A copy of `tokens` on `device`, compact (uint8, else int32); windows are widened to int64 per batch.

    Copied in slices, so that moving a memory-mapped corpus to the GPU never holds a second full copy of it in
    host memory (100M uint16 tokens would need 400 MB of int32 at once)."""
    np_dtype = np.uint8 if tokens.dtype == np.uint8 else np.int32
    out = torch.empty(len(tokens), dtype=torch.uint8 if np_dtype == np.uint8 else torch.int32, device=device)
    for start in range(0, len(tokens), _COPY_TOKENS):
        piece = np.array(tokens[start : start + _COPY_TOKENS], dtype=np_dtype)  # a copy: memmaps are read-only
        out[start : start + len(piece)].copy_(torch.from_numpy(piece))
    return out


def gather_windows(tokens: torch.Tensor | np.ndarray, starts: torch.Tensor, length: int,
                   device: torch.device) -> torch.Tensor:
    """Windows tokens[s : s + length] for every start s, as a (len(starts), length) int64 tensor on `device`."""
    if isinstance(tokens, torch.Tensor):  # device-resident tokens: only the starts cross to the device
        starts = starts.to(tokens.device, non_blocking=True)
        window = tokens[starts[:, None] + torch.arange(length, device=tokens.device)]
    else:
        window = torch.from_numpy(tokens[(starts[:, None] + torch.arange(length)).numpy()].astype(np.int64))
    return window.to(device, dtype=torch.long, non_blocking=True)


class BatchSampler:
    """Random windows of sequence_length + 1 tokens from the training split.

    Offsets come from a dedicated CPU generator whose state goes into every checkpoint, so a resumed run draws
    exactly the windows the uninterrupted run would have. Under torchrun every rank draws the same global set of
    batch_size x world_size offsets and takes its own slice: the global batch is the same whatever the number of
    processes.
    """

    def __init__(self, tokens: torch.Tensor | np.ndarray, batch_size: int, sequence_length: int,
                 device: torch.device, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.tokens = tokens
        self.batch_size, self.sequence_length = batch_size, sequence_length
        self.device = device
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        high = len(self.tokens) - self.sequence_length  # exclusive: the last window ends at the last token
        starts = torch.randint(0, high, (self.batch_size * self.world_size,), generator=self.generator)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        window = gather_windows(self.tokens, mine, self.sequence_length + 1, self.device)
        return window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def eval_windows(num_tokens: int, context: int, max_windows: int = 0, stride: int = 0,
                 ) -> list[tuple[int, int, int]]:
    """(start, length, skip) windows that score every prediction in a token stream once: each window holds up to
    context + 1 tokens and scores its predictions after the first `skip` (already scored by the window before).
    Stride `context` (the default) gives windows side by side, none skipping anything; a shorter stride slides
    them by `stride` tokens, so that every prediction after the first window has at least context - stride tokens
    before it. With max_windows > 0, that many windows spread evenly over the stream (side by side only)."""
    stride = stride or context
    windows, scored_to = [], 0  # the index of the last token scored so far
    for start in range(0, num_tokens - 1, stride):
        end = min(start + context, num_tokens - 1)  # the window's last target
        windows.append((start, end - start + 1, max(0, scored_to - start)))
        scored_to = end
        if end == num_tokens - 1:
            break
    if max_windows and len(windows) > max_windows:
        step = len(windows) / max_windows
        windows = [windows[int(i * step)] for i in range(max_windows)]
    return windows
