"""DATA in other formats: JSON Lines (also .gz, .xz, .zst), JSON arrays, CSV, TSV and Parquet files give the text of
one field per record (a dotted path reaches into nested records); bad records are named by file and line (or row,
or item), or counted and skipped."""

from __future__ import annotations

import csv
import gzip
import json
import lzma
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from helpers import TINY, assert_clean_error, run_cli, train_tiny

from fundamentallm import records
from fundamentallm.checkpoint import _checksum
from fundamentallm.data import prepare_tokens
from fundamentallm.records import RecordFormat, Skipped, read_records

SEP = "\n\n"  # data.record_separator's default


@pytest.fixture
def documents(alice: str) -> list[str]:
    """Paragraphs of alice.txt, some with quotes, commas and newlines inside: one record each."""
    paragraphs = [p.strip() for p in alice[:30_000].split("\n\n") if p.strip()]
    return [*paragraphs, "Ünïcödé “quotes”, commas, and\na newline — 你好"]


def _jsonl_bytes(documents: list[str]) -> bytes:
    return "".join(json.dumps({"id": i, "text": d, "n": len(d)}) + "\n" for i, d in enumerate(documents)).encode()


def _write(path: Path, documents: list[str]) -> Path:
    """`documents` in the format that `path`'s name says, each as a record's 'text' field (with other fields)."""
    name = path.name
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"id": list(range(len(documents))), "text": documents}), path, row_group_size=7)
    elif name.endswith((".csv", ".tsv")):
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t" if name.endswith(".tsv") else ",")
            writer.writerow(["id", "text", "n"])
            writer.writerows([i, d, len(d)] for i, d in enumerate(documents))
    else:
        data = _jsonl_bytes(documents) if ".jsonl" in name else _json_bytes(documents) if ".json" in name else \
            "".join(d + SEP for d in documents).encode()
        compress = {".gz": gzip.compress, ".xz": lzma.compress, ".zst": zstandard.ZstdCompressor().compress}
        path.write_bytes(next((f(data) for suffix, f in compress.items() if name.endswith(suffix)), data))
    return path


def _json_bytes(documents: list[str]) -> bytes:
    """One JSON array of records, an item per line or more (indented), as JSON tools write it."""
    return json.dumps([{"id": i, "text": d, "n": len(d)} for i, d in enumerate(documents)], indent=1).encode()


def _read(paths: list[Path], fmt: RecordFormat | None = None, split: float = 0.1) -> str:
    """The text that DATA gives, through a byte tokenizer (which decodes every character back)."""
    data = prepare_tokens(paths, split, tokenizer="byte", fmt=fmt)
    return data.tokenizer.decode(np.concatenate([data.train, data.val]))


def _vocabulary(output: str) -> int:
    return int(re.search(r"vocabulary ([\d,]+)", output).group(1).replace(",", ""))


FORMATS = ["docs.jsonl", "docs.jsonl.gz", "docs.jsonl.xz", "docs.jsonl.zst", "docs.csv", "docs.parquet",
           "docs.txt.zst"]


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_trains_on_the_text_of_its_records(name: str, documents: list[str], tmp_path: Path) -> None:
    plain = _write(tmp_path / "same.txt", documents)  # the same documents as text, each followed by a blank line
    path = _write(tmp_path / name, documents)
    assert _read([path]) == plain.read_text(encoding="utf-8")
    trained = train_tiny(path, tmp_path / "run", "--max-steps", "2")
    assert (tmp_path / "run" / "final_model.pt").is_file()
    assert _vocabulary(trained.output) == _vocabulary(train_tiny(plain, tmp_path / "plain", "--max-steps", "2").output)


def test_directories_mix_formats(documents: list[str], tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "shard").mkdir(parents=True)
    _write(corpus / "a.txt", documents[:3])
    _write(corpus / "b.jsonl", documents[3:6])
    _write(corpus / "c.csv", documents[6:9])
    _write(corpus / "d.parquet", documents[9:12])
    _write(corpus / "shard" / "e.jsonl.zst", documents[12:15])
    _write(corpus / "f.tsv", documents[15:18])
    (corpus / "notes.md").write_text("not data")
    (corpus / "dataset_info.json").write_text('{"description": "a dataset\'s metadata, no records"}')
    data = prepare_tokens([corpus], 0.1)
    assert [f.name for f in data.files] == ["a.txt", "b.jsonl", "c.csv", "d.parquet", "f.tsv", "e.jsonl.zst"]
    assert _read([corpus]) == "".join(d + SEP for d in documents[:12] + documents[15:18] + documents[12:15])


