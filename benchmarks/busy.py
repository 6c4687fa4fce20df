#!/usr/bin/env python
"""Training speed on a busy CPU: `fast-cpu` tokens/s alone, beside a second training of the same kind, and beside
as many CPU-bound processes as the machine has cores, in one call; nanoGPT's under the same loads with --peer; and
whether a time budget still ends in time when the load arrives halfway through a run.

    python benchmarks/busy.py CORPUS [--peer NANOGPT_DIR] [--steps 60] [--budget 60] [-o busy.json]

Rows (each a real `fundamentallm train CORPUS -c fast-cpu` child process, timed from its own metrics.jsonl over
the steps after a warm-up of WARMUP steps):
- variants: `shipped` (the environment as it is: the package sets a short OpenMP spin, GOMP_SPINCOUNT=3000,
  before torch loads), `libgomp-default` (GOMP_SPINCOUNT=300000, GNU OpenMP's own default: how it trained
  before), `passive` (OMP_WAIT_POLICY=PASSIVE: threads sleep at once);
- loads: `quiet`; `beside a training` (two identical runs started together, both reported); `beside N busy
  loops` (N = the cores: Python processes spinning, started before the run and stopped after it).
With --peer, nanoGPT's train.py (benchmarks/peer.py) trains the same shape under the same three loads, with its
own (libgomp's default) settings. With --budget SECONDS, one more run: `--time-budget SECONDS` with the busy
loops started halfway through it, reporting how far past the budget it ended (from launch, and by the run's own
clock, which starts when its first step does). Print a table; write everything to JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "src")]  # peer.py beside this file; this checkout's package

from peer import Peer  # noqa: E402
from side_by_side import corpus_text  # noqa: E402

from fundamentallm.metrics import read_metrics  # noqa: E402

WARMUP = 10
VARIANTS = {"shipped": {}, "libgomp-default": {"GOMP_SPINCOUNT": "300000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
SPIN = "while True: pass"


def child_env(variant: str) -> dict[str, str]:
    """This checkout's package, and the variant's OpenMP setting alone (none inherited from this process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    paths = [str(ROOT / "src"), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(paths), **VARIANTS[variant]}


def start_training(corpus: Path, out: Path, variant: str, args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fundamentallm", "train", str(corpus), "-c", "fast-cpu", "-o", str(out),
           "--device", "cpu", "--set", "training.save_best=false", "--set", "training.sample_tokens=0", *args]
    log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(variant))


def finish(proc: subprocess.Popen, out: Path) -> None:
    if proc.wait() != 0:
        raise SystemExit(f"training failed: {(out.parent / f'{out.name}.log').read_text()[-2000:]}")


def tokens_per_sec(out: Path) -> float:
    """Tokens per second from the first record at or after the warm-up to the last (the bench's own rule)."""
    records = read_metrics(out)
    run = next(r for r in records if r["kind"] == "run")
    train = [r for r in records if r["kind"] == "train"]
    first = next(r for r in train if r["step"] >= WARMUP)
    return (train[-1]["step"] - first["step"]) * run["tokens_per_step"] / (train[-1]["elapsed"] - first["elapsed"])


class BusyLoops:
    """`count` CPU-bound Python processes, for as long as the `with` block runs."""

    def __init__(self, count: int) -> None:
        self.count, self.procs = count, []

    def __enter__(self) -> BusyLoops:
        self.procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(self.count)]
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def our_rows(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    steps = ["--max-steps", str(WARMUP + args.steps), "--set", "training.log_interval=5"]
    rows = []
    for variant in VARIANTS:
        print(f"  ours, {variant} ...", flush=True)
        out = workdir / f"{variant}-quiet"
        finish(start_training(args.corpus, out, variant, steps), out)
        rows.append({"who": "ours", "variant": variant, "load": "quiet", "tokens_per_sec": [tokens_per_sec(out)]})
        pair = [workdir / f"{variant}-pair-{i}" for i in (1, 2)]
        procs = [start_training(args.corpus, out, variant, steps) for out in pair]
        for proc, out in zip(procs, pair, strict=True):
            finish(proc, out)
        rows.append({"who": "ours", "variant": variant, "load": "beside a training",
                     "tokens_per_sec": [tokens_per_sec(out) for out in pair]})
        out = workdir / f"{variant}-busy"
        with BusyLoops(os.cpu_count() or 1):
            finish(start_training(args.corpus, out, variant, steps), out)
        rows.append({"who": "ours", "variant": variant, "load": f"beside {os.cpu_count()} busy loops",
                     "tokens_per_sec": [tokens_per_sec(out)]})
    return rows


def peer_rows(args: argparse.Namespace, workdir: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """nanoGPT on the shape of our quiet run (its run record's config), under the same loads."""
    text = corpus_text(args.corpus)
    peers = [Peer(args.peer, text, workdir / f"peer-{i}") for i in (1, 2)]
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    measure = [lambda peer=peer: peer.throughput(config, "cpu", args.steps, WARMUP).tokens_per_sec for peer in peers]
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # nanoGPT's children inherit libgomp's defaults, as a user's nanoGPT has
    try:
        print("  nanoGPT, quiet ...", flush=True)
        rows = [{"who": "nanoGPT", "variant": "its defaults", "load": "quiet", "tokens_per_sec": [measure[0]()]}]
        print("  nanoGPT, beside a training ...", flush=True)
        results: list[float] = [0.0, 0.0]
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, measure[i]())) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rows.append({"who": "nanoGPT", "variant": "its defaults", "load": "beside a training",
                     "tokens_per_sec": results})
        print("  nanoGPT, beside busy loops ...", flush=True)
        with BusyLoops(os.cpu_count() or 1):
            rows.append({"who": "nanoGPT", "variant": "its defaults", "load": f"beside {os.cpu_count()} busy loops",
                         "tokens_per_sec": [measure[0]()]})
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return rows


