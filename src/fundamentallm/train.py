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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fundamentallm import checkpoint as ckpt
from fundamentallm import distributed
from fundamentallm.config import Config, origin_text, resolve_config, save_config
from fundamentallm.console import Progress, duration, info, is_quiet, set_quiet
from fundamentallm.data import TokenData
from fundamentallm.device import (
    PRECISION_NAMES,
    is_out_of_memory,
    machine_load_note,
    memory_stats,
    oom_message,
    select_device,
    threads_text,
)
from fundamentallm.errors import TrainingFailed, UserError
from fundamentallm.evaluate import estimate_loss
from fundamentallm.generate import TextStream, generate_tokens
from fundamentallm.metrics import MetricsLog, bits_per_char, eta_seconds, perplexity
from fundamentallm.optim import lr_at, optimizer_step, set_lr, warmup_for
from fundamentallm.plan import Planner, epochs_of, plan_steps, plan_text
from fundamentallm.resume import check_resume_in_place, resolve_resume, training_state
from fundamentallm.run import FineTune, Run, init_base, setup_run
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


@dataclass
class TrainJob:
    """One run to train: the resolved config, the text, where it goes, and how it starts.

    `resume_from` continues a checkpoint's run; `init` starts a new run from a trained model's weights (train
    --init-from); `on_eval(step, val_loss)`, when given, is called after each evaluation (a search uses it to
    prune hopeless runs): when it returns True the run ends there as early stopping would end it, recorded as
    pruned. `val_paths` validate on other files instead of the end of the data."""

    config: Config
    data_paths: list[str]
    output_dir: Path
    device: str = "auto"
    resume_from: ckpt.Checkpoint | None = None
    overwrite: bool = False
    tensorboard: bool = False
    config_origin: str = ""  # how the header names the config: a preset, a file, a checkpoint
    on_eval: Callable[[int, float], bool] | None = None
    val_paths: list[str] = field(default_factory=list)
    init: FineTune | None = None
    launched: float | None = None  # perf_counter() at the command's start: the run's clock starts there