def test_text_field_and_separator_choose_the_text_and_key_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text('{"title": "One", "body": "first body"}\n{"title": "Two", "body": "second body"}\n')
    body = prepare_tokens([path], 0.2, fmt=RecordFormat(text_field="body"))
    assert body.tokenizer.decode(np.concatenate([body.train, body.val])) == "first body\n\nsecond body\n\n"
    title = prepare_tokens([path], 0.2, fmt=RecordFormat(text_field="title", separator=" | "))
    assert not title.from_cache  # another field: another cache entry, with the other field's text
    assert title.tokenizer.decode(np.concatenate([title.train, title.val])) == "One | Two | "
    again = prepare_tokens([path], 0.2, fmt=RecordFormat(text_field="body"))
    assert again.from_cache and again.fingerprint == body.fingerprint
    assert prepare_tokens([path], 0.2, fmt=RecordFormat("body", "\n")).fingerprint != body.fingerprint
    text = tmp_path / "plain.txt"
    text.write_text("plain text, no records " * 20)
    # Text files read no field: their key (and so older runs' caches and checkpoints) does not depend on it.
    assert prepare_tokens([text], 0.1).fingerprint == prepare_tokens([text], 0.1, fmt=RecordFormat("x")).fingerprint


def test_text_field_flag_reaches_the_run(tmp_path: Path, documents: list[str]) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in documents), encoding="utf-8")
    assert_clean_error(run_cli("train", path, "-o", tmp_path / "run", *TINY), "docs.jsonl, line 1: no field 'text'",
                       "its fields: body", "--text-field")
    train_tiny(path, tmp_path / "run", "--max-steps", "2", "--text-field", "body")
    assert "text_field: body" in (tmp_path / "run" / "config.yaml").read_text()
    # The run's own setting travels with it: resuming reads the same field without the flag.
    resumed = run_cli("train", path, "-o", tmp_path / "run", *TINY, "--resume", "auto", "--max-steps", "3")
    assert resumed.exit_code == 0, resumed.stderr
    # So does evaluate's reading of the run's own validation split.
    split = run_cli("evaluate", tmp_path / "run" / "final_model.pt", "--json")
    assert split.exit_code == 0 and json.loads(split.stdout)["characters"] > 0, split.stderr


def test_val_data_lr_find_and_fine_tuning_read_records(tmp_path: Path, documents: list[str]) -> None:
    train, val = _write(tmp_path / "train.jsonl", documents[:-5]), _write(tmp_path / "val.csv", documents[-5:])
    out = train_tiny(train, tmp_path / "run", "--max-steps", "2", "--val-data", val)
    assert "val.csv" in out.output
    tuned = train_tiny(_write(tmp_path / "more.parquet", documents[5:]), tmp_path / "tuned", "--max-steps", "2",
                       "--init-from", tmp_path / "run" / "final_model.pt", "--extend-vocab")
    assert "Fine-tuning from" in tuned.output
    found = run_cli("lr-find", train, "-o", tmp_path / "lr", "--device", "cpu", "--steps", "10", *TINY)
    assert found.exit_code == 0, found.stderr


def test_evaluate_reads_a_jsonl_as_its_text(tmp_path: Path, documents: list[str]) -> None:
    plain = _write(tmp_path / "docs.txt", documents)
    train_tiny(plain, tmp_path / "run", "--max-steps", "2")
    model = tmp_path / "run" / "final_model.pt"
    scores = []
    for path in (plain, _write(tmp_path / "docs.jsonl.gz", documents)):
        result = run_cli("evaluate", model, path, "--json")
        assert result.exit_code == 0, result.stderr
        scores.append(json.loads(result.stdout))
    assert scores[1]["characters"] == scores[0]["characters"] == len(plain.read_text(encoding="utf-8"))
    assert scores[1]["loss_per_token"] == pytest.approx(scores[0]["loss_per_token"], abs=1e-6)


@pytest.mark.parametrize("name", ["docs.tsv", "docs.json", "docs.json.xz"])
def test_tsv_and_json_arrays_give_the_text_of_their_records(name: str, documents: list[str], tmp_path: Path) -> None:
    plain = _write(tmp_path / "same.txt", documents)
    assert _read([_write(tmp_path / name, documents)]) == plain.read_text(encoding="utf-8")


