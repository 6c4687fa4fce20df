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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fundamentallm import checkpoint as ckpt
from fundamentallm import distributed
from fundamentallm.config import Config, save_config
from fundamentallm.console import Progress, duration, info, is_quiet, set_quiet
from fundamentallm.data import TokenData
from fundamentallm.device import PRECISION_NAMES, is_out_of_memory, memory_stats, oom_message, select_device
from fundamentallm.errors import TrainingFailed, UserError
from fundamentallm.evaluate import estimate_loss
from fundamentallm.metrics import MetricsLog, bits_per_char, perplexity
from fundamentallm.optim import lr_at, optimizer_step, set_lr
from fundamentallm.run import Run, setup_run
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


def train(config: Config, data_paths: list[str], output_dir: Path, *, device: str = "auto",
          resume_from: ckpt.Checkpoint | None = None, overwrite: bool = False, tensorboard: bool = False,
          config_origin: str = "", val_paths: list[str] | None = None) -> TrainResult:
    """Train a model on DATA as `config` says (validating on `val_paths` when given, else on the end of DATA),
    writing checkpoints and metrics into `output_dir`."""
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
                          config_origin, val_paths)
    finally:
        distributed.shutdown(dist)


def _train(config: Config, data_paths: list[str], output_dir: Path, dev: torch.device, dist: distributed.Dist,
           resume_from: ckpt.Checkpoint | None, earlier_run: list[str], tensorboard: bool,
           config_origin: str, val_paths: list[str] | None) -> TrainResult:
    """Set up, check what is left to do, write config.yaml, then run the loop."""
    run = setup_run(config, data_paths, dev, dist, resume=resume_from, val_paths=val_paths)
    total_steps = plan_steps(run, resumed=resume_from is not None, output_dir=output_dir)
    with distributed.collectively(dist):
        if dist.is_main:
            start_output_dir(output_dir, earlier_run, resume=resume_from is not None)
            save_config(config, output_dir / CONFIG)
    print_header(run, total_steps, output_dir, resume_from, config_origin)
    log = open_metrics_log(run, total_steps, output_dir, resume_from, tensorboard) if dist.is_main else None
    interrupted_by = _guarded_loop(run, total_steps, output_dir, log)
    return TrainResult(interrupted_by, wrote_files=dist.is_main)


def plan_steps(run: Run, resumed: bool, output_dir: Path) -> int:
    """The run's total number of optimizer steps; refuses to resume a run that has nothing left to do."""
    cfg, state = run.cfg, run.progress
    # Counted from where the run stands, not as epochs x steps_per_epoch: a resumed run may take other steps
    # per epoch than the run that wrote the checkpoint (another batch size or number of processes), and a
    # max_steps run ends its last epoch early.
    state.step_in_epoch = min(state.step_in_epoch, run.steps_per_epoch)
    planned = state.step + (cfg.epochs - state.epochs_done) * run.steps_per_epoch - state.step_in_epoch
    total_steps = planned if cfg.max_steps is None else min(cfg.max_steps, planned)
    patience = cfg.early_stopping_patience
    if resumed and patience and state.evals_without_improvement >= patience:
        raise UserError(f"the run in {output_dir} stopped early at step {state.step:,}: validation loss had not "
                        f"improved for {state.evals_without_improvement} evaluation(s). To train on anyway, resume "
                        f"with a larger --set training.early_stopping_patience (or 0 to switch it off)")
    if state.step >= total_steps:
        limit = (f"training.max_steps={cfg.max_steps}; to train further, resume with a larger "
                 f"--set training.max_steps (or =null)" if total_steps == cfg.max_steps
                 else f"{cfg.epochs} epochs; to train further, resume with a larger --epochs")
        raise UserError(f"the run in {output_dir} already finished its {total_steps:,} steps ({limit})")
    return total_steps


