#!/usr/bin/env python
"""Which tokenizer? Validation bits per character of char, byte and BPE models trained for the same wall time,
and the speed of training and applying BPE on a big corpus.

    python benchmarks/tokenizers.py --corpus tinyshakespeare.txt --budget 600
    python benchmarks/tokenizers.py --corpus gutenberg_10M.txt --budget 600 --vocab-sizes 1024,4096
    python benchmarks/tokenizers.py --skip-quality --bpe-corpus gutenberg_100M.txt.xz

Quality rows: each runs `fundamentallm train CORPUS --config fast-cpu --set data.tokenizer=...` in a child
process (a fast-cpu-sized model: 4 layers, width 128, context 128 tokens, Muon, no dropout, weight decay 0.1), with
a constant learning rate after the warm-up (no run knows in advance how many steps its budget buys), and stops it
with SIGINT once
`--budget` seconds of wall time have passed since launch (tokenizing and training BPE included), exactly as a
user pressing Ctrl-C would. The checkpoint it saves is then scored by `fundamentallm evaluate` on the whole
validation split (the last 10% of the characters, the same text for every tokenizer): bits per character are
total bits over those characters, so the rows compare.

Throughput row: BPE training (Hugging Face tokenizers, streamed over 2 MB chunks of the text, as the token
cache does) and encoding, in MB of UTF-8 text per second, with the peak resident memory of the child process.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The child that measures BPE: trains on the corpus streamed in chunks, then encodes it all, timing both.
_BPE = """
import json, sys, time
from pathlib import Path
from fundamentallm.data import decode_chunk, iter_byte_chunks
from fundamentallm.tokenizer import BPETokenizer

path, vocab = Path(sys.argv[1]), int(sys.argv[2])
def chunks():
    for offset, data in iter_byte_chunks(path):
        yield decode_chunk(path, offset, data)
start = time.perf_counter()
tokenizer = BPETokenizer.train(chunks(), vocab)
trained = time.perf_counter()
tokens = sum(len(tokenizer.encode_array(text)) for text in chunks())
encoded = time.perf_counter()
print(json.dumps({"train_seconds": trained - start, "encode_seconds": encoded - trained, "tokens": tokens,
                  "vocab": tokenizer.vocab_size}))
