"""DATA files by format: which name is which format, opening compressed files, and the record formats.

    .txt      the text itself (data.py reads it in byte chunks)
    .jsonl    one JSON object per line              | the records: one field of each is a document,
    .json     one array of objects (or strings)     | data.text_field (a dotted path reaches into nested
    .csv      a header row names the fields         | records: "meta.body"); each document is followed
    .tsv      the same, tab-separated               | by data.record_separator
    .parquet  read row group by row group           |

Every format but Parquet may be compressed: .gz, .xz or .zst (the zstd extra) after the format's suffix.
Record files are read as a stream of text chunks of about CHUNK_CHARS characters, so memory does not grow with the
file (a .json array: with its largest item). A record that cannot give text (no such field, not a string, a line
that is not JSON, an unreadable row group) stops reading with one line naming the file and the line, row or item,
or, with data.skip_bad_records, is counted in `Skipped` and passed over.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import lzma
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from fundamentallm.errors import UserError
from fundamentallm.files import open_regular

TEXT, JSONL, JSON, CSV, TSV, PARQUET = "text", "jsonl", "json", "csv", "tsv", "parquet"
COMPRESSIONS = (".gz", ".xz", ".zst")
# What a directory contributes: these names only (a file named on the command line is read whatever its name).
# Not .json: datasets keep their metadata in .json files (dataset_info.json); a .json of records is named as DATA.
DATA_SUFFIXES = (*(base + c for base in (".txt", ".jsonl", ".csv", ".tsv") for c in ("", *COMPRESSIONS)), ".parquet")
CHUNK_CHARS = 2 << 20  # about data.CHUNK_BYTES of text
ZSTD_INSTALL_HINT = "pip install 'fundamentallm[zstd]'"
PARQUET_INSTALL_HINT = "pip install 'fundamentallm[parquet]'"
_PARQUET_BATCH_ROWS = 4096  # rows turned into Python strings at a time
_ZSTD_READ = 1 << 16  # compressed bytes per step: small steps bound what one step decompresses
_READ_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error)  # what a damaged compressed stream raises
_SKIP_HINT = "fix or remove it, or pass --skip-bad-records to skip such records"
_JSON_READ = 1 << 20  # bytes of a .json file read at a time (more while one item is longer)
_MISSING = object()  # no value at a record's text field


def compression(path: Path) -> str:
    """'gz', 'xz', 'zst' or 'none', from the file's name."""
    return next((suffix[1:] for suffix in COMPRESSIONS if path.name.endswith(suffix)), "none")


def file_format(path: Path) -> str:
    """TEXT, JSONL, JSON, CSV, TSV or PARQUET, from the name without its compression suffix; anything else is
    text."""
    name = path.name.removesuffix(f".{compression(path)}")
    kind = next((kind for kind in (JSONL, JSON, CSV, TSV) if name.endswith(f".{kind}")), None)
    if kind is not None:
        return kind
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
    """The text of a JSON Lines, JSON, CSV, TSV or Parquet file as chunks of whole documents, each document
    followed by the separator. Empty documents are left out. Bad records raise a UserError, or are counted in
    `skipped`."""
    readers = {JSONL: _jsonl_items, JSON: _json_items, CSV: _csv_items, TSV: _tsv_items, PARQUET: _parquet_items}
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
    text = _record_text(record, text_field, "\\u" in line)
    if isinstance(text, _BadRecord):
        text.where = where
    return text


def _field_value(record: dict, name: str) -> Any:
    """The value of field `name` of a record: record[name] when the record has that key (a key may hold dots),
    else the value at the dotted path `name` ("meta.body": record["meta"]["body"]; a number picks an array's item:
    "turns.0.text"); _MISSING when there is none."""
    if name in record:
        return record[name]
    value: Any = record
    for part in name.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _no_field(record: dict, name: str) -> str:
    """Why a record has no field `name`: the fields it has, or where a dotted path stops."""
    parts = name.split(".")
    depth = 1  # the first `depth - 1` parts of the path reach a value, the first `depth` do not
    while depth < len(parts) and _field_value(record, ".".join(parts[:depth])) is not _MISSING:
        depth += 1
    if depth == 1:
        return f"no field '{name}' (its fields: {_some(list(record))}); choose the field with --text-field"
    stop = ".".join(parts[:depth - 1])
    inner = _field_value(record, stop)
    has = f"its fields: {_some(list(inner))}" if isinstance(inner, dict) else \
        f"it is an array of {len(inner):,} items" if isinstance(inner, list) else f"it is {_json_type(inner)}"
    return f"no field '{name}' ('{stop}' has no field '{parts[depth - 1]}'; {has}); choose the field with --text-field"


