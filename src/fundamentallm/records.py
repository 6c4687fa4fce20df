"""DATA files by format: which name is which format, opening compressed files, and the record formats.

    .txt                      the text itself (data.py reads it in byte chunks)
    .jsonl  (one JSON object per line)  \
    .csv    (a header row names the fields)  >  one field of each record is a document: data.text_field
    .parquet (read row group by row group)  /    each document is followed by data.record_separator

Text and JSON Lines and CSV files may be compressed: .gz, .xz or .zst (the zstd extra) after the format's suffix.
Record files are read as a stream of text chunks of about CHUNK_CHARS characters, so memory does not grow with the
file. A record that cannot give text (no such field, not a string, a line that is not JSON, an unreadable row
group) stops reading with one line naming the file and the line or row, or, with data.skip_bad_records, is
counted in `Skipped` and passed over.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import lzma
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from fundamentallm.errors import UserError
from fundamentallm.files import open_regular

TEXT, JSONL, CSV, PARQUET = "text", "jsonl", "csv", "parquet"
COMPRESSIONS = (".gz", ".xz", ".zst")
# What a directory contributes: these names only (a file named on the command line is read whatever its name).
DATA_SUFFIXES = (*(base + c for base in (".txt", ".jsonl", ".csv") for c in ("", *COMPRESSIONS)), ".parquet")
CHUNK_CHARS = 2 << 20  # about data.CHUNK_BYTES of text
ZSTD_INSTALL_HINT = "pip install 'fundamentallm[zstd]'"
PARQUET_INSTALL_HINT = "pip install 'fundamentallm[parquet]'"
_PARQUET_BATCH_ROWS = 4096  # rows turned into Python strings at a time
_ZSTD_READ = 1 << 16  # compressed bytes per step: small steps bound what one step decompresses
_READ_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error)  # what a damaged compressed stream raises
_SKIP_HINT = "fix or remove it, or pass --skip-bad-records to skip such records"


def compression(path: Path) -> str:
    """'gz', 'xz', 'zst' or 'none', from the file's name."""
    return next((suffix[1:] for suffix in COMPRESSIONS if path.name.endswith(suffix)), "none")


def file_format(path: Path) -> str:
    """TEXT, JSONL, CSV or PARQUET, from the name without its compression suffix; anything else is text."""
    name = path.name.removesuffix(f".{compression(path)}")
    if name.endswith(".jsonl"):
        return JSONL
    if name.endswith(".csv"):
        return CSV
    return PARQUET if name.endswith(".parquet") and compression(path) == "none" else TEXT


