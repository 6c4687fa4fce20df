"""Helpers for driving the real CLI and checking its results."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result

from fundamentallm.cli import cli

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"

# A model small enough that a whole training run takes a second or two on 2 CPU cores, as --set assignments
# (every command takes those) ...
TINY_SETS = ["--set", "model.d_model=32", "--set", "model.num_heads=2", "--set", "model.num_layers=1",
             "--set", "model.d_ff=64", "--set", "model.dropout=0.0", "--set", "training.warmup_steps=2",
             "--set", "training.sequence_length=32", "--set", "training.log_interval=1"]
# ... and with the batch size of the tests that train it.
TINY = [*TINY_SETS, "--batch-size", "8"]


def run_cli(*args: str | Path, input: str | None = None) -> Result:
    """Run the real CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def run_subprocess(*args: str | Path, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m fundamentallm ...` as a separate process, as a user would."""
    cmd = [sys.executable, "-m", "fundamentallm", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def train_tiny(data: Path, out: Path, *extra: str | Path) -> Result:
    result = run_cli("train", data, "-o", out, "--device", "cpu", *TINY, *extra)
    assert result.exit_code == 0, f"train failed: {result.output}\n{result.stderr}"
    return result


def snapshot(directory: Path) -> dict[str, str]:
    """Hash of every file under `directory`, to prove a failed command changed nothing (the token cache, which
    only ever gains complete entries, is left out)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and "token-cache" not in p.parts}


def assert_clean_error(result: Result | subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    """One clear message on stderr naming the problem, the expected exit code, and no traceback."""
    exit_code = result.exit_code if isinstance(result, Result) else result.returncode
    stderr = result.stderr
    assert exit_code == code, f"exit code {exit_code}, expected {code}\nstdout: {result.stdout}\nstderr: {stderr}"
    assert "Traceback" not in stderr and "Traceback" not in result.stdout, stderr
    for needle in needles:
        assert needle.lower() in stderr.lower(), f"{needle!r} not in stderr: {stderr}"
