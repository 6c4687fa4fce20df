"""Never lose work: exact resume, interruption by signals, crash-safe saves."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HANG_GUARD, TINY, assert_clean_error, freeze_when, run_cli, snapshot, subprocess_env, train_tiny

from fundamentallm.checkpoint import read_checkpoint
from fundamentallm.metrics import read_metrics

# Dropout on, so that resuming must also restore the RNG that drives it.
WITH_DROPOUT = ["--set", "model.dropout=0.1"]


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(run) if r["kind"] == "train"}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_from_epoch_checkpoint_matches_uninterrupted_run(corpus: Path, tmp_path: Path, optimizer: str) -> None:
    if optimizer == "muon" and not hasattr(torch.optim, "Muon"):  # PyTorch before 2.9: refused in one clear line
        assert_clean_error(run_cli("train", corpus, "-o", tmp_path / "muon", *TINY, "--set", "training.optimizer=muon"),
                           "needs PyTorch 2.9")
        return
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    options = ["--epochs", "2", *WITH_DROPOUT, "--set", f"training.optimizer={optimizer}"]
    train_tiny(corpus, straight, *options)
    result = train_tiny(corpus, resumed, *options, "--resume", straight / "checkpoint_epoch_1.pt")
    assert "Resuming from" in result.output and "Epoch 1/2" not in result.output
    a, b = step_losses(straight), step_losses(resumed)
    # The branch's log: the source run's records up to the checkpoint, then the second epoch trained here,
    # bit-identical step by step to the uninterrupted run.
    assert len(b) == 282 and a == b
    assert_same_weights(straight / "final_model.pt", resumed / "final_model.pt")


def _start_training(corpus: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fundamentallm", "train", str(corpus), "-o", str(out), "--device", "cpu", *TINY,
           *WITH_DROPOUT, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(**(env or {})))


def _reached_step(run: Path, step: int) -> bool:
    try:
        return max(step_losses(run), default=0) >= step
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_interrupted_checkpoint_and_resume_is_exact(corpus: Path, tmp_path: Path, sig: int) -> None:
    run, straight = tmp_path / "run", tmp_path / "straight"
    # A log interval of 7: the signal lands inside a log window, whose losses the checkpoint must carry.
    steps = ["--epochs", "20", "--set", "training.max_steps=120", "--set", "training.log_interval=7"]
    proc = _start_training(corpus, run, *steps)
    freeze_when(proc, lambda: _reached_step(run, 30), "step 30")
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr
    assert "Resume with: fundamentallm train --resume auto -o" in stdout
    stopped_at = read_checkpoint(run / "interrupted.pt").progress.step
    assert 30 <= stopped_at < 120

    resumed = run_cli("train", "--resume", "auto", "-o", run, "--device", "cpu")
    assert resumed.exit_code == 0, resumed.stderr
    assert f"at step {stopped_at:,}" in resumed.output
    assert not (run / "interrupted.pt").exists()  # the finished run no longer needs it
    train_tiny(corpus, straight, *WITH_DROPOUT, *steps)
    assert step_losses(run) == step_losses(straight)
    assert_same_weights(run / "final_model.pt", straight / "final_model.pt")


def test_second_ctrl_c_exits_at_once(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # Slow checkpoint writes (a pause after every 64 KiB) keep the process saving when the second Ctrl-C comes.
    proc = _start_training(corpus, run, "--epochs", "20", env={"FUNDAMENTALLM_TEST_SLOW_WRITE": "0.5"})
    freeze_when(proc, lambda: _reached_step(run, 10), "step 10")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    freeze_when(proc, lambda: list(run.glob(".fundamentallm-tmp-interrupted.pt*")), "the save of interrupted.pt")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 130
    assert "Traceback" not in stderr and "Aborted" in stderr
    assert not (run / "interrupted.pt").exists() and not list(run.glob(".fundamentallm-tmp-*"))


def test_sigkill_during_save_leaves_earlier_checkpoints_loadable(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # Slow writes: each checkpoint takes about a second, long enough for the polling below to see it under way.
    proc = _start_training(corpus, run, "--epochs", "5", "--set", "training.keep_last_n=0",
                           env={"FUNDAMENTALLM_TEST_SLOW_WRITE": "0.5"})
    freeze_when(proc, lambda: (run / "checkpoint_epoch_2.pt").exists() and list(run.glob(".fundamentallm-tmp-*")),
                "a save after checkpoint_epoch_2.pt")
    proc.send_signal(signal.SIGKILL)  # mid-write of a later checkpoint
    proc.communicate(timeout=HANG_GUARD)
    assert list(run.glob(".fundamentallm-tmp-*")), "the kill should have interrupted a write"
    for path in run.glob("*.pt"):
        assert read_checkpoint(path).progress.step > 0  # every file that has its final name is whole

    resumed = run_cli("train", "--resume", "auto", "-o", run, "--device", "cpu")
    assert resumed.exit_code == 0, resumed.stderr
    assert not list(run.glob(".fundamentallm-tmp-*"))  # stale temporaries are cleaned up
    assert read_checkpoint(run / "final_model.pt").progress.epochs_done == 5


def test_resume_auto_skips_a_damaged_checkpoint(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_tiny(corpus, run, "--epochs", "2", "--set", "training.keep_last_n=0")
    (run / "final_model.pt").unlink()
    damaged = run / "checkpoint_epoch_2.pt"
    damaged.write_bytes(damaged.read_bytes()[:5000])
    result = run_cli("train", "--resume", "auto", "-o", run, "--device", "cpu", "--epochs", "3")
    assert result.exit_code == 0, result.stderr
    assert "skipping checkpoint_epoch_2.pt" in result.stderr
    assert "at step 141" in result.output  # from checkpoint_epoch_1.pt


def test_resume_refuses_a_different_model_or_corpus(corpus: Path, tmp_path: Path, alice: str) -> None:
    run = tmp_path / "run"
    train_tiny(corpus, run, "--epochs", "1")
    ckpt = run / "final_model.pt"
    result = run_cli("train", corpus, "-o", tmp_path / "b", "--resume", ckpt, *TINY, "--set", "model.d_model=64")
    assert result.exit_code == 2 and "model.d_model: 32 in the checkpoint, 64 now" in result.stderr
    other = tmp_path / "other.txt"
    other.write_text(alice[100_000:140_000])
    result = run_cli("train", other, "-o", tmp_path / "c", "--resume", ckpt, *TINY)
    assert result.exit_code == 2 and "different data" in result.stderr


def test_resume_extends_a_finished_run_and_refuses_to_redo_it(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_tiny(corpus, run, "--epochs", "1")
    again = run_cli("train", "--resume", "auto", "-o", run)
    assert again.exit_code == 2 and "already finished" in again.stderr
    longer = run_cli("train", "--resume", "auto", "-o", run, "--epochs", "2", "--device", "cpu")
    assert longer.exit_code == 0, longer.stderr
    assert read_checkpoint(run / "final_model.pt").progress.step == 282


def test_branching_off_a_checkpoint_keeps_its_history_and_never_mixes_runs(corpus: Path, tmp_path: Path) -> None:
    source, other, branch = tmp_path / "source", tmp_path / "other", tmp_path / "branch"
    train_tiny(corpus, source, "--epochs", "2")
    train_tiny(corpus, other, "--epochs", "1", "--set", "model.d_ff=48")
    ckpt = source / "checkpoint_epoch_1.pt"
    before = snapshot(other)

    # Into a directory that holds another run: refused, and that run is left exactly as it was.
    mixed = run_cli("train", "--resume", ckpt, "-o", other, "--epochs", "2", "--device", "cpu")
    assert_clean_error(mixed, "already holds another run", "branch")
    assert snapshot(other) == before

    # Into a new directory: its metrics.jsonl describes the branch and carries the source's records up to the
    # checkpoint, so status and plots show the whole curve.
    result = run_cli("train", "--resume", ckpt, "-o", branch, "--epochs", "3", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    records = read_metrics(branch)
    assert records[0]["kind"] == "run" and records[0]["config"]["training"]["epochs"] == 3
    assert sum(r["kind"] == "run" for r in records) == 1
    at = read_checkpoint(ckpt).progress.step
    assert records[0]["resumed_at"] == [at]
    source_steps = {s: loss for s, loss in step_losses(source).items() if s <= at}
    assert {s: loss for s, loss in step_losses(branch).items() if s <= at} == source_steps
    assert max(step_losses(branch)) == read_checkpoint(branch / "final_model.pt").progress.step


def test_resuming_in_place_rewrites_the_run_record(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_tiny(corpus, run, "--epochs", "1")
    longer = run_cli("train", "--resume", "auto", "-o", run, "--epochs", "2", "--device", "cpu")
    assert longer.exit_code == 0, longer.stderr
    records = read_metrics(run)
    runs = [r for r in records if r["kind"] == "run"]
    assert records[0] is runs[0] and len(runs) == 1
    assert runs[0]["total_steps"] == read_checkpoint(run / "final_model.pt").progress.step
    assert runs[0]["resumed_at"] == [141]  # where the second session took over, for plots
    assert [r["status"] for r in records if r["kind"] == "end"] == ["finished"]


def test_resume_auto_without_a_checkpoint_or_data(tmp_path: Path) -> None:
    result = run_cli("train", "--resume", "auto", "-o", tmp_path / "empty")
    assert_clean_error(result, "no checkpoint", "give DATA")
    assert not (tmp_path / "empty").exists()


def test_an_epoch_cut_short_by_max_steps_stays_open(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_tiny(corpus, run, "--epochs", "2", "--set", "training.max_steps=200")  # 141 steps per epoch
    assert [p.name for p in run.glob("checkpoint_epoch_*.pt")] == ["checkpoint_epoch_1.pt"]
    progress = read_checkpoint(run / "final_model.pt").progress
    assert (progress.epochs_done, progress.step_in_epoch) == (1, 59)
    assert_clean_error(run_cli("train", "--resume", "auto", "-o", run), "training.max_steps=200")
    more = run_cli("train", "--resume", "auto", "-o", run, "--set", "training.max_steps=null")
    assert more.exit_code == 0, more.stderr
    assert read_checkpoint(run / "final_model.pt").progress.step == 282  # two whole epochs, no more
    assert (run / "checkpoint_epoch_2.pt").exists()


def test_resuming_in_place_from_an_older_checkpoint_is_refused(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_tiny(corpus, run, "--epochs", "2")
    before = snapshot(run)
    result = run_cli("train", "--resume", run / "checkpoint_epoch_1.pt", "-o", run, "--device", "cpu")
    assert_clean_error(result, "saved after checkpoint_epoch_1.pt", "checkpoint_epoch_2.pt", "new directory")
    assert snapshot(run) == before


def test_resume_refuses_another_optimizer_and_takes_new_regularisation(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_tiny(corpus, run, "--epochs", "1")
    ckpt = run / "final_model.pt"
    resume = ["train", "--resume", ckpt, "--epochs", "2", "--device", "cpu"]
    other = run_cli(*resume, "-o", tmp_path / "b", "--set", "training.optimizer=muon")
    assert_clean_error(other, "training.optimizer: adamw in the checkpoint, muon now")
    changed = run_cli(*resume, "-o", tmp_path / "c", "--set", "training.weight_decay=0.0",
                      "--set", "model.dropout=0.2")
    assert changed.exit_code == 0, changed.stderr
    groups = read_checkpoint(tmp_path / "c" / "final_model.pt").training_state.optimizer["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]  # was 0.1 for the weight matrices
