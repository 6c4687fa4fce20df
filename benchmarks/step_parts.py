#!/usr/bin/env python
"""Where a training step's time goes on this machine: forward, backward, clipping and the optimizer, for a preset
on random tokens, with Muon's orthogonalisation in float32 and in bf16 (PyTorch's own) side by side in
interleaved rounds; then the process's exit with and without Python's final collection of PyTorch's and
matplotlib's objects.

    python benchmarks/step_parts.py --preset fast-cpu --rounds 3 -o step_parts.json
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
from typing import Any

import torch

from fundamentallm import optim
from fundamentallm.config import resolve_config
from fundamentallm.model import GPT

PARTS = ("forward", "backward", "clip", "optimizer")
EXIT_SCRIPT = """
import gc, sys, time
import torch, torch._dynamo
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
plt.figure().savefig(sys.argv[1])
if sys.argv[2] == "frozen":
    gc.disable()
    gc.freeze()
print(time.time(), flush=True)
"""


def step_parts(preset: str, float32: bool, steps: int) -> dict[str, float]:
    """Median milliseconds of each part of `steps` optimizer steps (after 5 untimed ones)."""
    config = resolve_config(preset)
    t = config.training
    vocab = config.data.vocab_size if config.data.tokenizer == "bpe" else 66  # 66: tinyshakespeare's characters
    model = GPT.from_config(config, vocab)
    optim.native_bf16 = lambda device: not float32  # the one choice compared
    optimizer = optim.make_optimizer(model, t, torch.device("cpu"))
    x = torch.randint(0, vocab, (t.batch_size, t.sequence_length))
    y = torch.randint(0, vocab, (t.batch_size, t.sequence_length))
    timings: list[tuple[float, ...]] = []
    for i in range(steps + 5):
        start = time.perf_counter()
        _, loss = model(x, y)
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        clip = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = time.perf_counter()
        if i >= 5:
            timings.append((forward - start, backward - forward, clip - backward, done - clip))
    return {part: statistics.median(t[i] for t in timings) * 1000 for i, part in enumerate(PARTS)}


def exit_seconds(frozen: bool, scratch: Path) -> float:
    """Seconds from a script's last line to its process's end, after importing PyTorch and drawing a figure."""
    out = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(scratch / "figure.png"),
                          "frozen" if frozen else "collected"], capture_output=True, text=True, check=True)
    return time.time() - float(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="fast-cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and variant")
    parser.add_argument("-o", "--output", type=Path, default=Path("step_parts.json"))
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for float32 in (False, True):
            parts = step_parts(args.preset, float32, args.steps)
            rows.append({"round": round_ + 1, "muon": "float32" if float32 else "bf16", **parts,
                         "step": sum(parts.values())})
            print(f"round {round_ + 1}, Muon in {rows[-1]['muon']}: " +
                  ", ".join(f"{k} {parts[k]:.1f} ms" for k in PARTS), flush=True)
    scratch = args.output.resolve().parent
    exits = {kind: [exit_seconds(kind == "frozen", scratch) for _ in range(args.rounds)]
             for kind in ("collected", "frozen")}
    (scratch / "figure.png").unlink(missing_ok=True)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "torch": torch.__version__, "threads": torch.get_num_threads(), "preset": args.preset,
               "load_before": os.getloadavg(), "time": time.time(), "steps": rows, "exit_seconds": exits}
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{args.preset}, median ms per step over {args.steps} steps, {args.rounds} interleaved rounds\n")
    print("| Muon's orthogonalisation | forward | backward | clip | optimizer | step |\n|---|---:|---:|---:|---:|---:|")
    for muon in ("bf16", "float32"):
        group = [r for r in rows if r["muon"] == muon]
        cells = [f"{statistics.median(r[k] for r in group):.1f} ({min(r[k] for r in group):.1f}-"
                 f"{max(r[k] for r in group):.1f})" for k in (*PARTS, "step")]
        print(f"| {muon} | " + " | ".join(cells) + " |")
    print("\nexit after the last line (s): " + "; ".join(
        f"{kind} {', '.join(f'{s:.2f}' for s in values)}" for kind, values in exits.items()))
    print(f"Numbers written to {args.output}")


if __name__ == "__main__":
    main()
