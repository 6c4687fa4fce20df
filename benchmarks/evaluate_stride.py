#!/usr/bin/env python
"""What `evaluate`'s choices change: bits per character with windows side by side (the default) against sliding
windows (--stride), float32 (the default) against the training's precision, and evaluation speed against the
training's own tokens per second.

    fundamentallm train CORPUS -c fast-cpu --max-steps 150 -o /tmp/brief
    python benchmarks/evaluate_stride.py /tmp/brief/final_model.pt [DATA ...] [-o evaluate_stride.json]

Without DATA the checkpoint's own validation split is scored (for tinyshakespeare: its last 10%, 111,539
characters). Each row calls `fundamentallm.evaluate.evaluate` in this process (after one warm-up call), timed;
tokens/s are the text's tokens over the wall time (a stride of context/k does about k times the work). The
training's tokens/s is the median of the run's train records (its metrics.jsonl beside the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import fundamentallm  # noqa: E402, F401 - before torch: how its CPU threads wait
from fundamentallm.checkpoint import read_checkpoint  # noqa: E402
from fundamentallm.evaluate import evaluate  # noqa: E402
from fundamentallm.metrics import read_metrics  # noqa: E402


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return f"{model}, {os.cpu_count()} cores; {load}"


def row(name: str, checkpoint: Path, data: list[str] | None, **options) -> dict:
    start = time.perf_counter()
    result = evaluate(checkpoint, data, device="cpu", **options)
    seconds = time.perf_counter() - start
    return {"row": name, **options, "bits_per_char": result.bits_per_char, "loss_per_token": result.loss_per_token,
            "precision": result.precision, "stride": result.stride, "seconds": seconds,
            "tokens_per_sec": result.tokens / seconds, "tokens": result.tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("data", nargs="*", help="text to score (default: the run's validation split)")
    parser.add_argument("-o", "--output", type=Path, default=Path("evaluate_stride.json"))
    args = parser.parse_args()
    data = args.data or None
    evaluate(args.checkpoint, data, device="cpu")  # warm-up: caches, allocator, the token cache
    context = read_checkpoint(args.checkpoint).config.training.sequence_length
    rows = [row("side by side, fp32 (default)", args.checkpoint, data),
            row("side by side, training precision", args.checkpoint, data, training_precision=True),
            row("side by side, fp32, batch 16", args.checkpoint, data, batch_size=16)]
    for k in (2, 4):
        rows.append(row(f"--stride {context // k} (context/{k})", args.checkpoint, data, stride=context // k))
    trains = [r["tokens_per_sec"] for r in read_metrics(args.checkpoint.parent) if r["kind"] == "train"]
    training = statistics.median(trains[1:] or trains) if trains else None
    report = {"machine": machine(), "checkpoint": str(args.checkpoint), "data": args.data or "validation split",
              "context": context, "training_tokens_per_sec": training, "rows": rows}
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['machine']}\ncontext {context}; training {training or 0:,.0f} tokens/s (median of its records)")
    print(f"{'row':<36} {'bpc':>8} {'seconds':>8} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['row']:<36} {r['bits_per_char']:8.4f} {r['seconds']:8.2f} {r['tokens_per_sec']:10,.0f}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
