"""Training: the loop, and what it does every N steps.

`train()` sets a run up (run.py), then `train_loop` runs it top to bottom: an optimizer step, a metrics record
every log_interval steps, an evaluation every eval_interval steps and at the end of each epoch, a checkpoint
every save_every_n_epochs epochs, and a final checkpoint. Everything a run needs to continue exactly where it
stopped (optimizer, scaler, sampler and RNG states, counters) goes into each resumable checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fundamentallm import checkpoint as ckpt
from fundamentallm import distributed
from fundamentallm.config import Config, save_config
from fundamentallm.console import Progress, duration, info, is_quiet, set_quiet, warn
from fundamentallm.data import TokenData
from fundamentallm.device import (
    PRECISION_NAMES,
    is_out_of_memory,
    machine_load_note,
    memory_stats,
    oom_message,
    select_device,
)
from fundamentallm.errors import TrainingFailed, UserError
from fundamentallm.evaluate import estimate_loss
from fundamentallm.generate import generate_tokens
from fundamentallm.metrics import MetricsLog, bits_per_char, eta_seconds, perplexity
from fundamentallm.optim import lr_at, optimizer_step, set_lr, warmup_for
from fundamentallm.run import FineTune, Run, setup_run
from fundamentallm.runfiles import (
    BEST,
    CONFIG,
    FINAL,
    INTERRUPTED,
    check_output_dir,
    hold,
    periodic_name,
    prune_periodic,
    start_output_dir,
)


@dataclass
class TrainResult:
    interrupted_by: int | None  # the signal that stopped the run, if one did
    wrote_files: bool  # this process wrote the run's files (under torchrun, rank 0 only)
    pruned: bool = False  # on_eval stopped the run


def train(config: Config, data_paths: list[str], output_dir: Path, *, device: str = "auto",
          resume_from: ckpt.Checkpoint | None = None, overwrite: bool = False, tensorboard: bool = False,
          config_origin: str = "", on_eval: Callable[[int, float], bool] | None = None,
          val_paths: list[str] | None = None, init: FineTune | None = None) -> TrainResult:
    """Train a model on DATA as `config` says (validating on `val_paths` when given, else on the end of DATA),
    writing checkpoints and metrics into `output_dir`.

    `on_eval(step, val_loss)`, when given, is called after each evaluation (a search uses it to prune hopeless
    runs); when it returns True the run ends there as early stopping would end it, recorded as pruned. `init`
    starts the new run from a trained model's weights (train --init-from)."""
    output_dir = Path(output_dir)
    dist, dev = distributed.init(select_device(device))  # under torchrun: this process's GPU, cuda:LOCAL_RANK
    set_quiet(not dist.is_main)
    try:
        with contextlib.ExitStack() as held:
            with distributed.collectively(dist):
                earlier_run = []
                if dist.is_main:  # the process that writes holds the directory: one live run per directory
                    held.enter_context(hold(output_dir))
                    earlier_run = check_output_dir(output_dir, resume_from and resume_from.path, overwrite)
                    if resume_from is not None:
                        ckpt.check_resume_in_place(resume_from, output_dir)
            return _train(config, data_paths, output_dir, dev, dist, resume_from, earlier_run, tensorboard,
                          config_origin, on_eval, val_paths, init)
    finally:
        distributed.shutdown(dist)


def _train(config: Config, data_paths: list[str], output_dir: Path, dev: torch.device, dist: distributed.Dist,
           resume_from: ckpt.Checkpoint | None, earlier_run: list[str], tensorboard: bool,
           config_origin: str, on_eval: Callable[[int, float], bool] | None,
           val_paths: list[str] | None, init: FineTune | None) -> TrainResult:
    """Set up, check what is left to do, write config.yaml, then run the loop."""
    run = setup_run(config, data_paths, dev, dist, resume=resume_from, val_paths=val_paths, init=init)
    run.on_eval = on_eval
    total_steps = plan_steps(run, resumed=resume_from is not None, output_dir=output_dir)
    with distributed.collectively(dist):
        if dist.is_main:
            start_output_dir(output_dir, earlier_run, resume=resume_from is not None)
            save_config(config, output_dir / CONFIG)
    print_header(run, total_steps, output_dir, resume_from, config_origin)
    log = open_metrics_log(run, total_steps, output_dir, resume_from, tensorboard) if dist.is_main else None
    interrupted_by = _guarded_loop(run, total_steps, output_dir, log, config_origin)
    return TrainResult(interrupted_by, wrote_files=dist.is_main, pruned=run.pruned)