def budget_row(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """A --time-budget run (shipped settings) with the busy loops arriving halfway through its budget."""
    print(f"  time budget {args.budget:g}s, busy loops from {args.budget / 2:g}s ...", flush=True)
    out = workdir / "budget"
    loaded = None
    launched = time.perf_counter()
    proc = start_training(args.corpus, out, "shipped", ["--time-budget", f"{args.budget:g}s"])
    with contextlib.ExitStack() as load:
        try:
            proc.wait(timeout=args.budget / 2)
        except subprocess.TimeoutExpired:
            loaded = load.enter_context(BusyLoops(os.cpu_count() or 1))
        finish(proc, out)
    wall = time.perf_counter() - launched
    end = next(r for r in reversed(read_metrics(out)) if r["kind"] == "end")
    return {"budget": args.budget, "wall_seconds": wall, "run_elapsed": end["elapsed"], "steps": end["step"],
            "overshoot_from_launch": wall - args.budget, "overshoot_run_clock": end["elapsed"] - args.budget,
            "loaded_from_second": args.budget / 2 if loaded else None}


def table(rows: list[dict[str, Any]]) -> str:
    quiet = {(r["who"], r["variant"]): r["tokens_per_sec"][0] for r in rows if r["load"] == "quiet"}
    lines = ["| who | variant | load | tokens/s | slower than quiet |", "|---|---|---|---:|---:|"]
    for r in rows:
        speeds = r["tokens_per_sec"]
        slower = " / ".join(f"{quiet[(r['who'], r['variant'])] / s:.1f}x" for s in speeds)
        lines.append(f"| {r['who']} | {r['variant']} | {r['load']} | {' + '.join(f'{s:,.0f}' for s in speeds)} "
                     f"| {slower} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--peer", type=Path, metavar="NANOGPT_DIR", help="also measure nanoGPT's train.py")
    parser.add_argument("--steps", type=int, default=60, help=f"timed steps per row, after {WARMUP} of warm-up")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds of the --time-budget run that gets loaded halfway (0: no such run)")
    parser.add_argument("-o", "--output", type=Path, default=Path("busy.json"))
    args = parser.parse_args()
    if not args.corpus.is_file():
        parser.error(f"{args.corpus} is not a file")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() else "?"
    results: dict[str, Any] = {"machine": f"{cpu}, {os.cpu_count()} cores", "load_before": uptime,
                               "steps": args.steps, "warmup": WARMUP}
    with tempfile.TemporaryDirectory(prefix="busy-") as tmp:
        workdir = Path(tmp)
        rows = our_rows(args, workdir)
        if args.peer is not None:
            config = next(r for r in read_metrics(workdir / "shipped-quiet") if r["kind"] == "run")["config"]
            rows += peer_rows(args, workdir, config)
        results["rows"] = rows
        if args.budget:
            results["budget"] = budget_row(args, workdir)
    results["load_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{results['machine']}; before: {uptime}\n\n{table(rows)}")
    if args.budget:
        b = results["budget"]
        print(f"\ntime budget {b['budget']:g}s, busy loops from {b['loaded_from_second']}s: ended "
              f"{b['wall_seconds']:.1f}s after launch ({b['overshoot_from_launch']:+.1f}s), run clock "
              f"{b['run_elapsed']:.1f}s ({b['overshoot_run_clock']:+.1f}s), {b['steps']} steps")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