"""


def _env(cache_dir: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "FUNDAMENTALLM_CACHE_DIR": str(cache_dir)}


def quality_row(corpus: Path, kind: str, vocab_size: int | None, budget: float, workdir: Path,
                extra: list[str]) -> dict[str, Any]:
    """Train one tokenizer's model for `budget` seconds of wall time, then score it on the validation split."""
    name = kind if vocab_size is None else f"{kind}-{vocab_size}"
    run = workdir / name
    cmd = [sys.executable, "-m", "fundamentallm", "train", str(corpus), "--config", "fast-cpu", "-o", str(run),
           "--device", "cpu", "--epochs", "1000", "--set", f"data.tokenizer={kind}",
           "--set", "training.scheduler=constant", "--set", "model.dropout=0", "--set", "training.weight_decay=0.1",
           "--set", "training.eval_batches=4",
           "--set", "training.save_best=false", *extra]
    if vocab_size is not None:
        cmd += ["--set", f"data.vocab_size={vocab_size}"]
    env = _env(workdir / "cache")
    with open(workdir / f"{name}.log", "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # saves interrupted.pt after the current step
            proc.wait()
        wall = time.perf_counter() - start
    checkpoint = run / "interrupted.pt" if (run / "interrupted.pt").exists() else run / "final_model.pt"
    if not checkpoint.exists():
        raise RuntimeError(f"{name}: no checkpoint; see {workdir / f'{name}.log'}")
    scored = subprocess.run([sys.executable, "-m", "fundamentallm", "evaluate", str(checkpoint), "--json",
                             "--device", "cpu"], capture_output=True, text=True, env=env, check=True)
    result = json.loads(scored.stdout)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    header = next(r for r in records if r["kind"] == "run")
    steps = max((r["step"] for r in records if "step" in r), default=0)
    return {"tokenizer": name, "vocab": header["vocab_size"], "parameters": header["parameters"],
            "steps": steps, "wall_seconds": wall, "val_characters": result["characters"],
            "val_tokens": result["tokens"], "chars_per_token": result["characters"] / result["tokens"],
            "loss_per_token": result["loss_per_token"], "bits_per_char": result["bits_per_char"]}


def bpe_throughput(corpus: Path, vocab_size: int, workdir: Path) -> dict[str, Any]:
    """BPE training and encoding speed on `corpus` (unpacked first when compressed), in a child process."""
    text = corpus
    if corpus.name.endswith(".xz"):
        text = workdir / corpus.name[: -len(".xz")]
        with lzma.open(corpus, "rb") as src, open(text, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    size = text.stat().st_size
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, "-c", _BPE, str(text), str(vocab_size)], stdout=out,
                                env=_env(workdir / "cache"), text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError("the BPE measurement failed")
        out.seek(0)
        measured = json.loads(out.read())
    mb = size / 1e6
    return {"corpus": str(corpus), "text_mb": mb, "vocab": measured["vocab"], "tokens": measured["tokens"],
            "train_seconds": measured["train_seconds"], "train_mb_per_s": mb / measured["train_seconds"],
            "encode_seconds": measured["encode_seconds"], "encode_mb_per_s": mb / measured["encode_seconds"],
            "peak_rss_mb": usage.ru_maxrss / 1024}


def format_tables(results: dict[str, Any]) -> str:
    lines = [f"Machine: {results['machine']}"]
    if results["quality"]:
        lines += ["", f"Corpus {results['corpus']}, {results['budget']:.0f} s of wall time per row:", "",
                  "| tokenizer | vocabulary | parameters | steps | characters/token | loss/token (nats) | "
                  "val bits/char |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in results["quality"]:
            lines.append(f"| {r['tokenizer']} | {r['vocab']:,} | {r['parameters']:,} | {r['steps']:,} | "
                         f"{r['chars_per_token']:.2f} | {r['loss_per_token']:.4f} | **{r['bits_per_char']:.4f}** |")
    if results.get("bpe"):
        b = results["bpe"]
        lines += ["", f"BPE on {b['corpus']} ({b['text_mb']:.1f} MB, vocabulary {b['vocab']:,}): training "
                  f"{b['train_seconds']:.1f} s = {b['train_mb_per_s']:.2f} MB/s, encoding {b['encode_seconds']:.1f} s "
                  f"= {b['encode_mb_per_s']:.2f} MB/s, {b['text_mb'] * 1e6 / b['tokens']:.2f} bytes per token, "
                  f"peak memory {b['peak_rss_mb']:,.0f} MiB"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, help="the text the quality rows train on (unless --skip-quality)")
    parser.add_argument("--budget", type=float, default=600.0, help="wall seconds per quality row")
    parser.add_argument("--vocab-sizes", default="512,1024,4096", help="BPE vocabulary sizes to compare")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--bpe-corpus", type=Path, help="also measure BPE training and encoding speed on this")
    parser.add_argument("--bpe-vocab", type=int, default=4096)
    parser.add_argument("--set", dest="assignments", action="append", default=[],
                        help="KEY=VALUE passed to every training run")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "tokenizers.json")
    args = parser.parse_args()
    if args.corpus is None and not args.skip_quality:
        parser.error("give --corpus CORPUS (the quality rows train on it), or --skip-quality")
    extra = [arg for a in args.assignments for arg in ("--set", a)]
    results: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                               "corpus": str(args.corpus), "budget": args.budget, "time": time.time(),
                               "quality": [], "bpe": None}
    with tempfile.TemporaryDirectory(prefix="fundamentallm-tokenizers-") as tmp:
        workdir = Path(tmp)
        if not args.skip_quality:
            rows = [("char", None), ("byte", None)] + [("bpe", int(v)) for v in args.vocab_sizes.split(",") if v]
            for kind, vocab in rows:
                print(f"training {kind}{'' if vocab is None else f'-{vocab}'} for {args.budget:.0f} s ...",
                      flush=True)
                results["quality"].append(quality_row(args.corpus, kind, vocab, args.budget, workdir, extra))
        if args.bpe_corpus:
            print(f"BPE training and encoding on {args.bpe_corpus} ...", flush=True)
            results["bpe"] = bpe_throughput(args.bpe_corpus, args.bpe_vocab, workdir)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(format_tables(results))
    print(f"Numbers written to {args.json}")


if __name__ == "__main__":
    main()
