"""TPE search with pruning against a 3 x 3 grid over learning rate and batch size: best validation loss and total
time of each, on one corpus, with the same configuration and step budget per run.

    python benchmarks/search_vs_grid.py --corpus CORPUS      # fast-cpu, 200 steps a run
    python benchmarks/search_vs_grid.py --steps 600 --trials 9 --corpus my.txt -o results/svg

Both sides run the real command (`fundamentallm sweep`) in a child process, timed from launch to exit, into
directories under --output; the JSON written there (search_vs_grid.json) holds the commands, the best row of each
side and the times. The search looks over the same span the grid covers: learning rate log-uniform between the
grid's lowest and highest rate, batch size from the grid's three values.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fundamentallm.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def sweep(corpus: Path, out: Path, common: list[str], extra: list[str]) -> dict[str, Any]:
    """Run one `fundamentallm sweep` and return its wall time and best row."""
    cmd = [sys.executable, "-m", "fundamentallm", "sweep", str(corpus), "-o", str(out), *common, *extra]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - start
    rows = list(csv.DictReader((out / "results.csv").open()))
    best = rows[0]
    # Tokens trained measure the work done whatever else the machine was doing (wall time does not, when busy).
    tokens = sum(int(r["steps"]) * read_metrics(Path(r["run_dir"]))[0]["tokens_per_step"] for r in rows)
    return {"command": cmd[1:], "wall_seconds": seconds, "runs": len(rows),
            "pruned": sum(r["status"] == "pruned" for r in rows),
            "steps_trained": sum(int(r["steps"]) for r in rows), "tokens_trained": tokens,
            "best": {k: best[k] for k in ("learning_rate", "batch_size", "best_val_loss", "steps", "run_dir")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="the text to train on")
    parser.add_argument("--config", default="fast-cpu", help="preset or YAML every run starts from")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run (training.max_steps)")
    parser.add_argument("--evals", type=int, default=5, help="evaluations per run (what pruning decides on)")
    parser.add_argument("--learning-rates", default="1e-3,3e-3,1e-2", help="the grid's three rates")
    parser.add_argument("--batch-sizes", default="16,32,64", help="the grid's three batch sizes")
    parser.add_argument("--trials", type=int, default=9, help="trials of the TPE search")
    parser.add_argument("--device", default="auto")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks" / "results" / "search_vs_grid")
    args = parser.parse_args()
    if args.output.exists():
        shutil.rmtree(args.output)  # a fresh measurement: a resumed sweep would time nothing
    args.output.mkdir(parents=True)
    rates = [float(r) for r in args.learning_rates.split(",")]
    common = ["--config", args.config, "--device", args.device, "--epochs", "1000",
              "--set", f"training.max_steps={args.steps}",
              "--set", f"training.eval_interval={max(1, args.steps // args.evals)}",
              "--set", f"training.warmup_steps={args.steps // 10}",  # the presets' warm-ups assume longer runs
              # the whole validation split: the same text for every batch size, so their losses compare
              "--set", "training.eval_batches=0", "--set", "training.save_best=false"]
    grid = sweep(args.corpus, args.output / "grid", common,
                 ["--grid", f"training.learning_rate={args.learning_rates}",
                  "--grid", f"training.batch_size={args.batch_sizes}"])
    search = sweep(args.corpus, args.output / "tpe", common,
                   ["--search", "tpe", "--trials", str(args.trials), "--prune",
                    "--space", f"training.learning_rate=log:{min(rates):g}:{max(rates):g}",
                    "--space", f"training.batch_size={args.batch_sizes}"])
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible",
              "corpus": str(args.corpus), "config": args.config, "steps_per_run": args.steps, "time": time.time(),
              "grid": grid, "tpe_pruned": search,
              "time_ratio": search["wall_seconds"] / grid["wall_seconds"],
              "tokens_ratio": search["tokens_trained"] / grid["tokens_trained"],
              "val_loss_difference": float(search["best"]["best_val_loss"]) - float(grid["best"]["best_val_loss"])}
    (args.output / "search_vs_grid.json").write_text(json.dumps(result, indent=2))
    print("\n| side | runs (pruned) | tokens trained | wall time | best val loss | at lr, batch |")
    print("|---|---:|---:|---:|---:|---|")
    for name, side in (("3 x 3 grid", grid), (f"TPE, {args.trials} trials, pruning", search)):
        best = side["best"]
        print(f"| {name} | {side['runs']} ({side['pruned']}) | {side['tokens_trained']:,} | "
              f"{side['wall_seconds']:.0f} s | {float(best['best_val_loss']):.4f} | "
              f"{best['learning_rate']}, {best['batch_size']} |")
    print(f"\nsearch / grid: time {result['time_ratio']:.2f}, tokens {result['tokens_ratio']:.2f}; best val loss, "
          f"search - grid = {result['val_loss_difference']:+.4f}. JSON: {args.output / 'search_vs_grid.json'}")


if __name__ == "__main__":
    main()