def _record_text(record: dict, text_field: str, escaped: bool) -> str | _BadRecord:
    """A record's text, or why it has none (a _BadRecord whose `where` the caller fills in). `escaped`: the
    record's JSON holds a \\u escape, so the text may hold a lone surrogate."""
    text = _field_value(record, text_field)
    if text is _MISSING:
        return _BadRecord("", _no_field(record, text_field))
    if not isinstance(text, str):
        return _BadRecord("", f"field '{text_field}' is {_json_type(text)}, not a string")
    if escaped and not _encodable(text):
        return _BadRecord("", f"field '{text_field}' holds a lone surrogate escape (\\ud800-\\udfff), which is no "
                              f"character")
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


def _json_items(path: Path, text_field: str) -> Iterator[str | _BadRecord]:
    """A .json file holding one array: each item is a record (an object, its text in the field) or a document
    (a string). Parsed item by item, so memory holds about one item, not the file. A syntax error stops reading
    whatever --skip-bad-records says: where the next item starts is then unknown."""
    with open_binary(path) as f:
        source = _JsonSource(path, f)
        first = source.next_char()
        if first is None:
            return  # an empty file: no text
        if first != "[":
            raise UserError(f"{path} holds {_json_start(first)}, not an array of records: a .json file in DATA must "
                            f"be one JSON array of objects (or of strings, each a document); name a file of one "
                            f"object per line .jsonl")
        source.pos += 1
        index, end = 0, source.next_char() == "]"
        source.pos += end  # an empty array: past its end
        while not end:
            item, start, escaped = source.value()
            text = _item_text(item, text_field, escaped)
            if isinstance(text, _BadRecord):
                text.where = f"item {index:,} (counting from 0, line {source.line_of(start):,})"
            yield text
            index += 1
            after = source.next_char()
            if after not in (",", "]"):
                source.fail("expecting ',' or ']' after an item" if after else "the file ends inside the array")
            source.pos += 1
            end = after == "]"
        if source.next_char() is not None:
            source.fail("more after the array's end")


def _item_text(item: Any, text_field: str, escaped: bool) -> str | _BadRecord:
    """The text of one item of a .json array: a record's field, or the item itself when it is a string."""
    if isinstance(item, dict):
        return _record_text(item, text_field, escaped)
    if not isinstance(item, str):
        return _BadRecord("", f"{_json_type(item)}, not an object (a record) or a string (a document)")
    if escaped and not _encodable(item):
        return _BadRecord("", "a string holding a lone surrogate escape (\\ud800-\\udfff), which is no character")
    return item


def _json_start(char: str) -> str:
    """What a JSON text that starts with `char` is, in words."""
    kinds = {"{": "a JSON object", '"': "a JSON string", "t": "true", "f": "false", "n": "null"}
    return kinds.get(char, "a JSON number" if char in "-0123456789" else "no JSON (it does not start with '[')")


class _JsonSource:
    """A .json file's text, read as the parser needs it: `buf[pos:]` is what is not parsed yet (what is parsed
    is dropped from the buffer, its lines counted, so error messages can still give a line and column)."""

    _space = re.compile(r"[ \t\n\r]*")
    _decoder = json.JSONDecoder()

    def __init__(self, path: Path, file: BinaryIO) -> None:
        self.path, self.file = path, file
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.eof = "", 0, False
        self.bytes_read = 0
        self.lines_dropped, self.chars_dropped, self.last_newline = 0, 0, -1  # last_newline: among dropped chars

    def read(self, size: int) -> None:
        """Drop what is parsed; append about `size` bytes more of text (or set eof)."""
        dropped = self.buf[:self.pos]
        if dropped:
            self.lines_dropped += dropped.count("\n")
            if "\n" in dropped:
                self.last_newline = self.chars_dropped + dropped.rindex("\n")
            self.chars_dropped += len(dropped)
            self.buf, self.pos = self.buf[self.pos:], 0
        try:
            data = self.file.read(size)
        except _READ_ERRORS as exc:
            raise UserError(f"cannot read {self.path}: {exc} (is the compressed file complete?)") from None
        pending = len(self.utf8.getstate()[0])
        try:
            text = self.utf8.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise UserError(f"{self.path} is not valid UTF-8: byte 0x{exc.object[exc.start]:02x} at byte offset "
                            f"{self.bytes_read - pending + exc.start:,}. Convert it to UTF-8 first (for example: "
                            f"iconv -f latin1 -t utf-8)") from None
        if not self.buf and not self.chars_dropped:  # the file's first characters
            text = text.removeprefix("\ufeff")  # a byte order mark
        self.bytes_read += len(data)
        self.buf += text
        self.eof = not data

    def next_char(self) -> str | None:
        """The next character that is not white space (not consumed), or None at the end of the file."""
        while True:
            self.pos = self._space.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if self.eof:
                return None
            self.read(_JSON_READ)

    def value(self) -> tuple[Any, int, bool]:
        """The JSON value that starts at the next character that is not white space (consumed), where it starts,
        and whether its text holds a \\u escape. An item cut by the end of the buffer is parsed again with more
        text: twice as much each time, so a long item costs linear time."""
        if self.next_char() is None:
            self.fail("the file ends inside the array")
        while True:
            try:
                item, end = self._decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                cut = exc.pos >= len(self.buf) - 6 or exc.msg.startswith("Unterminated string")
                if self.eof or not cut:
                    self.fail(exc.msg, exc.pos)
            except RecursionError:
                self.fail("nested too deeply")
            except ValueError as exc:  # a number too long to convert
                self.fail(str(exc).split(":")[0][:80])
            else:
                if end < len(self.buf) or self.eof:  # a number at the buffer's end may go on
                    start, self.pos = self.pos, end
                    return item, start, self.buf.find("\\u", start, end) >= 0  # no copy of the item
            self.read(max(_JSON_READ, len(self.buf)))

    def line_of(self, pos: int) -> int:
        return self.lines_dropped + self.buf.count("\n", 0, pos) + 1

    def fail(self, why: str, pos: int | None = None) -> NoReturn:
        pos = self.pos if pos is None else pos
        newline = self.buf.rfind("\n", 0, pos)
        column = pos - newline if newline >= 0 else self.chars_dropped + pos - self.last_newline
        raise UserError(f"{self.path} is not valid JSON at line {self.line_of(pos):,}, column {column:,} ({why}); "
                        f"a .json file in DATA must be one whole JSON array: fix the file (--skip-bad-records "
                        f"cannot skip a syntax error)")


