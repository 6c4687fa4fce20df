"""lm-evaluation-harness scoring a served model, beside `fundamentallm evaluate` on the same text.

Starts `fundamentallm serve CHECKPOINT` on a free loopback port and runs the harness's `local-completions` model
against it (its remote tokenizer reads the server's /tokenize and /tokenizer_info, so no Hugging Face tokenizer
is involved) on two tasks built from TEXT in a temporary task directory. A perplexity task
(loglikelihood_rolling, the text as one document, started from the boundary token /tokenizer_info declares) gives
the harness's bits per byte. A loglikelihood task gives totals to set beside evaluate's: the text is cut into the
windows `evaluate` scores (context + 1 characters, one every context characters), each document's context is its
first character (or, when that is whitespace, which the harness moves into the continuation, up to its first
other character) and its continuation the rest. Nothing is downloaded (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE).
Then `fundamentallm evaluate` scores the same text, and both figures are printed side by side: summed over the
same windows they differ only by the few characters the harness's contexts hold back. For a character model;
with byte or BPE models the windows are in characters, not tokens, so the figures are close but not equal.

    python benchmarks/lm_eval_serve.py runs/alice/best_model.pt some.txt --docs 200 -o lm_eval_serve.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from serve_load import start_server  # this file's folder is on sys.path when it runs as a script

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASK = "fundamentallm_local_text"
ROLLING = "fundamentallm_local_text_rolling"


def documents(text: str, context: int) -> list[dict[str, str]]:
    """evaluate's windows as (context, continuation) pairs; a context never ends in whitespace."""
    docs = []
    for start in range(0, len(text) - 1, context):
        window = text[start : start + context + 1]
        cut = 1 + next((i for i, c in enumerate(window[:-1]) if not c.isspace()), len(window) - 2)
        if cut < len(window):
            docs.append({"context": window[:cut], "continuation": window[cut:]})
    return docs


def write_tasks(directory: Path, docs: list[dict[str, str]], text: str) -> None:
    """The loglikelihood task over the windows, and a perplexity task (loglikelihood_rolling) over the whole
    text as one document."""
    data = directory / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")
    whole = directory / "whole.jsonl"
    whole.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    (directory / f"{ROLLING}.yaml").write_text(f"""task: {ROLLING}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {whole}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""", encoding="utf-8")
    (directory / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: context
doc_to_target: continuation
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""", encoding="utf-8")


def run_harness(url: str, context: int, task_dir: Path) -> tuple[float, dict, dict]:
    """The summed log-likelihood of every document's continuation, and the harness's own metrics of both
    tasks."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{url}/v1/completions", "model": "m", "tokenizer_backend": "remote",
                    "tokenized_requests": True, "max_length": context + 2, "num_concurrent": 1,
                    "max_retries": 1},
        tasks=[TASK, ROLLING], task_manager=TaskManager(include_path=str(task_dir)), log_samples=True,
        bootstrap_iters=0)
    total = sum(sample["filtered_resps"][0][0] for sample in results["samples"][TASK])
    return total, results["results"][TASK], results["results"][ROLLING]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("text", type=Path, help="a UTF-8 text file to score")
    parser.add_argument("--docs", type=int, default=200, help="windows of the text to score (default 200)")
    parser.add_argument("-o", "--output", type=Path, default=Path("lm_eval_serve.json"), help="where the JSON goes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        proc, url = start_server(args.checkpoint, tmp_dir / "server.log", ROOT / "src", ["--device", "cpu"])
        try:
            with urllib.request.urlopen(url + "/tokenizer_info", timeout=60) as response:
                context = json.load(response)["model_max_length"]
            text = args.text.read_text(encoding="utf-8")[: args.docs * context + 1]
            docs = documents(text, context)
            write_tasks(tmp_dir, docs, text)
            started = time.perf_counter()
            harness_ll, metrics, rolling = run_harness(url, context, tmp_dir)
            harness_seconds = time.perf_counter() - started
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        (tmp_dir / "text.txt").write_text(text, encoding="utf-8")
        evaluated = json.loads(subprocess.run(
            [sys.executable, "-m", "fundamentallm", "evaluate", str(args.checkpoint), str(tmp_dir / "text.txt"),
             "--json", "--device", "cpu"], capture_output=True, text=True, check=True).stdout)

    predicted = sum(len(doc["continuation"]) for doc in docs)
    nats = evaluated["loss_per_token"] * evaluated["predictions"]
    print(f"text: the first {len(text):,} characters of {args.text} ({len(docs)} windows of {context + 1})")
    print(f"{'':<34}{'predictions':>12}{'total nats':>14}{'nats/prediction':>17}{'bits/prediction':>17}")
    for name, count, total in (("lm-eval local-completions (serve)", predicted, -harness_ll),
                               ("fundamentallm evaluate", evaluated["predictions"], nats)):
        print(f"{name:<34}{count:>12,}{total:>14.3f}{total / count:>17.4f}{total / count / math.log(2):>17.4f}")
    harness_metrics = {k: v for k, v in metrics.items() if k != "alias"}
    print(f"the harness's own metrics (per document): {json.dumps(harness_metrics)}")
    rolling_metrics = {k: v for k, v in rolling.items() if k != "alias"}
    text_bytes = len(text.encode("utf-8"))
    print(f"perplexity task (loglikelihood_rolling, the text as one document): bits_per_byte "
          f"{rolling_metrics['bits_per_byte,none']:.4f}, byte_perplexity {rolling_metrics['byte_perplexity,none']:.4f}"
          f"; evaluate: {nats / math.log(2) / text_bytes:.4f} bits per byte "
          f"({text_bytes:,} bytes); both tasks took the harness {harness_seconds:.1f} s")
    args.output.write_text(json.dumps({
        "checkpoint": str(args.checkpoint), "text": str(args.text), "characters": len(text), "windows": len(docs),
        "harness": {"predictions": predicted, "nats": -harness_ll, "metrics": harness_metrics,
                    "rolling_metrics": rolling_metrics, "seconds": harness_seconds},
        "evaluate": {"predictions": evaluated["predictions"], "nats": nats,
                     "loss_per_token": evaluated["loss_per_token"], "bits_per_char": evaluated["bits_per_char"]},
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