def plan_steps(run: Run, resumed: bool, output_dir: Path) -> int:
    """The run's total number of optimizer steps (for now, when a time budget will fix it after the first
    steps); refuses to resume a run that has nothing left to do."""
    cfg, state = run.cfg, run.progress
    # Counted from where the run stands, not as epochs x steps_per_epoch: a resumed run may take other steps
    # per epoch than the run that wrote the checkpoint (another batch size or number of processes), and a
    # max_steps run ends its last epoch early.
    state.step_in_epoch = min(state.step_in_epoch, run.steps_per_epoch)
    planned = state.step + (cfg.epochs - state.epochs_done) * run.steps_per_epoch - state.step_in_epoch
    planned = state.planned_steps or planned  # a time budget's number of steps, once fixed, is the plan
    total_steps = planned if cfg.max_steps is None else min(cfg.max_steps, planned)
    patience = cfg.early_stopping_patience
    if resumed and patience and state.evals_without_improvement >= patience:
        raise UserError(f"the run in {output_dir} stopped early at step {state.step:,}: validation loss had not "
                        f"improved for {state.evals_without_improvement} evaluation(s). To train on anyway, resume "
                        f"with a larger --set training.early_stopping_patience (or 0 to switch it off)")
    if state.step >= total_steps:
        limit = (f"training.max_steps={cfg.max_steps}; to train further, resume with a larger --max-steps (or "
                 f"--set training.max_steps=null)" if total_steps == cfg.max_steps else
                 "its time budget; to train further, resume with a larger --time-budget" if state.planned_steps
                 else f"{cfg.epochs} epochs; to train further, resume with a larger --epochs")
        raise UserError(f"the run in {output_dir} already finished its {total_steps:,} steps ({limit})")
    if warmup_for(cfg, total_steps) < cfg.warmup_steps and not cfg.time_budget:
        warn(f"warmup_steps {cfg.warmup_steps} is more than a tenth of this run's {total_steps:,} steps; warming "
             f"up over {warmup_for(cfg, total_steps)} steps instead")
    return total_steps


def _guarded_loop(run: Run, total_steps: int, output_dir: Path, log: MetricsLog | None,
                  config_origin: str) -> int | None:
    """The loop under the signal handler, with out-of-memory turned into its remedies and the log's end record
    written however the loop ends."""
    stop = StopRequest()
    interrupted_by = None
    try:
        with stop.installed():
            interrupted_by = train_loop(run, total_steps, output_dir, log, stop, config_origin)
    except Exception as exc:
        if stop.aborted and isinstance(exc, RuntimeError):  # a second Ctrl-C inside torch.save
            raise Aborted(stop.aborted) from None
        if is_out_of_memory(exc):
            raise TrainingFailed(oom_message(run.cfg, run.device)) from None
        raise
    finally:
        if log is not None:
            log.end(run.progress.step, run.elapsed(), interrupted_by is not None, sys.exc_info()[1], run.pruned)
            log.close()
    return interrupted_by