def test_a_json_array_is_read_item_by_item(documents: list[str], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Items cut by the end of what was read are parsed again with more: with reads of a few bytes, and items
    far longer than one read, the text is the same; so is an array of strings (each a document)."""
    long = [*documents, "x" * 5_000, "\\u escapes: caf\u00e9 \U0001f600"]
    plain = "".join(d + SEP for d in long)
    records_file = tmp_path / "docs.json"
    records_file.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": d, "n": 12345678} for d in long]).encode())
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(long, indent=2, ensure_ascii=False), encoding="utf-8")
    for size in (7, 1 << 20):
        monkeypatch.setattr(records, "_JSON_READ", size)
        for path in (records_file, strings):
            assert "".join(read_records(path, RecordFormat(), Skipped())) == plain, (size, path.name)


def test_dotted_text_fields_reach_into_nested_records(tmp_path: Path) -> None:
    nested = tmp_path / "nested.jsonl"
    nested.write_text('{"meta": {"body": "one", "title": "T1"}}\n{"meta.body": "two", "meta": {"body": "not me"}}\n'
                      '{"meta": {"turns": [{"text": "a"}, {"text": "three"}], "body": "four"}}\n')
    assert _read([nested], RecordFormat("meta.body", "|")) == "one|two|four|"
    assert _read([nested], RecordFormat("meta.turns.1.text", "|", skip_bad=True)) == "three|"
    struct = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"id": [1, 2], "meta": [{"body": "p1", "n": 1}, {"body": "p2", "n": 2}]}), struct)
    assert _read([struct], RecordFormat("meta.body", "|")) == "p1|p2|"
    dotted = tmp_path / "dotted.tsv"
    dotted.write_text("id\tmeta.body\n1\tcolumn named with a dot\n")
    assert _read([dotted], RecordFormat("meta.body", "|")) == "column named with a dot|"
    # The field is part of the cache key: another path, another entry.
    assert prepare_tokens([nested], 0.5, fmt=RecordFormat("meta.body")).fingerprint != \
        prepare_tokens([nested], 0.5, fmt=RecordFormat("meta.title", skip_bad=True)).fingerprint
    # Through the real CLI, on a .json array of nested records.
    posts = tmp_path / "posts.json"
    posts.write_text(json.dumps([{"meta": {"body": f"post number {i} says hello. " * 8}} for i in range(40)]))
    train_tiny(posts, tmp_path / "run", "--max-steps", "2", "--text-field", "meta.body")


# ----------------------------------------------------------------------------------------------------------
# Bad records: one line naming the file and the line or row; --skip-bad-records counts them instead


GOOD = json.dumps({"text": "a good record with enough text to train on. " * 4})
BAD_JSONL = [
    ('{"title": "no text here"}', "line 2: no field 'text' (its fields: title)"),
    ('{"text": 42}', "line 2: field 'text' is a number, not a string"),
    ('{"text": null}', "line 2: field 'text' is null, not a string"),
    ('{"text": ["a", "b"]}', "line 2: field 'text' is an array, not a string"),
    ('{"text": "unclosed', "line 2: not valid JSON (Unterminated string"),
    ("text without any JSON", "line 2: not valid JSON (Expecting value at column 1)"),
    ('["a", "list"]', "line 2: an array in JSON, not an object"),
    ('{"text": "\\ud800 alone"}', "line 2: field 'text' holds a lone surrogate"),
]


@pytest.mark.parametrize(("line", "message"), BAD_JSONL)
def test_bad_jsonl_records_are_named(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n{line}\n{GOOD}\n" * 3)
    assert_clean_error(run_cli("train", path, "-o", tmp_path / "run", *TINY), f"bad.jsonl, {message}",
                       "--skip-bad-records")
    assert not (tmp_path / "run").exists()


def test_invalid_utf8_in_a_jsonl_line_is_a_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(f"{GOOD}\n".encode() + b'{"text": "caf\xe9"}\n')
    assert_clean_error(run_cli("train", path, "-o", tmp_path / "run", *TINY),
                       "bytes.jsonl, line 2: not valid UTF-8 (byte 0xe9 at column 14)")


@pytest.mark.parametrize(("content", "message"), [
    ("id,text\n1,fine text here\n2\n", "bad.csv, line 3: 1 field(s), no 'text' (the header has 2)"),
    ('id,text\n1,fine text here\n2,"a"b\n', "bad.csv, line 3: not valid CSV"),
    ('id,text\n1,fine text here\n2,"never closed\n', "bad.csv, line 3: not valid CSV (unexpected end of data)"),
    ("id,body\n1,text in another column\n", "bad.csv has no column 'text' in its first line (its header: id, body)"),
])
def test_bad_csv_is_named(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert_clean_error(run_cli("train", path, "-o", tmp_path / "run", *TINY), message)


@pytest.mark.parametrize(("content", "message"), [
    ('{"text": "one object"}', "bad.json holds a JSON object, not an array of records"),
    ('{"text": "a"}\n{"text": "b"}\n', "name a file of one object per line .jsonl"),
    ("plain text", "bad.json holds no JSON (it does not start with '[')"),
    ('[\n {"text": "fine text here"},\n {"text": "x" "y"}\n]', "bad.json is not valid JSON at line 3, column 15"),
    ('[\n {"text": "fine text here"},\n {"text": "cut sh', "bad.json is not valid JSON at line 3"),
    ('[{"text": "fine text here"}] [', "more after the array's end"),
    ('[{"text": "fine text here"},\n 42]', "bad.json, item 1 (counting from 0, line 2): a number, not an object"),
    ('[{"meta": {"body": "fine text here"}},\n{"meta": {"title": "x"}}]',
     "bad.json, item 1 (counting from 0, line 2): no field 'meta.body' ('meta' has no field 'body'; its fields: "
     "title)"),
])
def test_bad_json_is_named(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    field = ["--text-field", "meta.body"] if "meta.body" in message else []
    result = run_cli("train", path, "-o", tmp_path / "run", *TINY, *field)
    assert_clean_error(result, message)
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_bad_tsv_and_json_items_are_skipped_on_request(tmp_path: Path) -> None:
    array = tmp_path / "some.json"
    array.write_text('[{"text": "kept one"}, {"title": "no text"}, null, "kept two", {"text": 3}]')
    skipped = Skipped()
    assert "".join(read_records(array, RecordFormat(skip_bad=True), skipped)) == f"kept one{SEP}kept two{SEP}"
    assert skipped.report() == [f"Skipped 3 bad records in {array} (first: item 1 (counting from 0, line 1), no "
                                f"field 'text' (its fields: title); choose the field with --text-field)"]
    tsv = tmp_path / "bad.tsv"
    tsv.write_text('id\ttext\n1\tfine text here\n2\t"a"b\n')
    assert_clean_error(run_cli("train", tsv, "-o", tmp_path / "run", *TINY), "bad.tsv, line 3: not valid TSV")


def _damaged_row_group(path: Path, group: int) -> Path:
    """A Parquet file whose footer is whole but one row group's text pages are overwritten."""
    column = pq.ParquetFile(path).metadata.row_group(group).column(1)
    data = bytearray(path.read_bytes())
    start = column.dictionary_page_offset or column.data_page_offset
    data[start : start + column.total_compressed_size] = b"\xab" * column.total_compressed_size
    path.write_bytes(bytes(data))
    return path


def test_bad_parquet_is_named(tmp_path: Path, documents: list[str]) -> None:
    path = _write(tmp_path / "docs.parquet", documents)  # row groups of 7 rows
    truncated = tmp_path / "cut.parquet"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_clean_error(run_cli("train", truncated, "-o", tmp_path / "a", *TINY),
                       "cut.parquet is not a readable Parquet file", "is it complete?")
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": [documents[0], None, documents[1]]}), nulls)
    assert_clean_error(run_cli("train", nulls, "-o", tmp_path / "b", *TINY),
                       "nulls.parquet, row 1 (counting from 0): 'text' is null")
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3], "body": ["a", "b", "c"]}), numbers)
    assert_clean_error(run_cli("train", numbers, "-o", tmp_path / "c", *TINY),
                       "column 'text' of", "holds int64, not strings")
    assert_clean_error(run_cli("train", numbers, "-o", tmp_path / "c", *TINY, "--text-field", "title"),
                       "has no column 'title' (its columns: text, body)")
    assert_clean_error(run_cli("train", numbers, "-o", tmp_path / "c", *TINY, "--text-field", "body.inner"),
                       "has no column 'body.inner' ('body' has no field 'inner'; it holds string)")
    damaged = _damaged_row_group(path, 1)
    assert_clean_error(run_cli("train", damaged, "-o", tmp_path / "d", *TINY),
                       "docs.parquet, rows 7 to 13 (row group 1, counting from 0): cannot be read")