def open_binary(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when its name ends in .gz, .xz or .zst."""
    kind = compression(path)
    raw = open_regular(path, "data file")  # a FIFO or a device would block, or never end
    if kind == "none":
        return raw
    raw.close()  # the decompressors open the file by name: it was a regular file a moment ago
    try:
        if kind == "gz":
            return gzip.open(path, "rb")  # type: ignore[return-value]
        if kind == "xz":
            return lzma.open(path, "rb")  # type: ignore[return-value]
        if kind == "zst":
            return io.BufferedReader(_ZstdReader(path), CHUNK_CHARS)
        return open(path, "rb")
    except PermissionError:
        raise UserError(f"cannot read {path}: permission denied") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


class _ZstdReader(io.RawIOBase):
    """A .zst file's frames, one after another, decompressed. Written on the library's decompressor object rather
    than its stream reader because the stream reader returns a file cut off inside a frame as if it were whole;
    here that is an EOFError, as gzip and lzma raise."""

    def __init__(self, path: Path) -> None:
        try:
            import zstandard
        except ImportError:
            raise UserError(f"reading {path} needs the zstandard package: {ZSTD_INSTALL_HINT}") from None
        self._error = zstandard.ZstdError
        self._decompressor = zstandard.ZstdDecompressor(max_window_size=1 << 31)  # files made with zstd --long
        self._frame: Any = None
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._input = b""  # compressed bytes read but not yet given to a frame
        self._output = b""  # decompressed bytes not yet returned

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._output and self._decompress_more():
            pass
        count = min(len(buffer), len(self._output))
        buffer[:count] = self._output[:count]
        self._output = self._output[count:]
        return count

    def _decompress_more(self) -> bool:
        """Decompress one more piece into _output; False at the end of the file."""
        data, self._input = self._input or self._file.read(_ZSTD_READ), b""
        in_frame = self._frame is not None and not self._frame.eof
        if not data:
            if in_frame:
                raise EOFError("the file ends inside a zstd frame")
            return False
        if not in_frame:
            self._frame = self._decompressor.decompressobj()
        try:
            self._output = self._frame.decompress(data)
        except self._error as exc:
            raise OSError(f"zstd: {exc}") from None
        if self._frame.eof:
            self._input = self._frame.unused_data  # the next frame starts here
        return True

    def close(self) -> None:
        self._file.close()
        super().close()


@dataclass(frozen=True)
class RecordFormat:
    """How record files give text: part of the token cache key, since changing any of it changes the text."""

    text_field: str = "text"
    separator: str = "\n\n"
    skip_bad: bool = False


@dataclass
class Skipped:
    """Bad records passed over (data.skip_bad_records), per file: how many, and where the first was."""

    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, path: Path, where: str, why: str, count: int = 1) -> None:
        self.counts[str(path)] = self.counts.get(str(path), 0) + count
        self.first.setdefault(str(path), f"{where}, {why}")

    def report(self) -> list[str]:
        """One line per file, e.g. "Skipped 3 bad records in a.jsonl (first: line 7, no field 'text')"."""
        return [f"Skipped {n:,} bad record{'s' if n != 1 else ''} in {name} (first: {self.first[name]})"
                for name, n in self.counts.items()]


class _BadRecord:
    """A record that gives no text: where it is (its line or row) and why; `count` records (a damaged row group
    is all its rows)."""

    def __init__(self, where: str, why: str, count: int = 1) -> None:
        self.where, self.why, self.count = where, why, count


def read_records(path: Path, fmt: RecordFormat, skipped: Skipped) -> Iterator[str]:
    """The text of a JSON Lines, CSV or Parquet file as chunks of whole documents, each document followed by the
    separator. Empty documents are left out. Bad records raise a UserError, or are counted in `skipped`."""
    readers = {JSONL: _jsonl_items, CSV: _csv_items, PARQUET: _parquet_items}
    parts: list[str] = []
    size = 0
    for item in readers[file_format(path)](path, fmt.text_field):
        if isinstance(item, _BadRecord):
            if not fmt.skip_bad:
                raise UserError(f"{path}, {item.where}: {item.why}; {_SKIP_HINT}")
            skipped.add(path, item.where, item.why, item.count)
        elif item:
            parts += (item, fmt.separator)
            size += len(item) + len(fmt.separator)
            if size >= CHUNK_CHARS:
                yield "".join(parts)
                parts, size = [], 0
    if parts:
        yield "".join(parts)


def _reading(path: Path, lines: Iterable[bytes]) -> Iterator[bytes]:
    """`lines`, with a damaged compressed stream turned into one error naming the file."""
    try:
        yield from lines
    except _READ_ERRORS as exc:
        raise UserError(f"cannot read {path}: {exc} (is the compressed file complete?)") from None


# One reader per format: each yields every record's text, or a _BadRecord for a record that has none (a
# generator cannot go on after raising, so bad records are yielded and read_records decides).


def _jsonl_items(path: Path, text_field: str) -> Iterator[str | _BadRecord]:
    with open_binary(path) as f:
        for number, raw in enumerate(_reading(path, f), 1):
            if raw.strip():
                yield _json_text(raw, number, text_field)


def _json_text(raw: bytes, number: int, text_field: str) -> str | _BadRecord:
    where = f"line {number:,}"
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        return _BadRecord(where, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1:,})")
    try:
        record = json.loads(line.removeprefix("\ufeff") if number == 1 else line)
    except json.JSONDecodeError as exc:
        return _BadRecord(where, f"not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno:,})")
    except (ValueError, RecursionError) as exc:  # a number too long to convert; nesting too deep
        return _BadRecord(where, f"not valid JSON ({str(exc).splitlines()[0][:80]})")
    if not isinstance(record, dict):
        return _BadRecord(where, f"{_json_type(record)} in JSON, not an object (JSON Lines hold one object per line)")
    if text_field not in record:
        return _BadRecord(where, f"no field '{text_field}' (its fields: {_some(list(record))}); choose the field "
                                 f"with --text-field")
    text = record[text_field]
    if not isinstance(text, str):
        return _BadRecord(where, f"field '{text_field}' is {_json_type(text)}, not a string")
    if "\\u" in line and not _encodable(text):
        return _BadRecord(where, f"field '{text_field}' holds a lone surrogate escape (\\ud800-\\udfff), which "
                                 f"is no character")
    return text


def _json_type(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null",
             int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


def _some(names: list[str]) -> str:
    shown = ", ".join(repr(n)[1:-1][:40] for n in names[:8])
    return (shown + (f" and {len(names) - 8} more" if len(names) > 8 else "")) or "none"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _csv_items(path: Path, text_field: str) -> Iterator[str | _BadRecord]:
    # A document is often longer than the csv module's default limit of 128 KiB per field.
    csv.field_size_limit(max(csv.field_size_limit(), (1 << 31) - 1))
    with open_binary(path) as f:
        reader = csv.reader(_decoded_lines(path, _reading(path, f)), strict=True)
        header = _csv_row(reader)
        if header is None:
            return  # an empty file: no text
        if isinstance(header, _BadRecord) or text_field not in header:
            shown = f"its header: {_some(header)}" if isinstance(header, list) else header.why
            raise UserError(f"{path} has no column '{text_field}' in its first line ({shown}); choose the column "
                            f"with --text-field")
        column, line = header.index(text_field), reader.line_num + 1
        while (row := _csv_row(reader)) is not None:
            where, line = f"line {line:,}", reader.line_num + 1
            if isinstance(row, _BadRecord):
                yield _BadRecord(where, row.why)
            elif len(row) > column:
                yield row[column]
            elif row:  # an empty line is no record
                yield _BadRecord(where, f"{len(row)} field(s), no '{text_field}' (the header has {len(header)})")


def _csv_row(reader: Any) -> list[str] | _BadRecord | None:
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as exc:
        return _BadRecord("", f"not valid CSV ({exc})")


def _decoded_lines(path: Path, lines: Iterable[bytes]) -> Iterator[str]:
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{path} is not valid UTF-8: byte 0x{raw[exc.start]:02x} on line {number:,}. Convert "
                            f"it to UTF-8 first (for example: iconv -f latin1 -t utf-8)") from None
        yield line.removeprefix("\ufeff") if number == 1 else line  # a spreadsheet's byte order mark


def _parquet_items(path: Path, text_field: str) -> Iterator[str | _BadRecord]:
    """Row group by row group, only the text column, a few thousand rows at a time; the rest of a row group that
    cannot be read is bad records, one per row."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: {PARQUET_INSTALL_HINT}") from None
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path} is not a readable Parquet file ({_first_line(exc)}); is it complete?") from None
    with parquet:
        _check_text_column(path, parquet.schema_arrow, text_field, pa)
        row = 0
        for group in range(parquet.num_row_groups):
            end = row + parquet.metadata.row_group(group).num_rows
            batches = parquet.iter_batches(_PARQUET_BATCH_ROWS, row_groups=[group], columns=[text_field])
            while row < end:
                try:
                    values = next(batches).column(0).to_pylist()
                except (StopIteration, pa.ArrowException, OSError) as exc:
                    why = "ends early" if isinstance(exc, StopIteration) else f"cannot be read ({_first_line(exc)})"
                    where = f"rows {row:,} to {end - 1:,} (row group {group}, counting from 0)"
                    yield _BadRecord(where, why, count=end - row)
                    break
                for text in values:
                    yield _BadRecord(f"row {row:,} (counting from 0)", f"'{text_field}' is null") \
                        if text is None else text
                    row += 1
            row = end


def _check_text_column(path: Path, schema: Any, text_field: str, pa: Any) -> None:
    if text_field not in schema.names:
        raise UserError(f"{path} has no column '{text_field}' (its columns: {_some(schema.names)}); choose the "
                        f"column with --text-field")
    kind = schema.field(text_field).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or
            getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise UserError(f"column '{text_field}' of {path} holds {kind}, not strings; choose a text column with "
                        f"--text-field")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
