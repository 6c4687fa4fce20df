"""Where a run stands, read from its directory alone: `fundamentallm status RUN_DIR`.

Everything comes from files the run writes as it goes: metrics.jsonl (appended and flushed line by line) and
the checkpoints. No process is contacted, so this works on a run started elsewhere (another
shell, a cluster job writing to shared storage) whether it is still going or not.

A run's state:
- finished / interrupted / failed: the last record of metrics.jsonl is an "end" record saying so;
- running: a live process holds the directory (runfiles.hold: an OS lock that dies with the process), or, for a
  run whose process this machine cannot see (shared storage), no end record and metrics.jsonl changed recently
  (within a few of the run's own logging intervals);
- stopped: no end record and nobody holds the directory, which still has the lock file of a process that died
  (or, from elsewhere, no recent change): the process was killed (out of memory, kill -9, a lost node).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fundamentallm.console import duration
from fundamentallm.errors import UserError
from fundamentallm.metrics import eta_seconds, read_metrics
from fundamentallm.runfiles import LOCK, METRICS, live_holder

# A run counts as running while metrics.jsonl is younger than this many of its own record intervals, and at
# least STALE_MIN_SECONDS (an evaluation pass can take a while between records).
STALE_INTERVALS = 5
STALE_MIN_SECONDS = 120.0


@dataclass
class RunStatus:
    run_dir: str
    state: str  # running, finished, interrupted, failed, stopped
    last_update_seconds_ago: float
    step: int = 0
    total_steps: int | None = None
    epoch: int | None = None
    epochs: int | None = None
    train_loss: float | None = None  # mean over the last log interval: the progress bar's train_loss
    train_loss_step: int | None = None
    val_loss: float | None = None
    val_loss_step: int | None = None
    best_val_loss: float | None = None
    lr: float | None = None
    tokens_per_sec: float | None = None
    elapsed_seconds: float | None = None
    eta_seconds: float | None = None
    error: str | None = None
    process: str | None = None  # "pid N: command" of the live process holding the run directory

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def run_status(run_dir: Path, now: float | None = None) -> RunStatus:
    run_dir = Path(run_dir)
    path = run_dir / METRICS
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist" if not run_dir.exists()
                        else f"{run_dir} is a file; give the output directory of a training run")
    if not path.is_file():
        raise UserError(f"{run_dir} holds no {METRICS}; give the output directory of a training run "
                        f"(the -o of 'fundamentallm train')")
    records = read_metrics(run_dir)
    age = max(0.0, (time.time() if now is None else now) - path.stat().st_mtime)
    status = RunStatus(str(run_dir), "running", age, process=live_holder(run_dir))
    run = next((r for r in records if r.get("kind") == "run"), {})
    trains = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    # The run record is written by the current session (rewritten on resume), so it knows about more epochs.
    status.epochs = run.get("config", {}).get("training", {}).get("epochs")
    # The plan as the progress bar has it: a time budget (or max_steps) fixes the steps after the run record
    # was written, and train records carry the plan as it stood.
    planned = next((r["total_steps"] for r in reversed(trains) if "total_steps" in r), None)
    status.total_steps = planned or run.get("total_steps")
    per_epoch = run.get("steps_per_epoch")
    if status.total_steps and per_epoch:  # as the bar's "Epoch i/N": the epochs the planned steps reach
        status.epochs = -(-status.total_steps // per_epoch)
    stepped = [r for r in records if "step" in r]
    if stepped:
        last = stepped[-1]
        status.step = last["step"]
        status.elapsed_seconds = last.get("elapsed")
        status.epoch = max((r["epoch"] for r in stepped if "epoch" in r), default=None)
        if status.epoch and status.epochs:
            status.epochs = max(status.epochs, status.epoch)
    if trains:
        status.train_loss, status.train_loss_step = trains[-1].get("train_loss"), trains[-1]["step"]
        status.lr, status.tokens_per_sec = trains[-1].get("lr"), trains[-1].get("tokens_per_sec")
    if evals:
        status.val_loss, status.val_loss_step = evals[-1].get("val_loss"), evals[-1]["step"]
        finite = [r["val_loss"] for r in evals if isinstance(r.get("val_loss"), (int, float))
                  and math.isfinite(r["val_loss"])]
        status.best_val_loss = min(finite) if finite else None

    if status.process is not None:
        pass  # running, whatever the records say: a resumed run's file starts with the old run's records
    elif records and records[-1].get("kind") == "end":
        status.state = records[-1].get("status", "finished")
        status.error = records[-1].get("error")
    elif (run_dir / LOCK).exists():
        status.state = "stopped"  # its process left the lock file behind and died: nobody holds it now
    else:
        # How often does this run write? The median gap between its records (in its own elapsed time).
        times = [r["elapsed"] for r in stepped if isinstance(r.get("elapsed"), (int, float))]
        gaps = sorted(b - a for a, b in itertools.pairwise(times) if b > a)
        typical = gaps[len(gaps) // 2] if gaps else 0.0
        if age > max(STALE_MIN_SECONDS, STALE_INTERVALS * typical):
            status.state = "stopped"
    if status.state == "running" and status.total_steps and status.tokens_per_sec and run.get("tokens_per_step"):
        # The progress bar's ETA: the remaining steps at the recent speed, less the time since the last record.
        eta = eta_seconds(status.total_steps - status.step, run["tokens_per_step"], status.tokens_per_sec)
        status.eta_seconds = max(0.0, eta - age)
    return status


def format_status(status: RunStatus) -> str:
    run_dir = status.run_dir
    ago = f"last update {duration(status.last_update_seconds_ago)} ago"
    headline = {
        "running": f"running ({(status.process or 'no process seen on this machine').split(':')[0]}; {ago})",
        "finished": f"finished ({ago})",
        "interrupted": f"interrupted ({ago}); continue with: fundamentallm train --resume auto -o {run_dir}",
        "failed": f"failed ({ago}): {status.error}",
        "stopped": f"not running: no end record and no update for {duration(status.last_update_seconds_ago)} "
                   f"(the process was killed?); continue with: fundamentallm train --resume auto -o {run_dir}",
    }.get(status.state, status.state)
    lines = [f"{run_dir}: {headline}"]
    where = []
    if status.epoch is not None:
        where.append(f"epoch {status.epoch}" + (f"/{status.epochs}" if status.epochs else ""))
    step = f"step {status.step:,}"
    if status.total_steps:
        step += f"/{status.total_steps:,} ({100 * status.step / status.total_steps:.0f}%)"
    where.append(step)
    lines.append("  " + ", ".join(where))
    losses = []
    if status.train_loss is not None:
        losses.append(f"train_loss {status.train_loss:.4f} (step {status.train_loss_step:,})")
    if status.val_loss is not None:
        losses.append(f"val_loss {status.val_loss:.4f} (step {status.val_loss_step:,})")
    if status.best_val_loss is not None:
        losses.append(f"best val_loss {status.best_val_loss:.4f}")
    if losses:
        lines.append("  " + ", ".join(losses))
    rates = []
    if status.lr is not None:
        rates.append(f"lr {status.lr:.2e}")
    if status.tokens_per_sec:
        rates.append(f"{status.tokens_per_sec:,.0f} tokens/s")
    if status.elapsed_seconds is not None:
        rates.append(f"elapsed {duration(status.elapsed_seconds)}")
    if status.eta_seconds is not None:
        rates.append(f"ETA {duration(status.eta_seconds)}")
    if rates:
        lines.append("  " + ", ".join(rates))
    return "\n".join(lines)
