"""The learning-rate range test ("LR finder").

A fresh model trains for up to `num_steps` optimizer steps while the learning rate grows exponentially from
`start_lr` to `end_lr`, one new rate per step. The loss first barely moves (rate too small), then falls quickly,
then flattens and finally rises or blows up (rate too large). The test stops as soon as the loss diverges, since
the rest of the range would only cost time:

- the loss is not finite, or the smoothed loss exceeds `diverge_factor` times its best (a blow-up), or
- the smoothed loss has clearly passed its minimum: after falling at least 10% below where it started, it has
  made no new low for two thirds of a decade of learning rate. With AdamW and gradient clipping a character
  model's loss rarely blows up to 4x its best (it levels off near the loss of an untrained model instead), so
  without this rule the test would run to `end_lr` every time.

The suggestion comes from the smoothed loss, by one of two rules, and the output says which:

- steepest descent: the rate where the smoothed loss falls fastest per decade of learning rate, searched only
  below the rate of the minimum. Used when the loss clearly fell before its minimum and the steepest point is not
  at the very start of the range (where it is usually noise).
- minimum / 10: the rate of the smoothed loss's minimum divided by ten (the minimum itself is already at the
  edge of stability). The fallback when the steepest-descent point is not trustworthy.

The model, optimizer, precision and batches are exactly those `train` would use (same config), but there is no
warm-up, no schedule and no checkpoint; nothing of the test is kept except its CSV and plot.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fundamentallm import distributed, plot
from fundamentallm.config import RANGE_TEST, Config
from fundamentallm.console import Progress, info, warn
from fundamentallm.device import is_out_of_memory, oom_message, select_device
from fundamentallm.errors import TrainingFailed, UserError
from fundamentallm.files import atomic_write_bytes
from fundamentallm.optim import optimizer_step, set_lr
from fundamentallm.run import setup_run
from fundamentallm.runfiles import LR_FIND_CSV, LR_FIND_PLOT, check_output_dir, hold

if TYPE_CHECKING:
    from fundamentallm.train import TrainJob

# The range test's defaults are lr-find's flags' defaults, kept beside the configuration's (config.RANGE_TEST).
START_LR, END_LR, NUM_STEPS, DIVERGE_FACTOR = RANGE_TEST
SMOOTHING = 0.8  # EMA of the loss: about the last five steps weigh in, so the curve lags by under half a decade
MIN_STEPS = 10  # fewer recorded steps than this cannot support a suggestion
LEARNED_FRACTION = 0.1  # the minimum rule only applies once the loss fell this far below its start ...
PATIENCE_DECADES = 2 / 3  # ... and made no new low over this span of learning rates

RULE_STEEPEST = "steepest descent of the smoothed loss"
RULE_MINIMUM = "minimum of the smoothed loss / 10"


@dataclass
class RangeTest:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stop_reason: str  # why the test ended before end_lr; empty when it ran the whole range
    elapsed_seconds: float
    parameters: int


@dataclass
class Suggestion:
    lr: float
    rule: str  # RULE_STEEPEST or RULE_MINIMUM
    reason: str  # one sentence on why that rule was chosen
    minimum_lr: float
    steepest_lr: float | None


@dataclass
class LRFindResult:
    test: RangeTest
    suggestion: Suggestion
    csv_path: Path
    plot_path: Path | None


def suggest(lrs: list[float], smoothed: list[float]) -> Suggestion:
    """Pick a learning rate from a range test's smoothed loss curve (see the module docstring for the rules)."""
    if len(lrs) < MIN_STEPS:
        raise UserError(f"the range test recorded only {len(lrs)} steps before the loss diverged (at learning "
                        f"rate {lrs[-1] if lrs else float('nan'):.2e}); start lower, e.g. --start-lr "
                        f"{(lrs[0] if lrs else START_LR) / 100:.0e}")
    values = np.asarray(smoothed, dtype=np.float64)
    log_lr = np.log10(np.asarray(lrs, dtype=np.float64))
    low = int(np.argmin(values))
    minimum_lr = lrs[low]
    fallback = Suggestion(minimum_lr / 10, RULE_MINIMUM, "", minimum_lr, None)
    # The first steps carry the EMA's start-up and the model's first, fastest moves at a tiny rate: skip them.
    skip = max(2, len(lrs) // 20)
    if low - skip < 3:
        fallback.reason = "the loss reached its minimum too early in the range for a reliable slope"
        return fallback
    slope = np.gradient(values[: low + 1], log_lr[: low + 1])  # loss change per decade of learning rate
    steep = skip + int(np.argmin(slope[skip:low]))
    drop = values[skip] - values[low]
    fallback.steepest_lr = lrs[steep]
    if drop < 0.05 * abs(values[skip]):
        fallback.reason = (f"the loss fell by only {drop:.3f} before its minimum, too little for its steepest "
                           f"point to mean much")
        return fallback
    if steep <= skip + 1:
        fallback.reason = "the steepest descent sits at the start of the range, which is usually noise"
        return fallback
    return Suggestion(lrs[steep], RULE_STEEPEST,
                      f"the loss fell by {drop:.3f} before its minimum, fastest at {lrs[steep]:.2e} "
                      f"({slope[steep]:.3f} per decade of learning rate)", minimum_lr, lrs[steep])


def range_test(config: Config, data_paths: list[str], *, device: str = "auto", start_lr: float = START_LR,
               end_lr: float = END_LR, num_steps: int = NUM_STEPS, diverge_factor: float = DIVERGE_FACTOR,
               val_paths: list[str] | None = None) -> RangeTest:
    """Train a fresh model with an exponentially increasing learning rate; stop when the loss diverges."""
    if not 0 < start_lr < end_lr:
        raise UserError(f"--start-lr {start_lr:g} must be positive and below --end-lr {end_lr:g}")
    if num_steps < MIN_STEPS:
        raise UserError(f"--steps {num_steps}: the range test needs at least {MIN_STEPS} steps")
    if diverge_factor <= 1:
        raise UserError(f"--diverge-factor {diverge_factor:g} must be above 1")
    if distributed.launched_by_torchrun():
        raise UserError("the learning-rate range test runs in one process; run 'fundamentallm lr-find' once "
                        "without torchrun and pass the suggested rate with --learning-rate")
    cfg = config.training
    run = setup_run(config, data_paths, select_device(device), val_paths=val_paths)  # exactly what `train` builds
    info(f"LR range test: up to {num_steps} steps, learning rate {start_lr:.0e} -> {end_lr:.0e} (x"
         f"{(end_lr / start_lr) ** (1 / max(1, num_steps - 1)):.3f} per step), fresh model of "
         f"{run.model.num_parameters():,} parameters on {run.device}, batch {cfg.batch_size} x "
         f"{cfg.gradient_accumulation_steps} x {cfg.sequence_length} tokens")

    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    avg, best, best_step, stop_reason = 0.0, math.inf, 0, ""
    patience = max(3, math.ceil(PATIENCE_DECADES * (num_steps - 1) / math.log10(end_lr / start_lr)))
    start = time.perf_counter()
    run.step_model.train()
    try:
        with Progress(num_steps, "LR range test", unit="step") as bar:
            for step in range(num_steps):
                lr = start_lr * (end_lr / start_lr) ** (step / (num_steps - 1))
                set_lr(run.optimizer, lr)
                loss, _ = optimizer_step(run.step_model, run.model, run.optimizer, run.scaler, run.sampler, cfg,
                                         run.amp)
                bar.update()
                value = loss.item()  # one sync per step: the test must see every loss at once
                if not math.isfinite(value):
                    stop_reason = f"the loss became {value} at learning rate {lr:.2e}"
                    break
                avg = SMOOTHING * avg + (1 - SMOOTHING) * value
                current = avg / (1 - SMOOTHING ** (step + 1))
                lrs.append(lr)
                losses.append(value)
                smoothed.append(current)
                bar.set_postfix(lr=f"{lr:.2e}", loss=f"{current:.3f}")
                if current < best:
                    best, best_step = current, step
                if step >= MIN_STEPS // 2 and current > diverge_factor * best:
                    stop_reason = (f"the smoothed loss {current:.3f} exceeds {diverge_factor:g} x its best "
                                   f"{best:.3f} at learning rate {lr:.2e}")
                    break
                if best < (1 - LEARNED_FRACTION) * smoothed[0] and step - best_step >= patience:
                    stop_reason = (f"the smoothed loss made no new low for {patience} steps since its minimum "
                                   f"{best:.3f} at learning rate {lrs[best_step]:.2e}")
                    break
    except Exception as exc:
        if is_out_of_memory(exc):
            raise TrainingFailed(oom_message(cfg, run.device)) from None
        raise
    return RangeTest(lrs, losses, smoothed, stop_reason, time.perf_counter() - start, run.model.num_parameters())


def _write_csv(path: Path, test: RangeTest) -> None:
    lines = ["step,learning_rate,loss,smoothed_loss"]
    lines += [f"{i + 1},{lr:.6e},{loss:.6f},{s:.6f}"
              for i, (lr, loss, s) in enumerate(zip(test.lrs, test.losses, test.smoothed, strict=True))]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def find_lr(config: Config, data_paths: list[str], output_dir: Path, *, device: str = "auto",
            start_lr: float = START_LR, end_lr: float = END_LR, num_steps: int = NUM_STEPS,
            diverge_factor: float = DIVERGE_FACTOR, val_paths: list[str] | None = None) -> LRFindResult:
    """Run the range test, print the suggestion and why, write lr_find.csv and (with matplotlib) lr_find.png."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"-o {output_dir} is a file, not a directory")
    test = range_test(config, data_paths, device=device, start_lr=start_lr, end_lr=end_lr, num_steps=num_steps,
                      diverge_factor=diverge_factor, val_paths=val_paths)
    choice = suggest(test.lrs, test.smoothed)
    if test.stop_reason:
        info(f"Stopped after {len(test.lrs)} steps: {test.stop_reason}")
    else:
        warn(f"the loss did not diverge up to learning rate {end_lr:g}; the range may end too early "
             f"(try a larger --end-lr)")
    info(f"Smoothed loss: {test.smoothed[0]:.3f} at the start, minimum "
         f"{min(test.smoothed):.3f} at learning rate {choice.minimum_lr:.2e}")
    csv_path = output_dir / LR_FIND_CSV
    _write_csv(csv_path, test)
    plot_path = None
    if plot.matplotlib_available():
        plot_path = plot.plot_lr_find(output_dir / LR_FIND_PLOT, test.lrs, test.losses, test.smoothed, choice.lr,
                                      "steepest descent" if choice.rule == RULE_STEEPEST else "minimum / 10",
                                      choice.minimum_lr)
    else:
        warn(f"no {LR_FIND_PLOT}: drawing it needs matplotlib ({plot.INSTALL_HINT})")
    info(f"Range test took {test.elapsed_seconds:.1f}s; wrote {csv_path}" + (f" and {plot_path}" if plot_path
                                                                               else ""))
    info(f"Rule: {choice.rule}, because {choice.reason}")
    info(f"Suggested learning rate: {choice.lr:.2e}")
    return LRFindResult(test, choice, csv_path, plot_path)


def auto_learning_rate(job: TrainJob) -> Config:
    """`train --learning-rate auto`: run the range test (its CSV and plot go into the run directory) and return
    the job's config with the suggested rate."""
    if job.resume_from is not None or job.init is not None:
        raise UserError("--learning-rate auto tests fresh models; with --resume or --init-from give a number")
    config, output_dir = job.config, job.output_dir
    with hold(output_dir):  # no other run may start here while the range test writes (train re-checks after)
        # Refuse an occupied output directory now, not after the range test has taken its minute.
        check_output_dir(Path(output_dir), resume_path=None, overwrite=job.overwrite)
        result = find_lr(config, job.data_paths, output_dir, device=job.device, val_paths=job.val_paths)
    tuned = config.model_copy(deep=True)
    tuned.training.learning_rate = float(f"{result.suggestion.lr:.3g}")
    info(f"Training with learning rate {tuned.training.learning_rate:g} from the range test")
    info()
    return tuned