def _guarded_loop(run: Run, total_steps: int, output_dir: Path, log: MetricsLog | None) -> int | None:
    """The loop under the signal handler, with out-of-memory turned into its remedies and the log's end record
    written however the loop ends."""
    stop = StopRequest()
    interrupted_by = None
    try:
        with stop.installed():
            interrupted_by = train_loop(run, total_steps, output_dir, log, stop)
    except Exception as exc:
        if stop.aborted and isinstance(exc, RuntimeError):  # a second Ctrl-C inside torch.save
            raise KeyboardInterrupt from None
        if is_out_of_memory(exc):
            raise TrainingFailed(oom_message(run.cfg, run.device)) from None
        raise
    finally:
        if log is not None:
            log.end(run.progress.step, run.elapsed(), interrupted_by is not None, sys.exc_info()[1])
            log.close()
    return interrupted_by


def train_loop(run: Run, total_steps: int, output_dir: Path, log: MetricsLog | None,
               stop: StopRequest) -> int | None:
    """Train until `total_steps`, early stopping or a stop request; returns the signal that stopped it, if any."""
    cfg, state = run.cfg, run.progress
    run.started_at = time.perf_counter() - state.elapsed_seconds
    window = LogWindow(state.pending_losses, state.pending_norms)
    state.pending_losses, state.pending_norms = [], []
    stopped_early = False
    run.step_model.train()
    while state.step < total_steps and not stopped_early:
        epoch = state.epochs_done + 1
        epoch_steps = min(run.steps_per_epoch, state.step_in_epoch + total_steps - state.step)
        bar = Progress(epoch_steps, f"Epoch {epoch}/{cfg.epochs}", unit="it", initial=state.step_in_epoch)
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

            last_in_epoch = state.step_in_epoch == epoch_steps
            eval_due = bool(cfg.eval_interval) and state.step % cfg.eval_interval == 0 and not last_in_epoch
            if state.step % cfg.log_interval == 0 or last_in_epoch or eval_due:
                log_train(run, window, log, epoch, lr, bar, output_dir)
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
              output_dir: Path) -> None:
    """Read the window's losses (one host-device sync), check them, show them and write a train record."""
    state = run.progress
    values, norms = window.read(run.dist)
    check_finite(values, state.step - len(values) + 1, output_dir)
    now = time.perf_counter()
    tokens_per_sec = window.tokens / max(now - window.start, 1e-9)
    state.epoch_loss_sum += sum(values)
    state.epoch_loss_steps += len(values)
    state.train_loss = values[-1]
    bar.set_postfix(loss=f"{values[-1]:.4f}", lr=f"{lr:.2e}")
    if log is not None:
        log.write({"kind": "train", "step": state.step, "epoch": epoch, "train_loss": sum(values) / len(values),
                   "lr": lr, "grad_norm": sum(norms) / len(norms), "tokens_per_sec": tokens_per_sec,
                   "elapsed": now - run.started_at, **memory_stats(run.device)})
    window.reset()


def evaluate(run: Run, log: MetricsLog | None, output_dir: Path) -> bool:
    """Validation loss, logged; keeps best_model.pt. Returns True when early stopping says to stop."""
    cfg, state = run.cfg, run.progress
    val_loss = estimate_loss(run.model, run.val_tokens, cfg.batch_size, run.device, run.amp,
                             cfg.eval_batches * cfg.batch_size, run.dist)
    state.val_loss = val_loss
    improved = val_loss < state.best_val_loss
    if improved:
        state.best_val_loss, state.evals_without_improvement = val_loss, 0
    else:
        state.evals_without_improvement += 1
    if log is not None:
        log.write({"kind": "eval", "step": state.step, "epoch": state.epochs_done + 1,
                   "train_loss": state.train_loss, "val_loss": val_loss, "perplexity": perplexity(val_loss),
                   "bits_per_char": val_bits_per_char(run, val_loss), "elapsed": run.elapsed()})
    if improved and cfg.save_best:
        save_checkpoint(run, output_dir / BEST, resumable=False)
    patience = cfg.early_stopping_patience
    return bool(patience) and state.evals_without_improvement >= patience


