"""`fundamentallm bench`'s rows with nanoGPT's beside them, and time to a target validation loss, in one call.

    python benchmarks/side_by_side.py CORPUS [--device cpu|cuda] [--rows small:32,medium:8] [--steps N]
        [--peer NANOGPT_DIR [--peer-set KEY=VALUE ...]] [--recipe NAME|PATH --target LOSS] [--set KEY=VALUE ...]
        [-o bench.json]

Every throughput row is `fundamentallm bench`'s own (a real `fundamentallm train` child process); with --peer,
nanoGPT (benchmarks/peer.py: run from a copy, never imported) then trains the same shape on the same device, so
each speed-up compares two runs of the same call. With --recipe, the wall time from launching that config to
its first evaluation at or below --target nats per character (start-up and compilation included), and with
--peer also nanoGPT's own character recipe to the same target. benchmarks/gpu.sh runs this on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # peer.py, beside this file

from peer import Peer, QualityRow

from fundamentallm.bench import (
    DEFAULT_ROWS,
    GENERATION_PRESETS,
    check_writable,
    describe,
    device_peak_tflops,
    format_tables,
    measure_generation,
    measure_throughput,
    parse_rows,
    train_child,
)
from fundamentallm.config import resolve_config
from fundamentallm.data import find_data_files, iter_text
from fundamentallm.device import select_device
from fundamentallm.files import atomic_write_bytes
from fundamentallm.metrics import read_metrics
from fundamentallm.records import RecordFormat, Skipped

PEER_TIMEOUT_SECONDS = 600  # nanoGPT's time-to-target run stops here if it has not reached the target


def corpus_text(data: Path) -> str:
    """DATA (a file or a directory of data files) as one text, for nanoGPT's own dataset files."""
    return "".join(text for path in find_data_files([data]) for text in iter_text(path, RecordFormat(), Skipped()))


def measure_quality(data: Path, recipe: str, target: float, device: torch.device, workdir: Path,
                    extra: list[str]) -> QualityRow:
    out = workdir / f"quality-{Path(recipe).stem}"
    _, _, launched = train_child(data, out, str(device), ["--config", recipe, *extra])
    evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
    # Per character, so that the target means the same for any tokenizer (fast-cpu's is BPE, nanoGPT's characters).
    hit = next((r for r in evals if r["bits_per_char"] * math.log(2) <= target), None)
    best = min(evals, key=lambda r: r["bits_per_char"])
    return QualityRow(recipe, target, hit["time"] - launched if hit else None, hit["step"] if hit else None,
                      best["bits_per_char"] * math.log(2), max(r["time"] for r in evals) - launched,
                      best["bits_per_char"])


def throughput_rows(args: argparse.Namespace, device: torch.device, workdir: Path, nanogpt: Peer | None,
                    extra: list[str]) -> list[dict[str, Any]]:
    kind = "cuda" if device.type == "cuda" else "cpu"
    steps = args.steps or (50 if kind == "cuda" else 10)
    warmup = 20 if kind == "cuda" else 3
    rows = []
    for preset, batch in parse_rows(args.rows.split(",") if args.rows else DEFAULT_ROWS[kind]):
        print(f"  training throughput: {preset}, batch {batch} ...", flush=True)
        # Beside nanoGPT, characters: its vocabulary is the corpus's characters, and a BPE preset (fast-cpu) would
        # give ours a larger output layer than the shape compared.
        chars = ["--set", "data.tokenizer=char"] if nanogpt is not None else []
        row, run = measure_throughput(args.data, preset, batch, device, steps, warmup, workdir, [*chars, *extra])
        found = asdict(row)
        if nanogpt is not None:  # the shape this run trained, as its run record holds it
            print(f"  nanoGPT throughput: {preset}, batch {batch} ...", flush=True)
            theirs = nanogpt.throughput(run["config"], str(device), steps, warmup)
            peak = device_peak_tflops(device)
            found.update(peer_tokens_per_sec=theirs.tokens_per_sec, peer_ms_per_step=theirs.ms_per_step,
                         peer_mfu=run["flops_per_token"] * theirs.tokens_per_sec / 1e12 / peak if peak else None,
                         speedup=row.tokens_per_sec / theirs.tokens_per_sec)
        rows.append(found)
    return rows