def test_parquet_is_read_row_group_by_row_group(tmp_path: Path, documents: list[str]) -> None:
    path = _write(tmp_path / "docs.parquet", documents)
    assert pq.ParquetFile(path).num_row_groups == -(-len(documents) // 7) > 3
    assert _read([path]) == "".join(d + SEP for d in documents)
    damaged = _damaged_row_group(path, 2)
    assert _read([damaged], RecordFormat(skip_bad=True)) == "".join(d + SEP for d in documents[:14] + documents[21:])


def test_skip_bad_records_counts_and_reports_them(tmp_path: Path, documents: list[str]) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"text": d}) for d in documents]
    lines[6:6] = ['{"title": "x"}', "not json", '{"text": 7}']  # lines 7, 8 and 9
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = f"Skipped 3 bad records in {path} (first: line 7, no field 'text'"
    for attempt in ("built", "from the cache"):
        result = train_tiny(path, tmp_path / attempt, "--max-steps", "2", "--skip-bad-records")
        assert report in result.stderr, (attempt, result.stderr)
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(json.dumps({"text": d}) for d in documents) + "\n", encoding="utf-8")
    assert _read([path], RecordFormat(skip_bad=True)) == _read([clean])
    assert "Skipped" not in train_tiny(clean, tmp_path / "clean", "--max-steps", "2", "--skip-bad-records").stderr
    # The setting keys the cache: without it, the same file is read again and stops at the first bad record.
    assert_clean_error(run_cli("train", path, "-o", tmp_path / "strict", *TINY), "mixed.jsonl, line 7")
    everything_bad = tmp_path / "junk.jsonl"
    everything_bad.write_text("junk\n" * 5)
    assert_clean_error(run_cli("train", everything_bad, "-o", tmp_path / "junk", *TINY, "--skip-bad-records"),
                       "no text", "Skipped 5 bad records")


