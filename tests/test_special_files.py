"""A path that is not a regular file never blocks: a FIFO (or a device, or a directory) where a checkpoint, a
config, a data file or a file of an exported directory belongs is refused at once, in one line, exit code 2.

Every command runs as a real process, so a reader that blocked on the FIFO would hang the test until the hang
guard, not pass it."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
from helpers import TINY, run_cli, run_subprocess

pytest.importorskip("safetensors")


def assert_refused(result, *needles: str) -> None:
    assert result.returncode == 2, f"exit code {result.returncode}\n{result.stdout}\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    os.mkfifo(path)  # nothing ever writes to it: opening it for reading would wait forever
    return path


@pytest.fixture
def exported(tiny_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "exported"
    result = run_cli("export", tiny_run / "final_model.pt", "-o", out, "--format", "safetensors")
    assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.parametrize("command", [
    ["generate", "{fifo}", "-p", "The", "--max-tokens", "3"],
    ["evaluate", "{fifo}"],
    ["evaluate", "--json", "{fifo}"],
    ["export", "{fifo}", "-o", "{tmp}/out", "--format", "safetensors"],
    ["train", "{text}", "--init-from", "{fifo}", "-o", "{tmp}/run", *TINY, "--max-steps", "1"],
])
def test_a_fifo_checkpoint_is_refused_at_once(command: list[str], fifo: Path, tiny_run: Path,
                                              tmp_path: Path) -> None:
    args = [a.format(fifo=fifo, tmp=tmp_path, text=tiny_run.parent / "text.txt") for a in command]
    result = run_subprocess(*args)
    assert_refused(result, str(fifo), "named pipe (FIFO), not a regular file")
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_serve_refuses_a_fifo_before_taking_its_port(fifo: Path) -> None:
    with socket.socket() as probe:  # a free port, released again: serve must never get as far as binding it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_subprocess("serve", fifo, "--port", str(port))
    assert_refused(result, str(fifo), "named pipe (FIFO)")
    assert "Serving" not in result.stdout


@pytest.mark.parametrize("name", ["fundamentallm.json", "model.safetensors"])
def test_a_fifo_inside_an_exported_directory_is_refused(name: str, exported: Path) -> None:
    (exported / name).unlink()
    os.mkfifo(exported / name)
    for args in (["generate", exported, "-p", "The", "--max-tokens", "3"], ["evaluate", exported],
                 ["export", exported, "-o", exported.parent / "again", "--format", "safetensors"]):
        result = run_subprocess(*args)
        assert_refused(result, str(exported / name), "named pipe (FIFO), not a regular file")
    assert not (exported.parent / "again").exists()


def test_devices_and_directories_are_refused_by_name(tiny_run: Path, tmp_path: Path) -> None:
    # A character device: reading /dev/zero never ends.
    assert_refused(run_subprocess("generate", "/dev/zero", "-p", "a"), "/dev/zero", "character device")
    # A directory without a checkpoint: the message names no file that is not there.
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_subprocess("generate", empty, "-p", "a")
    assert_refused(result, "directory without a checkpoint")
    assert "final_model.pt" not in result.stderr
    # A run directory: the message names checkpoints that are in it.
    result = run_subprocess("evaluate", tiny_run)
    assert_refused(result, "is a directory", str(tiny_run / "final_model.pt"))


def test_a_fifo_among_the_data_or_the_config_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    text = tiny_run.parent / "text.txt"
    pipe = tmp_path / "more.txt"
    os.mkfifo(pipe)
    for args in (["train", text, pipe, "-o", tmp_path / "run", *TINY],
                 ["train", text, "--val-data", pipe, "-o", tmp_path / "run", *TINY],
                 ["evaluate", tiny_run / "final_model.pt", pipe],
                 ["train", text, "--config", pipe, "-o", tmp_path / "run"]):
        result = run_subprocess(*args)
        assert_refused(result, str(pipe), "not a regular file")
    assert not (tmp_path / "run").exists()


def test_a_fifo_in_a_run_directory_never_blocks(tiny_run: Path, tmp_path: Path) -> None:
    """status reads metrics.jsonl, --resume auto looks at every checkpoint of the directory."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    os.mkfifo(run / "checkpoint_epoch_7.pt")
    result = run_subprocess("train", "--resume", "auto", "-o", run, "--device", "cpu", "--max-steps", "5")
    assert "Traceback" not in result.stderr and result.returncode in (0, 2), result.stderr
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")
    assert_refused(run_subprocess("status", run), "metrics.jsonl")
