#!/usr/bin/env python
"""lm-evaluation-harness on an export: its `hf` model's bits per byte on a local text, beside `fundamentallm
evaluate`'s bits per character on the same text.

    fundamentallm train CORPUS -c fast-cpu --set data.tokenizer=byte --max-steps 400 -o /tmp/brief
    python benchmarks/lm_eval_export.py /tmp/brief/final_model.pt TEXT [-o lm_eval_export.json]

Four steps, each as a user would run it: `fundamentallm export CHECKPOINT --format hf` into a temporary
directory; `fundamentallm evaluate CHECKPOINT TEXT --json`; `lm_eval run --model hf` (the export as it is, no
`prefix_token_id` or other extra argument) on a loglikelihood_rolling task written to the temporary directory,
whose one document is the whole of TEXT (a local JSON Lines file: nothing is downloaded, HF_DATASETS_OFFLINE and
HF_HUB_OFFLINE are set); and our own sum of log-probabilities over TEXT after the export's begin-of-text token,
in this process (the same windows as lm-eval's but the last, which lm-eval fills back to a whole context).

Bits per byte and bits per character are the same total bits over different counts: bits per character = bits
per byte x UTF-8 bytes / characters (equal on ASCII text). `evaluate` scores every token but the first (it has
nothing before it) and reports the mean over those predictions times all the tokens; lm-eval also scores the first
token, after the begin-of-text token.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import fundamentallm  # noqa: E402, F401 - before torch: how its CPU threads wait
from fundamentallm.checkpoint import load_model  # noqa: E402
from fundamentallm.evaluate import score_tokens  # noqa: E402

TASK = "fundamentallm_local_text"


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return f"{model}, {os.cpu_count()} cores; {load}"


def run(*command: str | Path, env: dict[str, str] | None = None) -> str:
    """Run a command as a user would; its stdout (stderr passes through, for lm-eval's own progress lines)."""
    shown = " ".join(str(c) for c in command)
    print(f"$ {shown}", flush=True)
    paths = [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **(env or {})}
    result = subprocess.run([str(c) for c in command], stdout=subprocess.PIPE, text=True, env=full_env)
    if result.returncode:
        sys.exit(f"failed ({result.returncode}): {shown}\n{result.stdout}")
    return result.stdout


def write_task(directory: Path, text: str) -> None:
    """A loglikelihood_rolling task over one document, the whole text, read from a local JSON Lines file."""
    directory.mkdir()
    (directory / "text.jsonl").write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {directory / 'text.jsonl'}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
        encoding="utf-8")


def lm_eval(export_dir: Path, task_dir: Path, out_dir: Path, batch_size: int) -> tuple[dict, str]:
    """lm-eval's results for the task, and the table it printed."""
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    printed = run(sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={export_dir}",
                  "--tasks", TASK, "--include_path", task_dir, "--device", "cpu", "--batch_size", str(batch_size),
                  "--output_path", out_dir, env=offline)
    (results_file,) = out_dir.rglob("results_*.json")
    return json.loads(results_file.read_text())["results"][TASK], printed


def ours_after_bos(checkpoint: Path, text: str, bos: int, batch_size: int) -> float:
    """Our model's total bits over `text` read after the token `bos`, float32, every token predicted."""
    loaded = load_model(checkpoint, "cpu")
    tokens = [bos, *loaded.tokenizer.encode(text)]
    score = score_tokens(loaded.model, np.array(tokens), batch_size, torch.device("cpu"))
    return score.nats / math.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("text", type=Path, help="a UTF-8 text file to score")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("-o", "--output", type=Path, default=Path("lm_eval_export.json"))
    args = parser.parse_args()
    text = args.text.read_text(encoding="utf-8")
    chars, utf8_bytes = len(text), len(text.encode("utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        export_dir, task_dir = Path(tmp) / "export", Path(tmp) / "task"
        run(sys.executable, "-m", "fundamentallm", "export", args.checkpoint, "-o", export_dir, "--format", "hf")
        ours = json.loads(run(sys.executable, "-m", "fundamentallm", "evaluate", args.checkpoint, args.text,
                              "--json"))
        write_task(task_dir, text)
        theirs, printed = lm_eval(export_dir, task_dir, Path(tmp) / "lm_eval", args.batch_size)
        bos = json.loads((export_dir / "config.json").read_text())["bos_token_id"]
    print(printed)
    bpb = theirs["bits_per_byte,none"]
    own_bits = ours_after_bos(args.checkpoint, text, bos, args.batch_size)
    rows = [
        ("fundamentallm evaluate", ours["bits_per_char"] * chars / utf8_bytes, ours["bits_per_char"]),
        ("lm-eval hf, loglikelihood_rolling", bpb, bpb * utf8_bytes / chars),
        ("ours after the begin-of-text token", own_bits / utf8_bytes, own_bits / chars),
    ]
    print(f"\n{args.text.name}: {chars:,} characters, {utf8_bytes:,} UTF-8 bytes "
          f"({utf8_bytes / chars:.4f} bytes per character), {ours['tokens']:,} {ours['tokenizer']} tokens, "
          f"context {ours['context_length']}")
    print(f"{'':36s} {'bits/byte':>10s} {'bits/char':>10s}")
    for name, per_byte, per_char in rows:
        print(f"{name:36s} {per_byte:10.4f} {per_char:10.4f}")
    print(f"lm-eval: byte_perplexity {theirs['byte_perplexity,none']:.4f}, "
          f"word_perplexity {theirs['word_perplexity,none']:.4f}")
    record = {"checkpoint": str(args.checkpoint), "text": args.text.name, "characters": chars,
              "utf8_bytes": utf8_bytes, "evaluate": ours, "lm_eval": theirs, "ours_after_bos_bits": own_bits,
              "rows": [{"row": n, "bits_per_byte": b, "bits_per_char": c} for n, b, c in rows],
              "machine": machine()}
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