def end_epoch(run: Run, log: MetricsLog | None, output_dir: Path, stopped_early: bool) -> bool:
    """Evaluate (unless early stopping just did), report, and save the epoch's checkpoint. An epoch that
    max_steps or early stopping cut short stays open: a resumed run finishes it. Returns stopped_early."""
    cfg, state = run.cfg, run.progress
    epoch = state.epochs_done + 1
    state.train_loss = state.epoch_loss_sum / max(1, state.epoch_loss_steps)
    if not stopped_early:
        stopped_early = evaluate(run, log, output_dir)
    epoch_complete = state.step_in_epoch == run.steps_per_epoch
    if epoch_complete:
        state.epochs_done += 1
        state.step_in_epoch, state.epoch_loss_sum, state.epoch_loss_steps = 0, 0.0, 0
    state.elapsed_seconds = run.elapsed()
    info(f"  train_loss={state.train_loss:.4f}, val_loss={state.val_loss:.4f}, "
         f"perplexity={perplexity(state.val_loss):.2f}, bpc={val_bits_per_char(run, state.val_loss):.3f}"
         + ("  (best)" if state.evals_without_improvement == 0 else ""))  # a new low, not a tie
    if epoch_complete and state.epochs_done % cfg.save_every_n_epochs == 0:
        save_checkpoint(run, output_dir / periodic_name(epoch))
        if run.dist.is_main:
            prune_periodic(output_dir, cfg.keep_last_n)
    if stopped_early:
        info(f"Early stopping: validation loss has not improved for {cfg.early_stopping_patience} "
             f"evaluation(s); best {state.best_val_loss:.4f}")
    distributed.barrier(run.dist)
    return stopped_early


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


class StopRequest:
    """First SIGINT/SIGTERM: finish the current step, save interrupted.pt, exit. Second: exit at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.aborted = False  # a second signal came
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            self.aborted = True
            raise KeyboardInterrupt
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


def print_header(run: Run, total_steps: int, output_dir: Path, resume_from: ckpt.Checkpoint | None,
                 config_origin: str) -> None:
    m, t, data, dist = run.config.model, run.cfg, run.data, run.dist
    files = ", ".join(f.name for f in data.files[:3]) + (f" (+{len(data.files) - 3} files)"
                                                         if len(data.files) > 3 else "")
    threads = f" ({torch.get_num_threads()} threads)" if run.device.type == "cpu" else ""
    info(f"Device: {run.device}{threads}, {PRECISION_NAMES[run.amp]}, torch.compile "
         f"{'on' if run.compiled else 'off'}" + (f", {dist.world_size} processes" if dist.enabled else ""))
    val_from = f" (validation: {', '.join(f.name for f in data.val_files[:3])})" if data.val_files else ""
    info(f"Data: {files}{val_from}: {data.num_chars:,} characters, {data.tokenizer.describe()}; "
         f"train {len(data.train):,} / validation {len(data.val):,} tokens"
         + (" (token cache)" if data.from_cache else _tokenized(data)))
    info(f"Model: {config_origin or 'config'}: {m.num_layers} layers, d_model {m.d_model}, {m.num_heads} heads, "
         f"d_ff {m.d_ff}, context {t.sequence_length}: {run.model.num_parameters():,} parameters")
    effective = t.batch_size * t.gradient_accumulation_steps * dist.world_size
    info(f"Training: {t.epochs} epoch(s) x {run.steps_per_epoch:,} optimizer steps = {total_steps:,} steps; batch "
         f"{t.batch_size} x accumulation {t.gradient_accumulation_steps}"
         + (f" x {dist.world_size} processes" if dist.enabled else "")
         + f" = {effective} sequences ({run.tokens_per_step:,} tokens) per step; lr {t.learning_rate:g} "
         f"{t.scheduler}, warmup {t.warmup_steps}")
    if resume_from is not None:
        p = resume_from.progress
        info(f"Resuming from {resume_from.path} at step {p.step:,} (epoch {p.epochs_done + 1})")
    info(f"Output: {output_dir}/")
