"""Fine-tuning against training from scratch, at equal wall time, through the real CLI.

    python benchmarks/finetune.py --pretrain gutenberg_10M.txt \
        --target tinyshakespeare.txt --pretrain-budget 10m --budget 5m -o finetune-bench

1. pretrain: `fundamentallm train PRETRAIN --config fast-cpu --time-budget PRETRAIN_BUDGET`
2. fine-tune: `fundamentallm train TARGET --init-from pretrain/final_model.pt --time-budget BUDGET` (the model's
   own configuration and tokenizer: fast-cpu's BPE, learned on PRETRAIN, encodes any text)
3. scratch: `fundamentallm train TARGET --config fast-cpu --time-budget BUDGET`

Both target runs evaluate on the same validation split of TARGET every `--eval-interval` steps; the script prints
their validation losses per character (nats and bits: their tokenizers differ, so losses per token would not
compare) and draws both curves in one plot (OUT/finetune.png; per token, so read the curves' shapes there, the
printed figures for the comparison). A BUDGET of at most 2 minutes trains fast-cpu's small model from scratch
(its `short_budget`), while the fine-tuned run keeps the pretrained model's shape: each run is what a user
typing it gets.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from fundamentallm.metrics import read_metrics
from fundamentallm.plot import plot_runs


def train(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "fundamentallm", "train", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--pretrain-budget", default="10m")
    parser.add_argument("--budget", default="5m")
    parser.add_argument("--eval-interval", type=int, default=100)
    parser.add_argument("-o", "--output", type=Path, default=Path("finetune-bench"))
    args = parser.parse_args()
    out = args.output
    common = ["--set", f"training.eval_interval={args.eval_interval}", "--set", "training.sample_tokens=0",
              "--device", "cpu"]
    pretrained = out / "pretrain"
    if not (pretrained / "final_model.pt").exists():
        train([args.pretrain, "--config", "fast-cpu", "--time-budget", args.pretrain_budget, "-o", str(pretrained),
               "--overwrite", *common])
    runs = {"fine-tuned": out / "finetuned", "from scratch": out / "scratch"}
    train([args.target, "--init-from", str(pretrained / "final_model.pt"), "--time-budget", args.budget,
           "-o", str(runs["fine-tuned"]), "--overwrite", *common])
    train([args.target, "--config", "fast-cpu", "--time-budget", args.budget, "-o", str(runs["from scratch"]),
           "--overwrite", *common])
    summary = {}
    for name, run in runs.items():
        evals = [r for r in read_metrics(run) if r["kind"] == "eval"]
        bpc = min(r["bits_per_char"] for r in evals)
        summary[name] = {"best_nats_per_char": bpc * math.log(2), "best_bpc": bpc,
                         "last_nats_per_char": evals[-1]["bits_per_char"] * math.log(2),
                         "steps": evals[-1]["step"], "elapsed": evals[-1]["elapsed"]}
        print(f"{name:>13}: best validation loss {bpc * math.log(2):.4f} nats/char ({bpc:.3f} bits/char) after "
              f"{evals[-1]['elapsed']:.0f} s, {evals[-1]['step']} steps")
    (out / "finetune.json").write_text(json.dumps(summary, indent=2))
    print("plot:", plot_runs(list(runs.values()), out / "finetune.png"))


if __name__ == "__main__":
    main()
