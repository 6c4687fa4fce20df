"""Loss arithmetic and the run's metric log (metrics.jsonl, plus TensorBoard when asked for).

metrics.jsonl holds one JSON object per line, written and flushed as training goes, so `tail -f` works and a
crashed run keeps everything up to its last line. Records have "kind": "train" (every log_interval optimizer
steps) or "eval" (after each evaluation), and "kind": "run" for the first line, which describes the run. When
the loop ends, for whatever reason, a "kind": "end" record says how (status finished, pruned, interrupted or
failed), so `fundamentallm status` can tell a finished run from one that is still going or was killed. Every
record carries "time" (Unix time), so tools can measure from a process's launch. Losses are nats per token; an
eval record's "bits_per_char" is per character of the validation text, comparable across tokenizers.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import time
from pathlib import Path
from typing import Any

from fundamentallm.console import warn
from fundamentallm.errors import TrainingFailed
from fundamentallm.files import atomic_write_bytes, disk_full, open_regular
from fundamentallm.runfiles import METRICS, TENSORBOARD


def perplexity(loss_nats: float) -> float:
    return math.exp(min(loss_nats, 700.0))  # exp overflows past ~709


def eta_seconds(steps_left: int, tokens_per_step: int, tokens_per_sec: float) -> float:
    """Time to finish the run's remaining steps at the recent training speed (evaluations not counted): the one
    ETA that the progress bar and `status` both show."""
    return max(0, steps_left) * tokens_per_step / tokens_per_sec if tokens_per_sec > 0 else math.inf


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
        if resume_step is not None:
            earlier = read_metrics(source) if (source / METRICS).is_file() else []
            # Records past the checkpoint are about to be redone; end records of earlier sessions no longer hold.
            history = [r for r in earlier if r.get("kind") in ("train", "eval") and r.get("step", 0) <= resume_step]
            # Where each session took over, so that plots can mark it (the earlier run records are replaced).
            before = next((r.get("resumed_at", []) for r in earlier if r.get("kind") == "run"), [])
            run_record = {**run_record, "resumed_at": [*(step for step in before if step < resume_step), resume_step]}
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

    def end(self, step: int, elapsed: float, interrupted: bool = False, error: BaseException | None = None,
            pruned: bool = False) -> None:
        """The last record of a run (or of one session of a resumed run)."""
        record: dict[str, Any] = {"kind": "end", "step": step, "elapsed": elapsed, "status": "finished"}
        if pruned and error is None:  # stopped by a search (sweep --prune) as hopeless, cleanly
            record["status"] = "pruned"
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


# What every field that a reader uses must hold; records are checked once, here, so that no reader has to.
# COUNT: a non-negative integer below 2**63; SECONDS: a number of magnitude below 1e18 (so that arithmetic on
# times, such as an ETA, cannot overflow); FINITE: a finite number; NUMBER: any number (a loss may be inf or nan);
# a dict: a mapping whose listed fields follow their own rules. Fields not listed may hold anything.
COUNT, SECONDS, FINITE, NUMBER = "count", "seconds", "finite", "number"
_FIELDS: dict[str, Any] = {
    "kind": str, "status": str, "error": str, "device": str,
    "step": COUNT, "epoch": COUNT, "parameters": COUNT, "total_steps": COUNT, "steps_per_epoch": COUNT,
    "tokens_per_step": COUNT, "vocab_size": COUNT, "world_size": COUNT,
    "time": SECONDS, "elapsed": SECONDS, "lr": FINITE, "tokens_per_sec": FINITE, "flops_per_token": FINITE,
    "peak_memory_mb": FINITE,
    "train_loss": NUMBER, "val_loss": NUMBER, "perplexity": NUMBER, "bits_per_char": NUMBER, "grad_norm": NUMBER,
    "config": {"training": {"epochs": COUNT}},
}
_REQUIRED = {"train": ("step", "train_loss"), "eval": ("step", "val_loss")}  # what readers index directly


def _follows(value: Any, rule: Any) -> bool:
    if isinstance(rule, dict):
        return isinstance(value, dict) and all(_follows(value[k], r) for k, r in rule.items() if k in value)
    if rule is str:
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if rule == COUNT:
        return isinstance(value, int) and 0 <= value < 2**63
    if rule == SECONDS:
        return abs(value) < 1e18  # False for nan and inf too
    return rule == NUMBER or math.isfinite(value)


def valid_record(record: Any) -> bool:
    """Whether a parsed line is a record FundamentaLLM could have written: a JSON object with a "kind" whose
    known fields have the right types."""
    return (isinstance(record, dict) and isinstance(record.get("kind"), str)
            and all(_follows(value, _FIELDS[key]) for key, value in record.items() if key in _FIELDS)
            and all(key in record for key in _REQUIRED.get(record["kind"], ())))


def read_metrics(run_dir: Path, quiet: bool = False) -> list[dict[str, Any]]:
    """Every valid record of a run's metrics.jsonl, in order. A damaged line (not UTF-8, not JSON, not an object,
    a field of the wrong type or out of range) is skipped, and one warning says how many were; a half-written
    last line (a run being written right now, or killed mid-line) is skipped silently. quiet: no warning (for a
    reader that looks at a file another reader of the same command reports on)."""
    path = Path(run_dir) / METRICS
    records, damaged = [], []
    if not path.exists():  # callers that poll a starting run wait for this
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
    with open_regular(path) as f:  # a FIFO in its place would block forever
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError):  # not UTF-8, not JSON, a number past int()'s limit, nesting
                record = None
            if valid_record(record):
                records.append(record)
            elif raw.endswith(b"\n"):  # a complete line, so damaged rather than still being written
                damaged.append(number)
    if damaged and not quiet:
        shown = ", ".join(map(str, damaged[:5])) + (", ..." if len(damaged) > 5 else "")
        warn(f"{path}: skipped {len(damaged)} damaged record(s) (line {shown})")
    return records
