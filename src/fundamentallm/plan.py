"""How many steps a run takes: its epochs, max_steps, or what its time budget buys.

A time budget becomes a number of steps once the first steps have been timed (`CALIBRATION_STEPS`), so the
learning-rate schedule knows where it ends. The plan is recorded in the checkpoint's progress (`planned_steps`),
so a resumed run follows it. The pace then changes (caches, clocks, evaluations, and above all other programs
starting or stopping on the same machine), so the plan is re-fixed from the recent pace every `PACE_EVERY` of
the way, and a run that reaches its deadline ends there whatever the plan said. Every decision depends on step
counts only, and every rank takes the smallest plan, so torchrun ranks always agree.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fundamentallm import distributed
from fundamentallm.console import duration, info, warn
from fundamentallm.data import eval_windows
from fundamentallm.errors import UserError
from fundamentallm.evaluate import estimate_loss
from fundamentallm.optim import warmup_for

if TYPE_CHECKING:  # types only: this module is below run.py
    from fundamentallm.run import Run

CALIBRATION_STEPS = 10  # steps timed at the start of each session (after one warm-up step)
PROBE_BATCHES = 2  # evaluation batches timed after the calibration, to know what the last evaluation will cost
# What follows the last evaluation and counts in a time budget: the final checkpoint, the command's training.png
# and the interpreter's exit (1.3 s on 2 CPU cores: the plot 1.0 s, most of it matplotlib's import, the exit 0.2 s).
FINISH_SECONDS = 1.5
PACE_EVERY = 0.05  # under a time budget, the plan is re-fixed every 5% of the planned steps (at least every 10)
PACE_SHOWN = (0.5, 0.75)  # the re-checks that are reported
RECENT_WEIGHT = 0.2  # how much each step's own time moves the recent pace that the deadline check uses


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


class Planner:
    """The run's total steps as they stand after each step. `after_step` is the loop's one call: it times this
    session's first steps (the very first pays for compilation and warm-up), reports the speed, fixes a time
    budget's steps, then keeps the plan on the budget while the pace changes."""

    def __init__(self, run: Run, total_steps: int, config_origin: str) -> None:
        self.run, self.total_steps, self.config_origin = run, total_steps, config_origin
        self.first_step = run.progress.step
        self.timer = 0.0
        self.last_check: tuple[int, float] | None = None  # step and run time of the last pace measurement
        self.final_eval = 0.0  # seconds the last evaluation will take, at the latest pace
        self.eval_steps = 0.0  # what an evaluation costs, in training steps (measured once per session)
        self.shown = list(PACE_SHOWN)
        self.step_clock = 0.0  # when the last step ended (restarted after an evaluation)
        self.recent = 0.0  # seconds per step over the last few steps, evaluations left out

    def restart_clock(self) -> None:
        """An evaluation just ended: the next step's time is counted from now."""
        self.step_clock = time.perf_counter()

    def after_step(self, loss: torch.Tensor) -> int:
        step = self.run.progress.step
        now = time.perf_counter()
        if self.recent:
            self.recent += RECENT_WEIGHT * (now - self.step_clock - self.recent)
        self.step_clock = now
        if step == self.first_step + 1:
            loss.item()  # wait for the device, so the clock measures the steps, not their queueing
            self.timer = time.perf_counter()
        elif step == self.first_step + 1 + CALIBRATION_STEPS:
            loss.item()
            seconds_per_step = (time.perf_counter() - self.timer) / CALIBRATION_STEPS
            if self.run.cfg.time_budget:  # only a budget needs to know
                self.eval_steps = _time_evaluation(self.run) / seconds_per_step
            self.last_check = (step, self.run.elapsed())  # the next pace is the steps' alone
            self.final_eval = self.eval_steps * seconds_per_step
            self.recent = seconds_per_step
            self.step_clock = time.perf_counter()
            self._settle(seconds_per_step)
        elif self.run.cfg.time_budget and self.last_check is not None:
            self._keep_to_budget(step)
        return self.total_steps

    def _settle(self, seconds_per_step: float) -> None:
        """Report the measured speed; with a time budget not yet fixed, fix the number of steps so that the whole
        schedule (evaluations included) fits in what is left of it."""
        run, cfg, state = self.run, self.run.cfg, self.run.progress
        if cfg.time_budget and not state.planned_steps:
            evals_per_step = 1 / run.steps_per_epoch + (1 / cfg.eval_interval if cfg.eval_interval else 0)
            left = cfg.time_budget - run.elapsed() - self.final_eval - FINISH_SECONDS  # the last evaluation, and after
            self.total_steps = _fix_steps(run, left / (seconds_per_step + self.final_eval * evals_per_step))
            info(f"Time budget {duration(cfg.time_budget)}: {seconds_per_step:.3g} s per step, so "
                 f"{self.total_steps:,} steps in all (an epoch is {run.steps_per_epoch:,}); warmup "
                 f"{warmup_for(cfg, self.total_steps)} steps")
        note = ""
        if run.device.type == "cpu" and self.config_origin.endswith("(default)"):
            note = ("; no GPU here and no --config given: --config fast-cpu trains a good model on a "
                    "CPU in minutes")
        per_epoch = seconds_per_step * run.steps_per_epoch
        info(f"Speed: {run.tokens_per_step / seconds_per_step:,.0f} tokens/s, about {duration(per_epoch)} per "
             f"epoch and {duration(seconds_per_step * (self.total_steps - state.step) + run.elapsed())} for the "
             f"run's steps (evaluations come on top){note}")

    def _keep_to_budget(self, step: int) -> None:
        """At its deadline the run ends now; every PACE_EVERY of the way, re-fix the steps from the pace since the
        last check, evaluations included (they recur at the same rate). A cosine schedule stretches or shrinks a
        little from here; wsd's stable phase absorbs it."""
        run, (checked_step, checked_at) = self.run, self.last_check
        if distributed.any_rank(run.dist, out_of_time(run.elapsed(), run.cfg.time_budget, self.recent,
                                                      self.final_eval, self.eval_steps)):
            if self.total_steps > step:
                info(f"Time budget {duration(run.cfg.time_budget)} reached at step {step:,} (planned: "
                     f"{self.total_steps:,}): the machine slowed down; ending the run here")
                self.total_steps = _fix_steps(run, 0, at_least=0)
            return
        interval = max(CALIBRATION_STEPS, int(PACE_EVERY * (self.total_steps - self.first_step)))
        if step - checked_step < interval:
            return
        seconds_per_step = (run.elapsed() - checked_at) / (step - checked_step)
        self.last_check = (step, run.elapsed())
        self.final_eval = self.eval_steps * seconds_per_step  # evaluations slow down with the steps
        left = run.cfg.time_budget - run.elapsed() - self.final_eval - FINISH_SECONDS
        planned = _fix_steps(run, left / seconds_per_step)
        if self.shown and step - self.first_step >= self.shown[0] * (self.total_steps - self.first_step):
            self.shown.pop(0)  # the other re-checks stay silent: on a busy machine every one moves the plan
            info(f"Time budget, pace at step {step:,}: {seconds_per_step:.3g} s per step (evaluations included), "
                 f"so {planned:,} steps in all (planned: {self.total_steps:,})")
        self.total_steps = planned


