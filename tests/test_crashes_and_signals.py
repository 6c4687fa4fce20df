"""Runs that end badly: numerical trouble, out of memory, read-only and full disks, signals, a second
process on a live run, damaged run records. Earlier files stay whole, and the message says what to do."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    TINY,
    TINY_SETS,
    assert_clean_error,
    assert_one_line,
    in_private_tmpfs,
    in_private_tmpfs_or_none,
    run_cli,
    run_subprocess,
    subprocess_env,
    train_tiny,
    wait_for,
)

from fundamentallm.checkpoint import read_checkpoint
from fundamentallm.metrics import read_metrics

# ---------------------------------------------------------------------------------------------------------
# Numerical trouble and running out of memory


def test_nan_loss_stops_with_remedies_and_keeps_checkpoints(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_tiny(corpus, run, "--epochs", "1")
    checkpoints = {p.name: p.read_bytes() for p in run.glob("*.pt")}
    result = run_cli("train", "--resume", "auto", "-o", run, "--epochs", "2", "--learning-rate", "1e30",
                     "--set", "training.gradient_clip_norm=null", "--set", "training.scheduler=constant")
    assert_clean_error(result, "loss became", "at step", "Lower the learning rate", "gradient clipping", code=1)
    assert {p.name: p.read_bytes() for p in run.glob("*.pt")} == checkpoints


def test_out_of_memory_names_the_remedies_in_order(corpus: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPU is what is outside the program here: simulate the allocator's failure on the first forward pass.
    from fundamentallm.model import GPT

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.34 GiB")

    monkeypatch.setattr(GPT, "forward", oom)
    result = run_cli("train", corpus, "-o", tmp_path / "run", *TINY)
    assert_clean_error(result, "out of memory", code=1)
    message = result.stderr
    assert message.index("--batch-size 4") < message.index("--config small") < message.index("--sequence-length 16")
    assert "gradient_accumulation_steps=2" in message


# ---------------------------------------------------------------------------------------------------------
# File systems that are read-only or full


def test_unwritable_output_directory(corpus: Path, tmp_path: Path) -> None:
    result = in_private_tmpfs(f'"$PY" -m fundamentallm train {corpus} -o "$FS/run" {" ".join(TINY)}',
                              "ro,size=1m", tmp_path)
    assert_clean_error(result, "cannot write")


def test_full_disk_while_saving_keeps_earlier_checkpoints(corpus: Path, tmp_path: Path) -> None:
    keep = tmp_path / "survivors"
    # 600 KB holds the first epochs' checkpoints (~170 KB each with optimizer state), not all five.
    script = (f'"$PY" -m fundamentallm train {corpus} -o "$FS/run" {" ".join(TINY)} --epochs 5 '
              f'--set training.keep_last_n=0 >"$FS/../out.txt" 2>"$FS/../err.txt"; echo $? >"$FS/../rc.txt"; '
              f'cp -r "$FS/run" {keep}')
    in_private_tmpfs(script, "size=600k", tmp_path)
    rc, err = int((tmp_path / "rc.txt").read_text()), (tmp_path / "err.txt").read_text()
    assert rc == 1 and "Traceback" not in err and "disk is full" in err and "--resume auto" in err, err
    saved = sorted(keep.glob("*.pt"))
    assert saved, "no checkpoint was saved before the disk filled up"
    for path in saved:
        read_checkpoint(path)
    assert not list(keep.glob(".fundamentallm-tmp-*"))


FULL_DISK = {"FUNDAMENTALLM_TEST_FULL_DISK_AFTER": "1000",
             "FUNDAMENTALLM_TEST_FULL_DISK_FILES": "checkpoint_epoch_2.pt"}


def test_a_full_disk_stops_the_run_and_keeps_earlier_files(text: Path, trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    kept = {name: (run / name).read_bytes() for name in ("checkpoint_epoch_1.pt", "final_model.pt")}
    # The OS says "no space left" in the middle of torch.save, which reports it as RuntimeError "unexpected pos".
    result = run_subprocess("train", "--resume", "auto", "-o", run, "--device", "cpu", "--epochs", "3",
                            env={**os.environ, **FULL_DISK})
    assert_one_line(result, "disk is full", "checkpoint_epoch_2.pt", "free on that file system", "--resume auto",
                    code=1)
    assert {name: (run / name).read_bytes() for name in kept} == kept
    assert not (run / "checkpoint_epoch_2.pt").exists() and not list(run.glob(".fundamentallm-tmp-*"))

    # And on a real file system that fills up (where this machine lets a test mount one): 600 KB hold the first
    # checkpoints of a tiny run (~170 KB each with optimizer state), not all of them.
    keep = tmp_path / "survivors"
    script = (f'"$PY" -m fundamentallm train {text} -o "$FS/run" --device cpu {" ".join(TINY)} --epochs 6 '
              f'--set training.keep_last_n=0 >"$FS/../out.txt" 2>"$FS/../err.txt"; echo $? >"$FS/../rc.txt"; '
              f'cp -r "$FS/run" {keep}')
    if in_private_tmpfs_or_none(script, "size=600k", tmp_path) is None:
        return  # no tmpfs here: the simulated failure above is the test
    rc, err = int((tmp_path / "rc.txt").read_text()), (tmp_path / "err.txt").read_text()
    assert rc == 1 and "Traceback" not in err and "disk is full" in err and "free on that file system" in err, err
    assert err.strip().splitlines()[-1].startswith("error: ")
    saved = sorted(keep.glob("*.pt"))
    assert saved, "no checkpoint was saved before the disk filled up"
    for path in saved:
        read_checkpoint(path)  # whole and loadable
    assert not list(keep.glob(".fundamentallm-tmp-*"))


# ---------------------------------------------------------------------------------------------------------
# Signals, and one live run per directory


def test_second_sigterm_exits_143_at_once(text: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # Slow checkpoint writes keep the process saving interrupted.pt when the second SIGTERM arrives.
    proc = subprocess.Popen([sys.executable, "-m", "fundamentallm", "train", str(text), "-o", str(run), "--device",
                             "cpu", *TINY, "--epochs", "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "FUNDAMENTALLM_TEST_SLOW_WRITE": "0.5"})
    try:
        _wait_for(lambda: (run / "metrics.jsonl").exists() and len(read_metrics(run)) > 5)
        proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: list(run.glob(".fundamentallm-tmp-interrupted.pt*")))
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "Aborted" in stderr
    assert not (run / "interrupted.pt").exists() and not list(run.glob(".fundamentallm-tmp-*"))


def _wait_for(condition, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the training process")
        time.sleep(0.05)


def test_a_live_run_holds_its_directory(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fundamentallm", "train", str(corpus), "-o", str(run), "--device", "cpu", *TINY,
           "--epochs", "1000"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists(), first, "the first run to start")
        for args in (["train", corpus, "-o", run, *TINY], ["train", corpus, "-o", run, *TINY, "--overwrite"],
                     ["train", "--resume", "auto", "-o", run],
                     ["sweep", corpus, *TINY_SETS, "--grid", "training.batch_size=8", "-o", run]):
            result = run_cli(*args)
            assert_clean_error(result, "in use by a running FundamentaLLM process", f"pid {first.pid}")
        status = run_cli("status", run)
        assert status.exit_code == 0 and f"running (pid {first.pid}" in status.stdout, status.stdout
        assert first.poll() is None, "the first run must not be disturbed"
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    # The lock died with the process: the directory is free again, and status says nobody is running it.
    assert json.loads(run_cli("status", run, "--json").stdout)["state"] == "stopped"
    train_tiny(corpus, run, "--overwrite", "--set", "training.max_steps=3")


# ---------------------------------------------------------------------------------------------------------
# Damaged run records (a killed run, a bad copy)


DAMAGE = [
    b'{"kind": "train", "step": 3, "train_loss": 1.0, "note": "\xff\xfe not UTF-8"}\n',
    b"[1, 2, 3]\n",
    b'{"kind": "eval", "step": "four", "val_loss": 1.0}\n',
    b'{"kind": "train", "step": 2, "train_loss": 1.0, "elapsed": 1e999}\n',
    b'{"kind": "run", "config": {"training": {"epochs": "ten"}}}\n',
    b'{"kind": "train", "step": 10000000000000000000000000, "train_loss": 0.5}\n',
    b"[" * 100_000 + b"]" * 100_000 + b"\n",
]


def _damage(metrics: Path) -> None:
    lines = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(b"".join(lines[:3] + DAMAGE + lines[3:]))


def test_damaged_run_records_are_skipped_with_one_warning(text: Path, trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    good = read_metrics(run)
    _damage(run / "metrics.jsonl")
    for args in (["status", run], ["status", "--json", run], ["plot", run, "-o", tmp_path / "plot.png"]):
        result = run_cli(*args)
        assert result.exit_code == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert result.stderr.count(f"skipped {len(DAMAGE)} damaged record(s)") == 1, result.stderr
    assert read_metrics(run) == good

    # --resume auto carries the run's history over, without the damaged lines.
    steps = max(r["step"] for r in good if r["kind"] == "train")
    resumed = run_cli("train", "--resume", "auto", "-o", run, "--device", "cpu", "--epochs", "2")
    assert resumed.exit_code == 0, resumed.stderr
    assert f"skipped {len(DAMAGE)} damaged record(s)" in resumed.stderr
    records = read_metrics(run)
    assert [r for r in records if r["kind"] == "train" and r["step"] <= steps] == \
        [r for r in good if r["kind"] == "train"]
    assert max(r["step"] for r in records if r["kind"] == "train") == 2 * steps


def test_sweep_summary_reads_past_damaged_records(text: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = ["sweep", text, "--device", "cpu", "--epochs", "1", "--set", "training.max_steps=6", *TINY_SETS,
            "--set", "training.batch_size=8", "--grid", "training.learning_rate=1e-3", "-o", out]
    assert run_cli(*args).exit_code == 0
    _damage(out / "learning_rate=1e-3" / "metrics.jsonl")
    again = run_cli(*args)  # the run is finished: only the summary reads the damaged file
    assert again.exit_code == 0, again.stderr
    assert f"skipped {len(DAMAGE)} damaged record(s)" in again.stderr
    assert "learning_rate=1e-3" in (out / "results.csv").read_text()