def side_tables(results: dict[str, Any]) -> str:
    lines = []
    peer_rows = [r for r in results["throughput"] if r.get("peer_tokens_per_sec")]
    if peer_rows:
        lines += ["", "| preset | batch | ours tokens/s | nanoGPT tokens/s | speed-up |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['preset']} | {r['batch_size']} | {r['tokens_per_sec']:,.0f} | "
                  f"{r['peer_tokens_per_sec']:,.0f} | {r['speedup']:.2f}x |" for r in peer_rows]
    if results["quality"]:
        lines += ["", "| recipe | target val loss (nats/char) | time to target (s) | step | "
                  "best val loss (nats/char) | best bits/char | wall (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in results["quality"]:
            hit = f"{r['seconds_to_target']:.1f}" if r["seconds_to_target"] is not None else "not reached"
            step = "-" if r["step_at_target"] is None else r["step_at_target"]
            lines.append(f"| {r['recipe']} | {r['target']} | {hit} | {step} | "
                         f"{r['best_val_loss']:.4f} | {r['best_bits_per_char']:.4f} | {r['wall_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", help="PRESET:BATCH,... (default: bench's)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per row")
    parser.add_argument("--generation-tokens", type=int, default=1000)
    parser.add_argument("--no-generation", action="store_true")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--recipe", help="also time this config to --target")
    parser.add_argument("--target", type=float, default=1.47)
    parser.add_argument("--peer", type=Path, metavar="NANOGPT_DIR")
    parser.add_argument("--peer-set", dest="peer_sets", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to nanoGPT's train.py as --KEY=VALUE in its time-to-target run")
    parser.add_argument("-o", "--output", type=Path, default=Path("bench.json"))
    args = parser.parse_args()
    if args.peer is not None and not args.peer.is_dir():
        parser.error(f"--peer {args.peer} is not a directory")
    if any(not re.fullmatch(r"\w+=\S+", s) for s in args.peer_sets):
        parser.error("--peer-set takes KEY=VALUE, e.g. --peer-set max_iters=2000")
    if args.recipe:
        resolve_config(args.recipe)  # an unknown recipe is refused now, not after the throughput rows
    find_data_files([args.data])
    check_writable(args.output)
    device = select_device(args.device)
    extra = [arg for s in args.sets for arg in ("--set", s)]
    results: dict[str, Any] = {"device": describe(device), "torch": torch.__version__, "throughput": [],
                               "generation": [], "quality": []}
    print(f"Benchmarking on {results['device']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fundamentallm-side-by-side-") as tmp:
        nanogpt = Peer(args.peer, corpus_text(args.data), Path(tmp)) if args.peer else None
        if nanogpt:
            results["peer"] = str(args.peer)
        results["throughput"] = throughput_rows(args, device, Path(tmp), nanogpt, extra)
        if not args.no_generation:
            for preset in GENERATION_PRESETS:
                print(f"  generation: {preset} ...", flush=True)
                results["generation"].append(asdict(measure_generation(preset, device, args.generation_tokens)))
        if args.recipe:
            print(f"  time to validation loss {args.target} with {args.recipe} ...", flush=True)
            results["quality"].append(asdict(measure_quality(args.data, args.recipe, args.target, device,
                                                             Path(tmp), extra)))
        if args.recipe and nanogpt:
            print(f"  time to validation loss {args.target} with nanoGPT's own recipe ...", flush=True)
            results["quality"].append(asdict(nanogpt.time_to_target(
                args.target, str(device), [f"--{s}" for s in args.peer_sets], PEER_TIMEOUT_SECONDS)))
    atomic_write_bytes(args.output, json.dumps(results, indent=2).encode("utf-8"))
    print(format_tables(results) + side_tables(results))
    print(f"Numbers written to {args.output}")


if __name__ == "__main__":
    main()