def out_of_time(elapsed: float, budget: float, recent: float, final_eval: float, eval_steps: float) -> bool:
    """Whether one more step would leave too little of the budget for the last evaluation and what follows it.
    The evaluation's cost is the larger of two estimates: from the pace at the last re-check, and from the last
    few steps (a machine that slowed down since then evaluates slower too)."""
    last_evaluation = max(final_eval, eval_steps * recent)
    return elapsed + recent + last_evaluation + FINISH_SECONDS >= budget


def _time_evaluation(run: Run) -> float:
    """Seconds a whole evaluation takes now, from PROBE_BATCHES of its batches timed (the first of them pays
    for warm-up, so this errs long). Measured rather than derived from the step time: forward-only passes in
    inference mode run several times faster per token than training steps, by a factor that varies by device."""
    cfg = run.cfg
    windows = len(eval_windows(len(run.val_tokens), cfg.sequence_length, cfg.eval_batches * cfg.batch_size))
    probe = min(windows, PROBE_BATCHES * run.eval_batch_size)
    start = time.perf_counter()
    estimate_loss(run.model, run.val_tokens, run.eval_batch_size, run.device, run.amp, probe, run.dist)
    return (time.perf_counter() - start) * windows / probe


def _fix_steps(run: Run, steps_left: float, at_least: int = 1) -> int:
    """Record the run's total steps: at least `at_least` more than done, at most max_steps, the same on every
    rank."""
    state, max_steps = run.progress, run.cfg.max_steps
    steps = state.step + max(at_least, int(steps_left))
    state.planned_steps = distributed.smallest_on_all_ranks(run.dist, min(steps, max_steps or steps))
    return state.planned_steps


def epochs_of(run: Run, total_steps: int) -> int:
    """How many epochs (the last maybe partial) `total_steps` covers: what the bar counts to."""
    return max(run.progress.epochs_done + 1, -(-total_steps // run.steps_per_epoch))


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
