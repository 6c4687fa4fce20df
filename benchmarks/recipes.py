#!/usr/bin/env python
"""Recipe experiments: variants of a recipe trained for the same wall time, several seeds each, and nanoGPT's
own CPU recipe for the same wall time beside them.

    python benchmarks/recipes.py --corpus tinyshakespeare.txt --budget 60 --seeds 1,2 \\
        --variant base --variant relu2:model.mlp=relu2 --variant wsd:training.scheduler=wsd
    python benchmarks/recipes.py --corpus gutenberg_10M.txt --budget 300 --variant base --peer --peer-dir NANOGPT_DIR

Each run of ours is `fundamentallm train CORPUS --config RECIPE --time-budget B --seed S --set ...` in a child
process: the run measures its own speed and fixes its number of steps so that the learning-rate schedule ends
within B seconds of the command's launch (start-up, data and the final evaluation included). It evaluates on
the whole validation split (the last 10% of the characters) at the end and after every `--eval-every` steps.
Reported: the final and best validation loss (nats per token, nats per character and bits per character) and
the time from launch (the whole process, start-up included) to the first evaluation at or below `--target` nats per
character (for a character model the same as per token; a BPE model's token spans several characters, so only
the per-character figures compare across tokenizers). `--cold-cache` gives every run its own empty token cache,
as a first run has (a BPE run then trains its tokenizer within its time); without it the runs share one cache,
and only the first run of each tokenizer setting pays for it. `--steps N` trains every run for N steps instead,
which compares what the variants learn per step whatever the machine's speed; `--jobs 2` then runs two at a
time with the cores shared between them.

`--peer` also runs nanoGPT's CPU recipe from its README (4 layers x 128, block 64, batch 12, no dropout, lr
1e-3, 2000 iterations, fp32, no compile) from `--peer-dir` on the same corpus (characters, same 90/10 split),
stopped once `--budget` plus our mean start-up has passed since its launch: its best evaluation up to then
(nanoGPT estimates validation loss on 20 random batches, not the whole split).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--eval_iters=20", "--log_interval=1", "--block_size=64",
               "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
               "--lr_decay_iters=2000", "--dropout=0.0"]


# bench.muon_bf16=true (a variant's setting, not the tool's): the run orthogonalises Muon's updates in bf16, as
# PyTorch's own Muon does, even where the CPU has no native bf16 (where the tool uses float32).
MUON_BF16 = ("import fundamentallm.optim, fundamentallm.cli; "
             "fundamentallm.optim.native_bf16 = lambda device: True; fundamentallm.cli.main()")


def ours(corpus: Path, recipe: str, sets: list[str], seed: int, budget: float, eval_every: int, target: float,
         workdir: Path, name: str, steps: int | None = None, cold_cache: bool = False,
         threads: int | None = None) -> dict[str, Any]:
    out = workdir / f"{name}-seed{seed}"
    limit = ["--max-steps", str(steps)] if steps else ["--time-budget", f"{budget}s"]
    limit += ["--threads", str(threads)] if threads else []
    launcher = ["-c", MUON_BF16] if "bench.muon_bf16=true" in sets else ["-m", "fundamentallm"]
    sets = [s for s in sets if not s.startswith("bench.")]
    cmd = [sys.executable, *launcher, "train", str(corpus), "--config", recipe, "-o", str(out),
           "--device", "cpu", "--epochs", "1000", *limit, "--seed", str(seed),
           "--set", f"training.eval_interval={eval_every}", "--set", "training.sample_tokens=0",
           "--set", "training.save_best=false", *[arg for s in sets for arg in ("--set", s)]]
    cache = workdir / (f"cache-{name}-seed{seed}" if cold_cache else "cache")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get(
        "PYTHONPATH")])), "FUNDAMENTALLM_CACHE_DIR": str(cache)}
    launched = time.time()
    with open(f"{out}.log", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - launched
    if code != 0:
        raise RuntimeError(f"{name} seed {seed} failed; see {out}.log:\n{Path(f'{out}.log').read_text()[-1500:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    run = next(r for r in records if r["kind"] == "run")
    evals = [r for r in records if r["kind"] == "eval"]
    for r in evals:
        r["nats_per_char"] = r["bits_per_char"] * math.log(2)
    hit = next((r for r in evals if r["nats_per_char"] <= target), None)
    best = min(evals, key=lambda r: r["val_loss"])
    return {"variant": name, "seed": seed, "sets": sets, "steps": evals[-1]["step"], "wall_seconds": wall,
            "startup_seconds": run["time"] - launched, "final_val_loss": evals[-1]["val_loss"],
            "final_nats_per_char": evals[-1]["nats_per_char"], "final_bits_per_char": evals[-1]["bits_per_char"],
            "best_val_loss": best["val_loss"], "best_nats_per_char": best["nats_per_char"],
            "best_bits_per_char": best["bits_per_char"],
            "seconds_to_target": hit["time"] - launched if hit else None, "parameters": run["parameters"]}


def nanogpt(corpus: Path, peer_dir: Path, wall: float, workdir: Path) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # peer.py, beside this file
    from peer import EVAL_LINE, Peer, device_args

    peer = Peer(peer_dir, corpus.read_text(encoding="utf-8"), workdir)
    evals: list[tuple[int, float, float]] = []
    launched = time.time()

    def on_line(line: str, now: float) -> bool:
        match = EVAL_LINE.match(line)
        if match and now - launched <= wall:
            evals.append((int(match[1]), float(match[2]), now - launched))
        return now - launched > wall

    peer._run([*NANOGPT_CPU, "--dataset=fundamentallm", *device_args("cpu")], on_line, timeout=wall + 60)
    step, best, seconds = min(evals, key=lambda e: e[1])
    return {"variant": "nanoGPT CPU recipe", "steps": step, "best_val_loss": best, "best_nats_per_char": best,
            "best_bits_per_char": best / math.log(2), "seconds_at_best": seconds, "wall_seconds": wall}


def _spread(group: list[dict[str, Any]], key: str, fmt: str) -> str:
    """Mean (min-max) of one figure over a variant's runs."""
    values = [r[key] for r in group if r.get(key) is not None]
    if not values:
        return "not reached" if key == "seconds_to_target" else "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def summarise(rows: list[dict[str, Any]], target: float) -> str:
    lines = ["| variant | seeds | steps | final val loss (nats/token) | final nats/char | final bits/char | "
             f"best nats/char | time to <= {target} nats/char from launch (s) | wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        group = [r for r in rows if r["variant"] == name]
        hits = sum(r.get("seconds_to_target") is not None for r in group)
        to_target = _spread(group, "seconds_to_target", ".1f") + (
            f", {hits}/{len(group)}" if 0 < hits < len(group) else "")
        if "final_val_loss" not in group[0]:  # nanoGPT: no time to target measured
            to_target = "-"
        lines.append(f"| {name} | {len(group)} | {_spread(group, 'steps', '.0f')} | "
                     f"{_spread(group, 'final_val_loss', '.4f')} | {_spread(group, 'final_nats_per_char', '.4f')} | "
                     f"{_spread(group, 'final_bits_per_char', '.3f')} | "
                     f"{_spread(group, 'best_nats_per_char', '.4f')} | {to_target} | "
                     f"{_spread(group, 'wall_seconds', '.1f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="the text to train on")
    parser.add_argument("--recipe", default="fast-cpu")
    parser.add_argument("--budget", type=float, default=60.0, help="time budget (s) given to each run of ours")
    parser.add_argument("--seeds", default="1", help="comma-separated seeds, each variant runs once per seed")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME[:KEY=VALUE,KEY=VALUE...] (repeatable); default: the recipe as it is. "
                             "bench.muon_bf16=true: Muon's orthogonalisation in bf16, as PyTorch's own")
    parser.add_argument("--steps", type=int, help="a fixed number of steps instead of the time budget: compares "
                                                  "what variants learn per step, whatever the machine's speed")
    parser.add_argument("--jobs", type=int, default=1, help="with --steps: runs at a time, the cores shared "
                                                               "evenly between them (what a run learns per step "
                                                               "does not depend on its speed)")
    parser.add_argument("--eval-every", type=int, default=0, help="optimizer steps between evaluations (0: each "
                                                                  "epoch and at the end)")
    parser.add_argument("--target", type=float, default=1.70, help="validation loss in nats per character")
    parser.add_argument("--cold-cache", action="store_true", help="an empty token cache for every run")
    parser.add_argument("--peer", action="store_true", help="also run nanoGPT's CPU recipe for the same wall time")
    parser.add_argument("--peer-dir", type=Path, metavar="NANOGPT_DIR", help="a nanoGPT checkout, for --peer")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "recipes.json")
    args = parser.parse_args()
    if args.jobs > 1 and not args.steps:
        parser.error("--jobs needs --steps: a time budget's result depends on the run having the cores to itself")
    if args.peer and args.peer_dir is None:
        parser.error("--peer needs --peer-dir NANOGPT_DIR (git clone https://github.com/karpathy/nanoGPT)")
    variants = [(v.partition(":")[0], [s for s in v.partition(":")[2].split(",") if s]) for v in args.variant]
    results: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                               "corpus": args.corpus.name, "recipe": args.recipe, "budget": args.budget,
                               "target": args.target, "steps": args.steps, "jobs": args.jobs,
                               "load_before": os.getloadavg(), "time": time.time(),
                               "runs": []}
    with tempfile.TemporaryDirectory(prefix="fundamentallm-recipes-") as tmp:
        # Seeds outermost: drift in the machine's speed hits every variant alike.
        runs = [(seed, name, sets) for seed in [int(s) for s in args.seeds.split(",")]
                for name, sets in variants or [("base", [])]]
        threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None

        def one(run: tuple[int, str, list[str]]) -> dict[str, Any]:
            seed, name, sets = run
            print(f"{name} seed {seed} ({f'{args.steps} steps' if args.steps else f'{args.budget:.0f} s'}) ...",
                  flush=True)
            row = ours(args.corpus, args.recipe, sets, seed, args.budget, args.eval_every, args.target,
                       Path(tmp), name, args.steps, args.cold_cache, threads)
            print(f"  {name} seed {seed}: final {row['final_val_loss']:.4f} ({row['final_nats_per_char']:.4f} "
                  f"nats/char), best {row['best_val_loss']:.4f}, {row['steps']} steps, "
                  f"to target {row['seconds_to_target']}, wall {row['wall_seconds']:.1f}", flush=True)
            return row

        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            results["runs"].extend(pool.map(one, runs))
        if args.peer:
            startup = statistics.mean(r["startup_seconds"] for r in results["runs"])
            print(f"nanoGPT CPU recipe ({args.budget + startup:.0f} s from launch) ...", flush=True)
            results["runs"].append(nanogpt(args.corpus, args.peer_dir, args.budget + startup, Path(tmp)))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    limit = f"{args.steps} steps" if args.steps else f"{args.budget:.0f} s budget"
    print(f"\n{args.corpus.name}, recipe {args.recipe}, {limit}, load before "
          f"{results['load_before'][0]:.2f}\n")
    print(summarise(results["runs"], args.target))
    print(f"Numbers written to {args.json}")


if __name__ == "__main__":
    main()