def test_truncated_zst_is_refused(tmp_path: Path, documents: list[str]) -> None:
    path = _write(tmp_path / "docs.jsonl.zst", documents * 3)
    path.write_bytes(path.read_bytes()[:-20])
    assert_clean_error(run_cli("train", path, "-o", tmp_path / "run", *TINY), "cannot read", "docs.jsonl.zst",
                       "is the compressed file complete?")


@pytest.mark.parametrize(("module", "name", "extra"), [("pyarrow", "docs.parquet", "fundamentallm[parquet]"),
                                                        ("zstandard", "docs.txt.zst", "fundamentallm[zstd]")])
def test_missing_library_names_the_extra(tmp_path: Path, documents: list[str], monkeypatch: pytest.MonkeyPatch,
                                         module: str, name: str, extra: str) -> None:
    path = _write(tmp_path / name, documents)
    monkeypatch.setitem(sys.modules, module, None)  # as if the library were not installed
    assert_clean_error(run_cli("train", path, "-o", tmp_path / "run", *TINY), f"pip install '{extra}'")


def test_a_run_that_trained_on_a_record_file_as_text_is_refused_with_the_reason(tmp_path: Path,
                                                                                documents: list[str]) -> None:
    """Before record files were read by field, a .jsonl (or .json, .csv, .tsv) file trained as its raw text, and the
    run recorded that text's key, which does not depend on the file's name: a .txt file of the same bytes makes
    such a run. Resuming it on the record file now gives other text, or none: either way one line says why."""
    raw = tmp_path / "old.txt"
    raw.write_bytes(_jsonl_bytes(documents[:30]))
    train_tiny(raw, tmp_path / "run", "--max-steps", "2")
    for name in ("docs.jsonl", "docs.json"):  # records with the field; a .json that is no array of records
        path = tmp_path / name
        path.write_bytes(raw.read_bytes())
        result = run_cli("train", path, "-o", tmp_path / "run", *TINY, "--resume", "auto", "--max-steps", "3")
        assert_clean_error(result, f"it trained on the raw text of {path} (its JSON syntax and all)",
                           "now read as records", "another directory (-o)", "--text-field")
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # evaluate without DATA rebuilds the validation split from the files the run recorded: not from these now.
    payload = torch.load(tmp_path / "run" / "final_model.pt", weights_only=True)
    payload["data"]["files"] = [str(tmp_path / "docs.jsonl")]
    payload["checksum"] = _checksum(payload)
    torch.save(payload, tmp_path / "moved.pt")
    result = run_cli("evaluate", tmp_path / "moved.pt")
    assert_clean_error(result, f"trained on the raw text of {tmp_path / 'docs.jsonl'}", "now read as records",
                       "pass the text to evaluate on as DATA")
