"""Loss arithmetic and the run's metric log (metrics.jsonl, plus TensorBoard when asked for).

metrics.jsonl holds one JSON object per line, written and flushed as training goes, so `tail -f` works and a
crashed run keeps everything up to its last line. Records have "kind": "train" (every log_interval optimizer
steps) or "eval" (after each evaluation), and "kind": "run" for the first line, which describes the run. When
the loop ends, for whatever reason, a "kind": "end" record says how (status finished, interrupted or failed), so
`fundamentallm status` can tell a finished run from one that is still going or was killed. Every record carries
"time" (Unix time), so tools can measure from a process's launch. Losses are nats per token; an eval record's
"bits_per_char" is per character of the validation text, comparable across tokenizers.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

from fundamentallm.console import warn
from fundamentallm.errors import TrainingFailed
from fundamentallm.files import atomic_write_bytes, disk_full
from fundamentallm.runfiles import METRICS, TENSORBOARD


def perplexity(loss_nats: float) -> float:
    return math.exp(min(loss_nats, 700.0))  # exp overflows past ~709


def bits_per_char(loss_per_token: float, num_tokens: int, num_chars: int) -> float:
    """Bits per character of a text of `num_chars` characters in `num_tokens` tokens, from the mean loss per
    token (nats): the total bits over the text divided by its characters. Comparable across tokenizers; for a
    character tokenizer (one token per character) it is the loss per token in bits."""
    if num_chars <= 0:
        return math.nan
    return loss_per_token * num_tokens / num_chars / math.log(2)


class MetricsLog:
    """metrics.jsonl of one run. It always starts with `run_record` (this session's description of the run). On
    resume, the records up to the checkpoint's step follow it: from this file when resuming in place, or from
    the run the checkpoint came from (`history_from`) when branching into a new directory."""

    def __init__(self, run_dir: Path, run_record: dict[str, Any], resume_step: int | None = None,
                 history_from: Path | None = None, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / METRICS
        history: list[dict[str, Any]] = []
        source = Path(history_from or run_dir)
        if resume_step is not None and (source / METRICS).is_file():
            # Records past the checkpoint are about to be redone; end records of earlier sessions no longer hold.
            history = [r for r in read_metrics(source)
                       if r.get("kind") in ("train", "eval") and r.get("step", 0) <= resume_step]
        lines = [{**run_record, "time": time.time()}, *history]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in lines).encode("utf-8"))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run's duration
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warn("--tensorboard needs the tensorboard package: pip install 'fundamentallm[tensorboard]'; "
                     "continuing without TensorBoard")
            else:
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD))

    def write(self, record: dict[str, Any]) -> None:
        record = {**record, "time": time.time()}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as exc:
            raise disk_full(exc, self.path) or exc from None
        if self._tb is not None and record.get("kind") in ("train", "eval"):
            for key, value in record.items():
                if key not in ("step", "epoch", "kind", "time") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            self._tb.flush()

    def end(self, step: int, elapsed: float, interrupted: bool = False, error: BaseException | None = None) -> None:
        """The last record of a run (or of one session of a resumed run)."""
        record: dict[str, Any] = {"kind": "end", "step": step, "elapsed": elapsed, "status": "finished"}
        if interrupted:
            record["status"] = "interrupted"
        elif isinstance(error, KeyboardInterrupt):
            record["status"] = "interrupted"  # a second Ctrl-C: stopped at once, without a checkpoint
        elif error is not None:
            record["status"], record["error"] = "failed", str(error) or type(error).__name__
        # e.g. the full disk that ended the run: never hide the original error behind this one
        with contextlib.suppress(OSError, TrainingFailed):
            self.write(record)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete record of a run's metrics.jsonl (a half-written last line, or anything that is not a JSON
    object, is ignored)."""
    path = Path(run_dir) / METRICS
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records