def train_loop(run: Run, total_steps: int, output_dir: Path, log: MetricsLog | None, stop: StopRequest,
               config_origin: str = "") -> int | None:
    """Train until `total_steps`, early stopping or a stop request; returns the signal that stopped it, if any."""
    cfg, state = run.cfg, run.progress
    run.started_at = time.perf_counter() - state.elapsed_seconds
    window = LogWindow(state.pending_losses, state.pending_norms)
    state.pending_losses, state.pending_norms = [], []
    speed = SpeedCheck(state.step)
    stopped_early = False
    run.step_model.train()
    while state.step < total_steps and not stopped_early:
        epoch = state.epochs_done + 1
        epoch_steps = min(run.steps_per_epoch, state.step_in_epoch + total_steps - state.step)
        bar = Progress(epoch_steps, f"Epoch {epoch}/{epochs_of(run, total_steps)}", unit="it",
                       initial=state.step_in_epoch, remaining=False)
        while state.step_in_epoch < epoch_steps:
            lr = lr_at(state.step, total_steps, run.steps_per_epoch, cfg)
            set_lr(run.optimizer, lr)
            loss, norm = optimizer_step(run.step_model, run.model, run.optimizer, run.scaler, run.sampler, cfg,
                                        run.amp, run.ddp)
            state.step += 1
            state.step_in_epoch += 1
            state.tokens_seen += run.tokens_per_step
            window.add(loss, norm, run.tokens_per_step)
            bar.update()
            planned, seconds_per_step = total_steps, speed.measure(state.step, loss, run.elapsed())
            if seconds_per_step is not None:  # once per session, after its first steps
                total_steps = settle_plan(run, total_steps, seconds_per_step, config_origin)
            elif cfg.time_budget and speed.pace_due(state.step, total_steps):
                total_steps = check_pace(run, total_steps, speed)
            if total_steps != planned:
                epoch_steps = min(run.steps_per_epoch, state.step_in_epoch + total_steps - state.step)
                bar.set_total(epoch_steps)

            last_in_epoch = state.step_in_epoch == epoch_steps
            eval_due = bool(cfg.eval_interval) and state.step % cfg.eval_interval == 0 and not last_in_epoch
            if state.step % cfg.log_interval == 0 or last_in_epoch or eval_due:
                log_train(run, window, log, epoch, lr, bar, output_dir, total_steps)
            elif not window.records:  # before this session's first record, show every step's loss
                bar.set_postfix(train_loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            if eval_due:
                stopped_early = evaluate(run, log, output_dir)
                window.start = time.perf_counter()  # tokens/s measures training, not evaluation
                if stopped_early:
                    break
            if distributed.any_rank(run.dist, stop.signum is not None):
                bar.close(final_line=False)
                save_interrupted(run, window, output_dir)
                return stop.signum

        bar.close()  # the end of an epoch, or of training when max_steps or early stopping ends it mid-epoch
        stopped_early = end_epoch(run, log, output_dir, stopped_early)
        window.start = time.perf_counter()

    state.elapsed_seconds = run.elapsed()
    save_checkpoint(run, output_dir / FINAL)
    if run.dist.is_main:  # a finished run has nothing left to resume from an interruption
        (output_dir / INTERRUPTED).unlink(missing_ok=True)
    info(f"Done: {state.step:,} steps in {duration(state.elapsed_seconds)}; best val_loss "
         f"{state.best_val_loss:.4f} ({val_bits_per_char(run, state.best_val_loss):.3f} bits/char). "
         f"Checkpoints in {output_dir}/")
    return None


# ----------------------------------------------------------------------------------------------------------
# What the loop does every N steps


def log_train(run: Run, window: LogWindow, log: MetricsLog | None, epoch: int, lr: float, bar: Progress,
              output_dir: Path, total_steps: int) -> None:
    """Read the window's losses (one host-device sync), check them, show them and write a train record."""
    state = run.progress
    values, norms = window.read(run.dist)
    check_finite(values, state.step - len(values) + 1, output_dir)
    now = time.perf_counter()
    tokens_per_sec = window.tokens / max(now - window.start, 1e-9)
    state.epoch_loss_sum += sum(values)
    state.epoch_loss_steps += len(values)
    state.train_loss = sum(values) / len(values)  # the same number in the bar, the record and `status`
    eta = eta_seconds(total_steps - state.step, run.tokens_per_step, tokens_per_sec)
    bar.set_postfix({"train_loss": f"{state.train_loss:.4f}", "lr": f"{lr:.2e}",
                     "tokens/s": f"{tokens_per_sec:,.0f}", "eta": duration(eta)})  # eta: the run's, as in status
    if log is not None:
        log.write({"kind": "train", "step": state.step, "epoch": epoch, "train_loss": state.train_loss,
                   "lr": lr, "grad_norm": sum(norms) / len(norms), "tokens_per_sec": tokens_per_sec,
                   "elapsed": now - run.started_at, **memory_stats(run.device)})
    window.reset()


def evaluate(run: Run, log: MetricsLog | None, output_dir: Path) -> bool:
    """Validation loss, logged, with a short sample; keeps best_model.pt. Returns True when early stopping (or
    on_eval) says to stop."""
    cfg, state = run.cfg, run.progress
    val_loss = estimate_loss(run.model, run.val_tokens, cfg.batch_size, run.device, run.amp,
                             cfg.eval_batches * cfg.batch_size, run.dist)
    state.val_loss = val_loss
    improved = val_loss < state.best_val_loss
    if improved:
        state.best_val_loss, state.evals_without_improvement = val_loss, 0
    else:
        state.evals_without_improvement += 1
    sample = sample_text(run) if cfg.sample_tokens and run.dist.is_main else None
    if log is not None:
        log.write({"kind": "eval", "step": state.step, "epoch": state.epochs_done + 1,
                   "train_loss": state.train_loss, "val_loss": val_loss, "perplexity": perplexity(val_loss),
                   "bits_per_char": val_bits_per_char(run, val_loss), "elapsed": run.elapsed(),
                   **({"sample": sample} if sample is not None else {})})
    if improved and cfg.save_best:
        save_checkpoint(run, output_dir / BEST, resumable=False)
    if run.on_eval is not None and run.on_eval(state.step, val_loss):
        run.pruned = True
        return True
    patience = cfg.early_stopping_patience
    return bool(patience) and state.evals_without_improvement >= patience


def sample_text(run: Run) -> str:
    """A short continuation of the validation text's first characters, greedy-ish and seeded, so that samples
    after successive evaluations can be compared: the quickest way to see that a model learns. Printed now."""
    cfg = run.cfg
    prompt = [int(t) for t in run.val_tokens[: min(16, cfg.sequence_length // 2, len(run.val_tokens))]]
    generator = torch.Generator(run.device).manual_seed(cfg.seed)
    was_training = run.model.training
    run.model.eval()
    ids = list(generate_tokens(run.model, prompt, cfg.sample_tokens, temperature=0.5, generator=generator))
    run.model.train(was_training)
    tokenizer = run.data.tokenizer
    text = tokenizer.decode(prompt) + tokenizer.decode(ids)
    info("  sample: " + text.replace("\n", "\n          "))
    return text


def end_epoch(run: Run, log: MetricsLog | None, output_dir: Path, stopped_early: bool) -> bool:
    """Evaluate (unless early stopping just did), report, and save the epoch's checkpoint. An epoch that
    max_steps or early stopping cut short stays open: a resumed run finishes it. Returns stopped_early."""
    cfg, state = run.cfg, run.progress
    epoch = state.epochs_done + 1
    epoch_loss = state.epoch_loss_sum / max(1, state.epoch_loss_steps)
    if not stopped_early:
        stopped_early = evaluate(run, log, output_dir)
    epoch_complete = state.step_in_epoch == run.steps_per_epoch
    if epoch_complete:
        state.epochs_done += 1
        state.step_in_epoch, state.epoch_loss_sum, state.epoch_loss_steps = 0, 0.0, 0
    state.elapsed_seconds = run.elapsed()
    info(f"  epoch_train_loss={epoch_loss:.4f}, val_loss={state.val_loss:.4f}, "
         f"perplexity={perplexity(state.val_loss):.2f}, bpc={val_bits_per_char(run, state.val_loss):.3f}"
         + ("  (best)" if state.evals_without_improvement == 0 else ""))  # a new low, not a tie
    if epoch_complete and state.epochs_done % cfg.save_every_n_epochs == 0:
        save_checkpoint(run, output_dir / periodic_name(epoch))
        if run.dist.is_main:
            prune_periodic(output_dir, cfg.keep_last_n)
    if run.pruned:
        info(f"Pruned: the search stopped this run at step {state.step:,} (validation loss {state.val_loss:.4f})")
    elif stopped_early:
        info(f"Early stopping: validation loss has not improved for {cfg.early_stopping_patience} "
             f"evaluation(s); best {state.best_val_loss:.4f}")
    distributed.barrier(run.dist)
    return stopped_early


# ----------------------------------------------------------------------------------------------------------
# The run's speed: what it says about the plan


CALIBRATION_STEPS = 10  # steps timed at the start of each session (after one warm-up step)
PACE_CHECKS = (0.5, 0.75)  # under a time budget, the steps are re-fixed at these fractions of the way


class SpeedCheck:
    """Times this session's steps 2 to CALIBRATION_STEPS + 1 (the first pays for compilation and warm-up). Under a
    time budget it then says when to re-check the pace: the first steps can run 20-30% faster or slower than the
    rest of a run (caches, clocks, evaluations), which alone would miss the budget by as much."""

    def __init__(self, first_step: int) -> None:
        self.first_step = first_step
        self.start = 0.0
        self.settled: tuple[int, float] | None = None  # step and run time when the timed steps ended
        self.checks_left = list(PACE_CHECKS)

    def measure(self, step: int, loss: torch.Tensor, elapsed: float) -> float | None:
        """Seconds per step once the timed steps are done (at that one step; None at every other)."""
        if step == self.first_step + 1:
            loss.item()  # wait for the device, so the clock measures the steps, not their queueing
            self.start = time.perf_counter()
        elif step == self.first_step + 1 + CALIBRATION_STEPS:
            loss.item()
            self.settled = (step, elapsed)
            return (time.perf_counter() - self.start) / CALIBRATION_STEPS
        return None

    def pace_due(self, step: int, total_steps: int) -> bool:
        """Whether `step` is the next pace check (the same step on every rank: it depends on steps only)."""
        if self.settled is None or not self.checks_left or step - self.settled[0] < CALIBRATION_STEPS:
            return False
        if step - self.settled[0] < self.checks_left[0] * (total_steps - self.settled[0]):
            return False
        self.checks_left.pop(0)
        return True


def settle_plan(run: Run, total_steps: int, seconds_per_step: float, config_origin: str) -> int:
    """Report the measured speed; with a time budget not yet fixed, fix the number of steps so that the whole
    schedule (evaluations included) fits in what is left of it. Returns the run's total steps."""
    cfg, state = run.cfg, run.progress
    per_epoch = seconds_per_step * run.steps_per_epoch
    if cfg.time_budget and not state.planned_steps:
        evals_per_step = 1 / run.steps_per_epoch + (1 / cfg.eval_interval if cfg.eval_interval else 0)
        eval_seconds = _eval_seconds(run, seconds_per_step)
        left = cfg.time_budget - run.elapsed() - eval_seconds  # the last evaluation
        total_steps = _fix_steps(run, left / (seconds_per_step + eval_seconds * evals_per_step))
        info(f"Time budget {duration(cfg.time_budget)}: {seconds_per_step:.3g} s per step, so {total_steps:,} steps "
             f"in all (an epoch is {run.steps_per_epoch:,}); warmup {warmup_for(cfg, total_steps)} steps")
    note = ""
    if run.device.type == "cpu" and config_origin.endswith("(default)"):
        note = ("; no GPU here and no --config given: --config fast-cpu trains a good character model on a CPU "
                "in minutes")
    info(f"Speed: {run.tokens_per_step / seconds_per_step:,.0f} tokens/s, about {duration(per_epoch)} per epoch "
         f"and {duration(seconds_per_step * (total_steps - state.step) + run.elapsed())} for the run's steps "
         f"(evaluations come on top){note}")
    return total_steps


def check_pace(run: Run, total_steps: int, speed: SpeedCheck) -> int:
    """Re-fix a time budget's steps from the pace since the timed steps, evaluations included (they recur at
    the same rate). A cosine schedule stretches or shrinks a little from here; wsd's stable phase absorbs it."""
    step, elapsed = speed.settled
    seconds_per_step = (run.elapsed() - elapsed) / (run.progress.step - step)
    left = run.cfg.time_budget - run.elapsed() - _eval_seconds(run, seconds_per_step)  # the last evaluation
    planned = _fix_steps(run, left / seconds_per_step)
    info(f"Time budget, pace at step {run.progress.step:,}: {seconds_per_step:.3g} s per step (evaluations "
         f"included), so {planned:,} steps in all (planned: {total_steps:,})")
    return planned


def _eval_seconds(run: Run, seconds_per_step: float) -> float:
    # An evaluation reads its tokens forward only: about a third of a training step's work per token.
    cfg = run.cfg
    eval_tokens = len(run.val_tokens) if not cfg.eval_batches else min(
        len(run.val_tokens), cfg.eval_batches * cfg.batch_size * cfg.sequence_length)
    return eval_tokens / run.tokens_per_step * seconds_per_step / 3


def _fix_steps(run: Run, steps_left: float) -> int:
    """Record the run's total steps: at least one more than done, at most max_steps, the same on every rank."""
    state, max_steps = run.progress, run.cfg.max_steps
    steps = state.step + max(1, int(steps_left))
    state.planned_steps = distributed.smallest_on_all_ranks(run.dist, min(steps, max_steps or steps))
    return state.planned_steps


def epochs_of(run: Run, total_steps: int) -> int:
    """How many epochs (the last maybe partial) `total_steps` covers: what the bar counts to."""
    return max(run.progress.epochs_done + 1, -(-total_steps // run.steps_per_epoch))


def val_bits_per_char(run: Run, val_loss: float) -> float:
    """Bits per character of the validation text, from a loss per token measured on it (or on part of it)."""
    return bits_per_char(val_loss, len(run.data.val), run.data.val_chars)


def save_checkpoint(run: Run, path: Path, resumable: bool = True) -> None:
    """Called on every rank at the same points (resumable ones gather every rank's RNG state); rank 0 writes."""
    state = ckpt.training_state(run.optimizer, run.scaler, run.sampler, run.device, run.dist) \
        if resumable else None
    if not run.dist.is_main:
        return
    ckpt.write_checkpoint(path, ckpt.Checkpoint(
        config=run.config, tokenizer=run.data.tokenizer, model_state=run.model.state_dict(),
        data=ckpt.DataInfo.of(run.data), progress=run.progress, training_state=state))


def save_interrupted(run: Run, window: LogWindow, output_dir: Path) -> None:
    """Save interrupted.pt. The steps since the last record go into it (checked: a NaN is never saved), so the
    resumed run's records match an uninterrupted run's."""
    state = run.progress
    state.pending_losses, state.pending_norms = window.read(run.dist)
    check_finite(state.pending_losses, state.step - len(state.pending_losses) + 1, output_dir)
    state.elapsed_seconds = run.elapsed()
    save_checkpoint(run, output_dir / INTERRUPTED)
    info(f"Interrupted at step {state.step:,}; saved {output_dir / INTERRUPTED}. Resume with: "
         f"fundamentallm train --resume auto -o {shlex.quote(str(output_dir))}")


def check_finite(values: list[float], first_step: int, output_dir: Path) -> None:
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            raise TrainingFailed(
                f"the training loss became {value} at step {first_step + offset}. Lower the learning rate "
                f"(--learning-rate) or enable gradient clipping (--set training.gradient_clip_norm=1.0). "
                f"Checkpoints already in {output_dir} are untouched")


# ----------------------------------------------------------------------------------------------------------
# The loop's companions: the log window, stop requests, the metrics log and the header


class LogWindow:
    """The steps since the last train record. Their losses and gradient norms stay on the device until the
    record is written: one host-device synchronisation per record, not per step."""

    def __init__(self, carried_losses: list[float], carried_norms: list[float]) -> None:
        self.carried = (list(carried_losses), list(carried_norms))  # read already, before an interruption
        self.losses: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.tokens = 0
        self.start = time.perf_counter()
        self.records = 0  # train records written this session

    def add(self, loss: torch.Tensor, norm: torch.Tensor, tokens: int) -> None:
        self.losses.append(loss)
        self.norms.append(norm)
        self.tokens += tokens

    def read(self, dist: distributed.Dist) -> tuple[list[float], list[float]]:
        """Every step's loss (the mean over ranks) and gradient norm, oldest first."""
        values, norms = list(self.carried[0]), list(self.carried[1])
        if self.losses:
            losses = torch.stack(self.losses)
            if dist.enabled:  # mean over ranks, so the log shows the global batch's loss
                distributed.all_reduce_sum(dist, losses)
                losses /= dist.world_size
            values += losses.tolist()
            norms += torch.stack(self.norms).tolist()
        return values, norms

    def reset(self) -> None:
        self.carried = ([], [])
        self.losses, self.norms, self.tokens = [], [], 0
        self.start = time.perf_counter()
        self.records += 1


class Aborted(KeyboardInterrupt):
    """A second SIGINT or SIGTERM: stop at once. `signum` gives the exit code (128 + N: 130 or 143)."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signum


class StopRequest:
    """First SIGINT/SIGTERM: finish the current step, save interrupted.pt, exit. Second: exit at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.aborted: int | None = None  # the second signal, if one came
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            self.aborted = signum
            raise Aborted(signum)
        self.signum = signum
        if is_quiet():  # under torchrun every process gets the signal; rank 0 speaks for all
            return
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
              f"(press Ctrl-C again to quit without saving)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


def open_metrics_log(run: Run, total_steps: int, output_dir: Path, resume_from: ckpt.Checkpoint | None,
                     tensorboard: bool) -> MetricsLog:
    run_record = {"kind": "run", "parameters": run.model.num_parameters(),
                  "flops_per_token": run.model.flops_per_token(), "vocab_size": run.data.tokenizer.vocab_size,
                  "steps_per_epoch": run.steps_per_epoch, "total_steps": total_steps,
                  "tokens_per_step": run.tokens_per_step, "device": str(run.device),
                  "world_size": run.dist.world_size, "config": run.config.to_dict()}
    resumed_at = run.progress.step if resume_from else None
    history_from = resume_from.path.parent if resume_from and resume_from.path else None
    return MetricsLog(output_dir, run_record, resume_step=resumed_at, history_from=history_from,
                      tensorboard=tensorboard)


def _tokenized(data: TokenData) -> str:
    if data.build_seconds < 0.5:  # nothing worth reporting for small inputs
        return ""
    rate = data.text_bytes / data.build_seconds / 1e6
    return f" (tokenized in {data.build_seconds:.1f}s, {rate:.0f} MB/s, into the token cache)"


def plan_text(run: Run, total_steps: int) -> str:
    """How many steps and why, with arithmetic that holds whatever ends the run."""
    cfg, per_epoch = run.cfg, run.steps_per_epoch
    if cfg.time_budget and not run.progress.planned_steps:
        return (f"time budget {duration(cfg.time_budget)} (steps fixed after the first {CALIBRATION_STEPS + 1}; "
                f"an epoch is {per_epoch:,} optimizer steps)")
    if total_steps == cfg.epochs * per_epoch:
        return f"{cfg.epochs} epoch(s) x {per_epoch:,} optimizer steps = {total_steps:,} steps"
    reason = ("its time budget" if run.progress.planned_steps else
              "max_steps" if total_steps == cfg.max_steps else "where the run stands")
    return f"{total_steps:,} steps ({reason}; an epoch is {per_epoch:,} optimizer steps)"


def print_header(run: Run, total_steps: int, output_dir: Path, resume_from: ckpt.Checkpoint | None,
                 config_origin: str) -> None:
    m, t, data, dist = run.config.model, run.cfg, run.data, run.dist
    files = ", ".join(f.name for f in data.files[:3]) + (f" (+{len(data.files) - 3} files)"
                                                         if len(data.files) > 3 else "")
    threads = f" ({torch.get_num_threads()} threads)" if run.device.type == "cpu" else ""
    info(f"Device: {run.device}{threads}, {PRECISION_NAMES[run.amp]}, torch.compile "
         f"{'on' if run.compiled else 'off'}" + (f", {dist.world_size} processes" if dist.enabled else "")
         + (machine_load_note() if run.device.type == "cpu" else ""))
    val_from = f" (validation: {', '.join(f.name for f in data.val_files[:3])})" if data.val_files else ""
    info(f"Data: {files}{val_from}: {data.num_chars:,} characters, {data.tokenizer.describe()}; "
         f"train {len(data.train):,} / validation {len(data.val):,} tokens"
         + (" (token cache)" if data.from_cache else _tokenized(data)))
    info(f"Model: {config_origin or 'config'}: {m.num_layers} layers, d_model {m.d_model}, {m.num_heads} heads, "
         f"d_ff {m.d_ff}, context {t.sequence_length}: {run.model.num_parameters():,} parameters")
    effective = t.batch_size * t.gradient_accumulation_steps * dist.world_size
    info(f"Training: {plan_text(run, total_steps)}; batch "
         f"{t.batch_size} x accumulation {t.gradient_accumulation_steps}"
         + (f" x {dist.world_size} processes" if dist.enabled else "")
         + f" = {effective} sequences ({run.tokens_per_step:,} tokens) per step; lr {t.learning_rate:g} "
         f"{t.scheduler}, warmup {t.warmup_steps}")
    if resume_from is not None:
        p = resume_from.progress
        info(f"Resuming from {resume_from.path} at step {p.step:,} (epoch {p.epochs_done + 1})")
    info(f"Output: {output_dir}/")
