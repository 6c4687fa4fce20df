"""The run-directory lock never follows a symbolic link and opens only a regular file: whatever sits in place of
.fundamentallm.lock (a link to a file of the user's, a dangling link, a FIFO, a device, a directory), train and
sweep refuse in one line with exit code 2 and change nothing, and status still reports the run."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import TINY, TINY_SETS, assert_clean_error, run_cli, run_subprocess, snapshot

from fundamentallm.runfiles import LOCK, hold, live_holder


def _device(path: Path) -> None:
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    except PermissionError:
        pytest.skip("creating a device node needs root")


IMPOSTORS: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "symlink to a file": (lambda lock, tmp: lock.symlink_to(tmp / "precious.txt"), "symbolic link"),
    "dangling symlink": (lambda lock, tmp: lock.symlink_to(tmp / "created-by-nobody"), "symbolic link"),
    "symlink to /dev/null": (lambda lock, tmp: lock.symlink_to("/dev/null"), "symbolic link"),
    "fifo": (lambda lock, tmp: os.mkfifo(lock), "named pipe (FIFO)"),
    "device": (lambda lock, tmp: _device(lock), "character device"),
    "directory": (lambda lock, tmp: lock.mkdir(), "a directory"),
}


@pytest.fixture
def precious(tmp_path: Path) -> Path:
    path = tmp_path / "precious.txt"
    path.write_text("a file of the user's\n")
    return path


@pytest.mark.parametrize("impostor", IMPOSTORS)
def test_train_refuses_anything_but_a_regular_lock_file(impostor: str, tiny_run: Path, tmp_path: Path,
                                                        precious: Path) -> None:
    make, kind = IMPOSTORS[impostor]
    run = tmp_path / "run"
    run.mkdir()
    make(run / LOCK, tmp_path)
    before = snapshot(tmp_path)
    # A real process: a lock that blocked on the FIFO would hang the test until the guard, not pass it.
    result = run_subprocess("train", tiny_run.parent / "text.txt", "-o", run, "--device", "cpu", *TINY,
                            "--max-steps", "1")
    assert_clean_error(result, str(run / LOCK), kind, "not the lock file")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert precious.read_text() == "a file of the user's\n"
    assert not (tmp_path / "created-by-nobody").exists()
    assert snapshot(tmp_path) == before and sorted(p.name for p in run.iterdir()) == [LOCK]


def test_resume_and_sweep_refuse_a_symlinked_lock_too(tiny_run: Path, tmp_path: Path, precious: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / LOCK).symlink_to(precious)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / LOCK).symlink_to(precious)
    before = snapshot(tmp_path)
    resumed = run_cli("train", "--resume", "auto", "-o", run, "--device", "cpu", "--max-steps", "6")
    assert_clean_error(resumed, "symbolic link")
    result = run_cli("sweep", tiny_run.parent / "text.txt", "-o", sweep, "--device", "cpu", *TINY_SETS,
                     "--set", "training.max_steps=1", "--grid", "training.learning_rate=1e-3")
    assert_clean_error(result, "symbolic link")
    assert snapshot(tmp_path) == before and precious.read_text() == "a file of the user's\n"


@pytest.mark.parametrize("impostor", ["symlink to a file", "fifo", "directory"])
def test_status_reads_a_run_whose_lock_is_not_a_lock(impostor: str, tiny_run: Path, tmp_path: Path,
                                                     precious: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    IMPOSTORS[impostor][0](run / LOCK, tmp_path)
    assert live_holder(run) is None
    result = run_subprocess("status", run)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "running" not in result.stdout.lower().split("not running")[0] or "finished" in result.stdout.lower()


def test_a_regular_lock_is_still_taken_and_released(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with hold(run):
        assert (run / LOCK).is_file() and not (run / LOCK).is_symlink()
        assert f"pid {os.getpid()}" in (live_holder(run) or "")
    assert not (run / LOCK).exists() and live_holder(run) is None