def _tsv_items(path: Path, text_field: str) -> Iterator[str | _BadRecord]:
    """Tab-separated values, read as CSV is (a header row; a field in double quotes may hold tabs and newlines)."""
    return _csv_items(path, text_field, "\t")


def _csv_items(path: Path, text_field: str, delimiter: str = ",") -> Iterator[str | _BadRecord]:
    # A document is often longer than the csv module's default limit of 128 KiB per field.
    csv.field_size_limit(max(csv.field_size_limit(), (1 << 31) - 1))
    with open_binary(path) as f:
        reader = csv.reader(_decoded_lines(path, _reading(path, f)), delimiter=delimiter, strict=True)
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
        kind = "TSV" if reader.dialect.delimiter == "\t" else "CSV"
        return _BadRecord("", f"not valid {kind} ({exc})")


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
        column, *inner = _text_column(path, parquet.schema_arrow, text_field, pa)
        row = 0
        for group in range(parquet.num_row_groups):
            end = row + parquet.metadata.row_group(group).num_rows
            batches = parquet.iter_batches(_PARQUET_BATCH_ROWS, row_groups=[group], columns=[text_field])
            while row < end:
                try:
                    values = next(batches).column(column).to_pylist()
                except (StopIteration, pa.ArrowException, OSError) as exc:
                    why = "ends early" if isinstance(exc, StopIteration) else f"cannot be read ({_first_line(exc)})"
                    where = f"rows {row:,} to {end - 1:,} (row group {group}, counting from 0)"
                    yield _BadRecord(where, why, count=end - row)
                    break
                for text in values:
                    for part in inner:  # a field of a struct column: a null struct has no fields
                        text = None if text is None else text.get(part)
                    yield _BadRecord(f"row {row:,} (counting from 0)", f"'{text_field}' is null") \
                        if text is None else text
                    row += 1
            row = end


def _text_column(path: Path, schema: Any, text_field: str, pa: Any) -> list[str]:
    """Where the text is: [text_field] for a column of that name, else the column and the fields of struct
    columns that the dotted path names ("meta.body": ["meta", "body"]). Refuses a path that names no column or
    one that does not hold strings."""
    if text_field in schema.names:
        parts, kind = [text_field], schema.field(text_field).type
    else:
        parts, kind = text_field.split("."), pa.struct(list(schema))
        for depth, part in enumerate(parts):
            has = kind.get_field_index(part) >= 0 if pa.types.is_struct(kind) else False
            if not has and depth == 0:
                raise UserError(f"{path} has no column '{text_field}' (its columns: {_some(schema.names)}); "
                                f"choose the column with --text-field")
            if not has:
                stop = ".".join(parts[:depth])
                fields = f"its fields: {_some([f.name for f in kind])}" if pa.types.is_struct(kind) else \
                    f"it holds {kind}"
                raise UserError(f"{path} has no column '{text_field}' ('{stop}' has no field '{part}'; {fields}); "
                                f"choose the column with --text-field")
            kind = kind.field(part).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or
            getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise UserError(f"column '{text_field}' of {path} holds {kind}, not strings; choose a text column with "
                        f"--text-field")
    return parts


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