def train_job(data: list[str], config_name: str | None, overrides: list[tuple[str, Any, str]], output_dir: Path,
              *, device: str, resume: str | None, overwrite: bool, init_from: str | None, extend_vocab: bool,
              val_data: list[str], tensorboard: bool) -> TrainJob:
    """`fundamentallm train`'s flags as a job: the run to continue (--resume) or start from (--init-from), the
    data and validation files a resumed run had, and the config resolved over the right base."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; use one")
    if init_from and resume:
        raise UserError("--init-from starts a new run and --resume continues one; use one")
    if extend_vocab and not init_from:
        raise UserError("--extend-vocab grows the vocabulary of the model given with --init-from; give that too")
    resume_from = resolve_resume(resume, output_dir, data)
    if not data:
        if resume_from is None:
            raise UserError("missing DATA: give a text file, several files, or a directory of .txt files")
        data = list(resume_from.data.files)
    if not val_data and resume_from is not None:  # a resumed run validates on what it validated on before
        val_data = list(resume_from.data.val_files)
    init_checkpoint = ckpt.read_checkpoint(init_from) if init_from else None
    base = (resume_from.config.to_dict(), f"checkpoint {resume_from.path}") if resume_from else \
        init_base(init_checkpoint) if init_checkpoint else None
    notes: list[str] = []
    config = resolve_config(config_name, overrides, base=base, notes=notes)
    init = FineTune(init_checkpoint, config, data, extend_vocab) if init_checkpoint else None
    origin = config_name or (base[1] if base else "medium (default)")
    return TrainJob(config, data, Path(output_dir), device=device, resume_from=resume_from, overwrite=overwrite,
                    tensorboard=tensorboard, config_origin=origin_text(origin, notes),
                    val_paths=val_data, init=init)


def train(job: TrainJob) -> TrainResult:
    """Train the job's model on its data as its config says, writing checkpoints and metrics into its
    output directory."""
    output_dir = job.output_dir
    dist, dev = distributed.init(select_device(job.device))  # under torchrun: this process's GPU, cuda:LOCAL_RANK
    set_quiet(not dist.is_main)
    try:
        with contextlib.ExitStack() as held:
            with distributed.collectively(dist):
                earlier_run = []
                if dist.is_main:  # the process that writes holds the directory: one live run per directory
                    held.enter_context(hold(output_dir))
                    resume_path = job.resume_from.path if job.resume_from else None
                    earlier_run = check_output_dir(output_dir, resume_path, job.overwrite)
                    if job.resume_from is not None:
                        check_resume_in_place(job.resume_from, output_dir)
            return _train(job, dev, dist, earlier_run)
    finally:
        distributed.shutdown(dist)


def _train(job: TrainJob, dev: torch.device, dist: distributed.Dist, earlier_run: list[str]) -> TrainResult:
    """Set up, check what is left to do, write config.yaml, then run the loop."""
    output_dir, resume_from = job.output_dir, job.resume_from
    run = setup_run(job.config, job.data_paths, dev, dist, resume=resume_from, val_paths=job.val_paths,
                    init=job.init)
    run.on_eval = job.on_eval
    total_steps = plan_steps(run, resumed=resume_from is not None, output_dir=output_dir)
    with distributed.collectively(dist):
        if dist.is_main:
            start_output_dir(output_dir, earlier_run, resume=resume_from is not None)
            save_config(job.config, output_dir / CONFIG)
    print_header(run, total_steps, output_dir, resume_from, job.config_origin)
    # The run's clock (its elapsed time, its time budget) counts this session from the command's start when
    # known, so that start-up is inside the budget; a sweep's runs count from their own start.
    run.started_at = (job.launched or time.perf_counter()) - run.progress.elapsed_seconds
    log = open_metrics_log(run, total_steps, output_dir, resume_from, job.tensorboard) if dist.is_main else None
    interrupted_by = _guarded_loop(run, total_steps, output_dir, log, job.config_origin)
    return TrainResult(interrupted_by, wrote_files=dist.is_main, pruned=run.pruned)


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
    window = LogWindow(state.pending_losses, state.pending_norms)
    state.pending_losses, state.pending_norms = [], []
    planner = Planner(run, total_steps, config_origin)
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
            planned, total_steps = total_steps, planner.after_step(loss)  # a time budget re-plans as it goes
            if total_steps != planned:
                epoch_steps = min(run.steps_per_epoch, state.step_in_epoch + total_steps - state.step)
                bar.set_total(epoch_steps, f"Epoch {epoch}/{epochs_of(run, total_steps)}")

            last_in_epoch = state.step_in_epoch == epoch_steps
            eval_due = bool(cfg.eval_interval) and state.step % cfg.eval_interval == 0 and not last_in_epoch
            if state.step % cfg.log_interval == 0 or last_in_epoch or eval_due:
                log_train(run, window, log, epoch, lr, bar, output_dir, total_steps)
            elif not window.records:  # before this session's first record, show every step's loss
                bar.set_postfix(train_loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            if eval_due:
                stopped_early = evaluate(run, log, output_dir, mid_epoch=True)
                window.start = time.perf_counter()  # tokens/s measures training, not evaluation
                planner.restart_clock()
                if stopped_early:
                    break
            if distributed.any_rank(run.dist, stop.signum is not None):
                bar.close(final_line=False)
                save_interrupted(run, window, output_dir)
                return stop.signum

        bar.close()  # the end of an epoch, or of training when max_steps or early stopping ends it mid-epoch
        stopped_early = end_epoch(run, log, output_dir, stopped_early)
        window.start = time.perf_counter()
        planner.restart_clock()

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
        log.write({"kind": "train", "step": state.step, "epoch": epoch, "total_steps": total_steps,
                   "train_loss": state.train_loss, "lr": lr, "grad_norm": sum(norms) / len(norms),
                   "tokens_per_sec": tokens_per_sec,
                   "elapsed": now - run.started_at, **memory_stats(run.device)})
    window.reset()


def evaluate(run: Run, log: MetricsLog | None, output_dir: Path, mid_epoch: bool = False) -> bool:
    """Validation loss, logged, with a short sample; keeps best_model.pt. Returns True when early stopping (or
    on_eval) says to stop. In the middle of an epoch the loss is printed here (end_epoch prints the epoch's)."""
    cfg, state = run.cfg, run.progress
    # A long validation text (--val-data, eval_batches 0) shows its own progress.
    val_loss = estimate_loss(run.model, run.val_tokens, run.eval_batch_size, run.device, run.amp,
                             cfg.eval_batches * cfg.batch_size, run.dist, progress=True)
    state.val_loss = val_loss
    improved = val_loss < state.best_val_loss
    if improved:
        state.best_val_loss, state.evals_without_improvement = val_loss, 0
    else:
        state.evals_without_improvement += 1
    if mid_epoch:
        info(f"  step {state.step:,}: val_loss={val_loss:.4f}, perplexity={perplexity(val_loss):.2f}, "
             f"bpc={val_bits_per_char(run, val_loss):.3f}" + ("  (best)" if improved else ""))
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
    stream = TextStream(run.data.tokenizer)  # one text for prompt and continuation: a character may span both
    text = "".join(stream.add(token) for token in prompt + ids) + stream.finish()
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


def val_bits_per_char(run: Run, val_loss: float) -> float:
    """Bits per character of the validation text, from a loss per token measured on it (or on part of it)."""
    return bits_per_char(val_loss, len(run.data.val), run.data.val_chars)


def save_checkpoint(run: Run, path: Path, resumable: bool = True) -> None:
    """Called on every rank at the same points (resumable ones gather every rank's RNG state); rank 0 writes."""
    state = training_state(run.optimizer, run.scaler, run.sampler, run.device, run.dist) \
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


def print_header(run: Run, total_steps: int, output_dir: Path, resume_from: ckpt.Checkpoint | None,
                 config_origin: str) -> None:
    m, t, data, dist = run.config.model, run.cfg, run.data, run.dist
    files = ", ".join(f.name for f in data.files[:3]) + (f" (+{len(data.files) - 3} files)"
                                                         if len(data.files) > 3 else "")
    threads = f" ({threads_text()})" if run.device.type == "cpu" else ""
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
    # The warm-up the schedule will use (plan_steps warned when it is shorter than asked); a time budget's is
    # reported once its steps are fixed.
    warmup = t.warmup_steps if t.time_budget and not run.progress.planned_steps else warmup_for(t, total_steps)
    info(f"Training: {plan_text(run, total_steps)}; batch "
         f"{t.batch_size} x accumulation {t.gradient_accumulation_steps}"
         + (f" x {dist.world_size} processes" if dist.enabled else "")
         + f" = {effective} sequences ({run.tokens_per_step:,} tokens) per step; lr {t.learning_rate:g} "
         f"{t.scheduler}, warmup {warmup}")
    if resume_from is not None:
        p = resume_from.progress
        info(f"Resuming from {resume_from.path} at step {p.step:,} (epoch {p.epochs_done + 1})")
    info(f"Output: {output_dir}/")
