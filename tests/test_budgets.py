"""Budgets as flags, warm-up that fits the run, CPU threads, and what the run says about itself while it trains:
speed, the loss from the first step, one ETA, samples after each evaluation."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY, TINY_SETS, freeze_when, run_cli, subprocess_env, train_tiny

from fundamentallm.checkpoint import read_checkpoint
from fundamentallm.metrics import read_metrics
from fundamentallm.plan import out_of_time


def test_max_steps_flag_and_true_header_arithmetic(corpus: Path, tmp_path: Path) -> None:
    result = train_tiny(corpus, tmp_path / "run", "--max-steps", "5")
    assert "Training: 5 steps (max_steps; an epoch is 141 optimizer steps)" in result.output
    assert read_checkpoint(tmp_path / "run" / "final_model.pt").progress.step == 5


def test_warmup_longer_than_the_run_is_clamped_with_a_notice(corpus: Path, tmp_path: Path) -> None:
    result = train_tiny(corpus, tmp_path / "run", "--max-steps", "8", "--set", "training.warmup_steps=100",
                        "--learning-rate", "3e-3")
    assert "warmup_steps 100 is more than a tenth of this run's 8 steps; warming up over 0 steps" in result.stderr
    first = next(r for r in read_metrics(tmp_path / "run") if r["kind"] == "train")
    assert first["lr"] == pytest.approx(3e-3)  # the peak rate from the first step, not a hundredth of it


def test_threads_flag_and_cpu_default_advice(corpus: Path, tmp_path: Path) -> None:
    default = train_tiny(corpus, tmp_path / "a", "--threads", "1", "--max-steps", "20")
    assert "cpu (1 threads)" in default.output
    assert "Speed:" in default.output and "per epoch" in default.output
    assert "Model: medium (default)" in default.output
    assert "no GPU here and no --config given: --config fast-cpu" in default.output
    chosen = train_tiny(corpus, tmp_path / "b", "--config", "small", "--max-steps", "20")
    assert "Speed:" in chosen.output and "--config fast-cpu" not in chosen.output


def test_bar_reports_loss_tokens_per_second_and_the_run_eta(corpus: Path, tmp_path: Path) -> None:
    result = train_tiny(corpus, tmp_path / "run", "--epochs", "1", "--set", "training.log_interval=50")
    # Without a terminal the bar leaves one line per epoch, with what the live bar showed last.
    line = [ln for ln in result.output.splitlines() if ln.startswith("Epoch 1/1")][-1]
    assert "train_loss=" in line and "tokens/s=" in line and "eta=" in line, line
    last = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"][-1]
    assert f"train_loss={last['train_loss']:.4f}" in line  # the bar's loss is the record's (and status's)


def test_samples_after_each_evaluation(corpus: Path, tmp_path: Path) -> None:
    result = train_tiny(corpus, tmp_path / "run", "--epochs", "2", "--set", "training.sample_tokens=40")
    evals = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"]
    assert len(evals) == 2 and all(isinstance(r["sample"], str) for r in evals)
    prompt = corpus.read_text(encoding="utf-8")[36_000:36_016]  # the validation text's first characters
    assert all(r["sample"].startswith(prompt) and len(r["sample"]) == 16 + 40 for r in evals)
    assert result.output.count("  sample: ") == 2
    quiet = train_tiny(corpus, tmp_path / "quiet", "--max-steps", "3", "--set", "training.sample_tokens=0")
    assert "sample:" not in quiet.output
    assert all("sample" not in r for r in read_metrics(tmp_path / "quiet"))


def test_time_budget_fixes_the_steps_and_a_resumed_run_keeps_them(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fundamentallm", "train", str(corpus), "-o", str(run), "--device", "cpu", *TINY,
           "--time-budget", "2h"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    freeze_when(proc, lambda: any(r.get("step", 0) >= 14 for r in _records(run)), "step 14")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "Time budget 2h00m00s:" in out and "steps in all" in out
    planned = read_checkpoint(run / "interrupted.pt").progress.planned_steps
    assert planned > 14
    stop_at = read_checkpoint(run / "interrupted.pt").progress.step + 3
    resumed = run_cli("train", "--resume", "auto", "-o", run, "--max-steps", str(stop_at))
    assert resumed.exit_code == 0, resumed.stderr
    assert "Time budget" not in resumed.output  # fixed once, recorded, kept
    final = read_checkpoint(run / "final_model.pt").progress
    assert (final.planned_steps, final.step) == (planned, stop_at)


def _records(run: Path) -> list[dict]:
    try:
        return read_metrics(run)
    except FileNotFoundError:
        return []


def test_time_budget_and_durations_are_validated(corpus: Path, tmp_path: Path) -> None:
    for bad in ("10x", "-5m", "0"):
        result = run_cli("train", corpus, "-o", tmp_path / "run", *TINY_SETS, "--time-budget", bad)
        assert result.exit_code == 2 and "training.time_budget" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_a_time_budget_rechecks_its_pace_and_ends_on_its_plan(corpus: Path, tmp_path: Path) -> None:
    result = train_tiny(corpus, tmp_path / "run", "--time-budget", "8s", "--epochs", "1000")
    assert "Time budget 8s:" in result.output
    # Re-fixed every 5% of the way, reported half-way and at three quarters, unless the machine slowed down so
    # much that the deadline came first.
    assert result.output.count("Time budget, pace at step") == 2 or "Time budget 8s reached" in result.output
    final = read_checkpoint(tmp_path / "run" / "final_model.pt").progress
    assert final.step == final.planned_steps  # the last re-check's plan is the one the run finished


def test_wsd_schedule_holds_the_peak_then_decays_in_a_straight_line(corpus: Path, tmp_path: Path) -> None:
    train_tiny(corpus, tmp_path / "run", "--max-steps", "40", "--learning-rate", "1e-2",
               "--set", "training.scheduler=wsd", "--set", "training.warmup_steps=4",
               "--set", "training.decay_fraction=0.25", "--set", "training.min_lr_ratio=0.1",
               "--set", "training.log_interval=1")
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert lrs[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])  # warm-up
    assert lrs[4:31] == pytest.approx([1e-2] * 27)  # stable until the last quarter of the 36 steps after it
    decay = lrs[31:]  # 9 steps down to a tenth of the peak, evenly
    assert decay == pytest.approx([1e-2 - 9e-3 * i / 9 for i in range(9)])


def test_a_short_budget_trains_the_presets_smaller_model_and_says_so(corpus: Path, tmp_path: Path) -> None:
    result = run_cli("train", corpus, "-o", tmp_path / "run", "--device", "cpu", "--config", "fast-cpu",
                     "--time-budget", "6s", "--set", "training.sample_tokens=0")
    assert result.exit_code == 0, result.stderr
    assert "Model: fast-cpu (a time budget of at most 120s: model.num_layers=2, model.d_model=96" in result.output
    checkpoint = read_checkpoint(tmp_path / "run" / "final_model.pt")
    model = checkpoint.config.model
    assert (model.num_layers, model.d_model, model.num_heads, model.d_ff) == (2, 96, 3, 256)
    assert checkpoint.tokenizer.kind == "bpe" and model.dropout == 0


def test_a_time_budget_counts_from_the_process_start() -> None:
    # The interpreter's start and the imports before main() are inside "from launch".
    code = "import time; time.sleep(0.5); from fundamentallm.cli import _process_age; print(_process_age())"
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               env=subprocess_env()).stdout)
    assert (0.5 if Path("/proc/self/stat").exists() else 0.0) <= age < 10  # where the system tells (Linux)


def test_the_deadline_leaves_room_for_one_more_step_and_a_last_evaluation_slowed_since_the_last_check() -> None:
    # A 100 s budget, 1.5 s kept for the final checkpoint, plot and exit; at the last re-check a step took 0.5 s
    # and the last evaluation was costed at 8 steps (4 s).
    assert not out_of_time(90.0, 100.0, recent=0.5, final_eval=4.0, eval_steps=8)  # 90 + 0.5 + 4 + 1.5 < 100
    assert out_of_time(94.1, 100.0, recent=0.5, final_eval=4.0, eval_steps=8)  # the next step would not fit
    # The machine slowed twofold since: steps take 1 s and so will the evaluation's 8 steps' worth. Costed at the
    # last check's pace (92.5 + 4 + 1.5 < 100) the run would go on and end past its budget.
    assert out_of_time(92.5, 100.0, recent=1.0, final_eval=4.0, eval_steps=8)
    # Faster since: the evaluation is still costed at the last check's pace, the slower of the two.
    assert out_of_time(94.3, 100.0, recent=0.25, final_eval=4.0, eval_steps=8)  # 94.3 + 0.25 + 4 + 1.5 > 100
