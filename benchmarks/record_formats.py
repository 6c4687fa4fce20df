#!/usr/bin/env python
"""Record formats against plain text: peak memory and time of building the token cache from the same documents
as .txt, .jsonl, .jsonl.zst, .csv and .parquet, side by side in one call.

    python benchmarks/record_formats.py --corpus gutenberg_100M.txt.xz --json record_formats.json

The corpus (text, or .gz/.xz/.zst) is cut into documents at blank lines; every format gets the same documents
(the .txt holds each followed by a blank line, which is what the record formats give), so every format must give
the same number of characters (checked). Each build runs in a fresh child process with an empty cache, under
`/usr/bin/time -v`, whose "Maximum resident set size" is the figure reported: not os.wait4 on a child of this
process, since Linux carries the RSS peak of a forked process over its exec, so a child would report at least this
(large) process's memory. `parquet-1-group` is the same Parquet data in a single row group, the worst case for a
reader that goes row group by row group. The files live in a temporary directory, removed at the end. Not part of
the tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # big_corpus.py, beside this file

from big_corpus import _PREPARE, _env

from fundamentallm.data import iter_text
from fundamentallm.records import RecordFormat, Skipped

FORMATS = ("txt", "jsonl", "jsonl.zst", "csv", "parquet")
TIME = "/usr/bin/time"


def documents(corpus: Path) -> Iterator[str]:
    """The corpus's documents (cut at blank lines), streamed: nothing holds the whole text."""
    carry = ""
    for chunk in iter_text(corpus, RecordFormat(), Skipped()):
        *whole, carry = (carry + chunk).split("\n\n")
        yield from (d for d in whole if d.strip())
    if carry.strip():
        yield carry


def write_formats(corpus: Path, workdir: Path, row_group_rows: int) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    paths = {name: workdir / f"corpus.{name}" for name in FORMATS}
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    with paths["txt"].open("w", encoding="utf-8") as txt, paths["jsonl"].open("w", encoding="utf-8") as jsonl, \
            paths["csv"].open("w", encoding="utf-8", newline="") as csv_file, \
            pq.ParquetWriter(paths["parquet"], schema) as parquet:
        writer = csv.writer(csv_file)
        writer.writerow(["id", "text"])
        batch: list[str] = []
        for index, doc in enumerate(documents(corpus)):
            txt.write(doc + "\n\n")
            jsonl.write(json.dumps({"id": index, "text": doc}, ensure_ascii=False) + "\n")
            writer.writerow([index, doc])
            batch.append(doc)
            if len(batch) == row_group_rows:
                parquet.write_table(_table(pa, schema, batch, index), row_group_size=row_group_rows)
                batch = []
        if batch:
            parquet.write_table(_table(pa, schema, batch, index), row_group_size=row_group_rows)
    with paths["jsonl"].open("rb") as source, paths["jsonl.zst"].open("wb") as target:
        zstandard.ZstdCompressor(level=3).copy_stream(source, target)
    paths["parquet-1-group"] = workdir / "one-group.parquet"
    table = pq.read_table(paths["parquet"])
    pq.write_table(table, paths["parquet-1-group"], row_group_size=max(1, table.num_rows))
    return paths


def _table(pa: Any, schema: Any, batch: list[str], last: int) -> Any:
    return pa.table({"id": list(range(last - len(batch) + 1, last + 1)), "text": batch}, schema=schema)


def measure(paths: dict[str, Path], workdir: Path) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name, path in paths.items():
        cache = workdir / f"cache-{name.replace('.', '-')}"
        start = time.perf_counter()
        done = subprocess.run([TIME, "-v", sys.executable, "-c", _PREPARE, str(path), str(cache)], env=_env(cache),
                              capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024
        info = json.loads(done.stdout)
        rows[name] = {"file_bytes": path.stat().st_size, "chars": info["chars"], "vocab": info["vocab"],
                      "prepare_seconds": info["seconds"], "process_seconds": wall, "peak_rss_bytes": peak}
        shutil.rmtree(cache)
        print(f"{name:15} {path.stat().st_size / 1e6:8.1f} MB  {info['chars']:>12,} chars  "
              f"build {info['seconds']:6.1f} s  peak RSS {peak / 2**20:6.0f} MiB", flush=True)
    chars = {row["chars"] for row in rows.values()}
    assert len(chars) == 1, f"the formats gave different text: {rows}"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="a text corpus (.txt, or .gz/.xz/.zst)")
    parser.add_argument("--row-group-rows", type=int, default=10_000, help="Parquet rows per row group")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument("--workdir", type=Path, help="where the files go (default: a temporary directory)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="record-formats-", dir=args.workdir))
    try:
        start = time.perf_counter()
        paths = write_formats(args.corpus, workdir, args.row_group_rows)
        print(f"wrote the formats in {time.perf_counter() - start:.0f} s", flush=True)
        result = {"corpus": str(args.corpus), "machine": platform.processor() or platform.machine(),
                  "row_group_rows": args.row_group_rows, "formats": measure(paths, workdir)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
