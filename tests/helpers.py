"""Helpers for driving the real CLI and checking its results."""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import locale
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner, Result

from fundamentallm.cli import cli

ROOT = Path(__file__).resolve().parents[1]
ALICE = ROOT / "examples" / "alice.txt"  # the corpus the tests use: in the repository, nothing from outside it

# How long a test waits for a child process or a condition before calling it hung. Only a guard against hangs:
# tests wait for the event itself (a file, a record, an exit), never for a time, so this never decides a result on
# a slow or busy machine.
HANG_GUARD = 600.0

# A model small enough that a whole training run takes a second or two on 2 CPU cores, as --set assignments
# (every command takes those) ...
TINY_SETS = ["--set", "model.d_model=32", "--set", "model.num_heads=2", "--set", "model.num_layers=1",
             "--set", "model.d_ff=64", "--set", "model.dropout=0.0", "--set", "training.warmup_steps=2",
             "--set", "training.sequence_length=32", "--set", "training.log_interval=1"]
# ... and with the batch size of the tests that train it.
TINY = [*TINY_SETS, "--batch-size", "8"]
# The model of the tests that build one in-process (ModelConfig keyword arguments).
TINY_MODEL = {"d_model": 32, "num_heads": 4, "num_layers": 2, "d_ff": 64, "dropout": 0.0}


# Exit codes of a command stopped by Ctrl-C or SIGTERM (the shell's 128 + N).
_STOPPED_BY = {128 + signal.SIGINT: signal.SIGINT, 128 + signal.SIGTERM: signal.SIGTERM}


def run_cli(*args: str | Path, input: str | None = None) -> Result:
    """Run the real CLI in-process; returns click's Result (exit_code, stdout, stderr).

    A signal that reaches the test process while a command runs here is the person at the keyboard stopping the
    test session, not a test: training catches it (to save a checkpoint) and exits with 128 + N, and that exit
    would only fail one test. Raising the signal again once the command has returned, when the command's own
    handler is gone, stops pytest as the signal would have (KeyboardInterrupt for Ctrl-C). No test sends a
    signal to its own process, so this never hides a result."""
    result = CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)
    if result.exit_code in _STOPPED_BY:
        signal.raise_signal(_STOPPED_BY[result.exit_code])
    return result


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for `python -m fundamentallm` in a child process: this checkout's package first, and one
    CPU thread (see conftest._one_thread)."""
    paths = [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1", **extra}


def run_started_subprocess(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m fundamentallm ...` in a process started from scratch (interpreter, imports and all)."""
    cmd = [sys.executable, "-m", "fundamentallm", *map(str, args)]
    kwargs.setdefault("env", subprocess_env())
    return subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD, **kwargs)


class _Launcher:
    """tests/launcher.py, started on first use: forks a process of its own for each command."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("launcher.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8",
                                     env=subprocess_env())
        atexit.register(self.close)

    def run(self, request: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
        except BaseException:  # Ctrl-C while a command runs: the next command gets a new launcher
            self.close()
            raise
        assert answer, f"tests/launcher.py ended (exit code {self.proc.wait()}); its error is above"
        return json.loads(answer)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


_launcher: _Launcher | None = None
_launcher_lock = threading.Lock()


def run_subprocess(*args: str | Path, env: dict[str, str] | None = None, input: str | None = None,
                   errors: str = "strict") -> subprocess.CompletedProcess:
    """Run `fundamentallm ...` as a separate process, as a user would: its own process, exit code, files and
    streams, and a hang guard. The process is forked from tests/launcher.py, which has the package and torch loaded
    already, so that it starts in milliseconds rather than seconds."""
    global _launcher
    arguments = [str(a) for a in args]
    cmd = [sys.executable, "-m", "fundamentallm", *arguments]
    with _launcher_lock, tempfile.TemporaryDirectory(prefix="fundamentallm-cmd-") as streams:
        paths = {name: os.path.join(streams, name) for name in ("stdin", "stdout", "stderr")}
        Path(paths["stdin"]).write_text(input or "", encoding="utf-8")
        Path(paths["stdout"]).touch()
        Path(paths["stderr"]).touch()
        if _launcher is None or _launcher.proc.poll() is not None:
            _launcher = _Launcher()
        answer = _launcher.run({"args": arguments, "env": subprocess_env() if env is None else env,
                                "cwd": os.getcwd(), "timeout": HANG_GUARD, **paths})
        stdout, stderr = (_decoded(Path(paths[name]).read_bytes(), errors) for name in ("stdout", "stderr"))
    if answer.get("timed_out"):
        raise subprocess.TimeoutExpired(cmd, HANG_GUARD, stdout, stderr)
    return subprocess.CompletedProcess(cmd, answer["returncode"], stdout, stderr)


def _decoded(data: bytes, errors: str) -> str:
    """Bytes as subprocess.run(text=True) decodes them: the locale's encoding, universal newlines."""
    return io.TextIOWrapper(io.BytesIO(data), encoding=locale.getpreferredencoding(False), errors=errors).read()


def wait_for(condition: Callable[[], object], proc: subprocess.Popen | None = None, what: str = "the condition",
             ) -> None:
    """Poll until `condition()` holds. Fails at once if `proc` ends first (with its output), and after HANG_GUARD
    seconds, which only a hang reaches."""
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        if proc is not None and proc.poll() is not None:
            stdout, stderr = proc.communicate()
            raise AssertionError(f"the process ended (exit code {proc.returncode}) before {what}\n"
                                 f"stdout: {stdout}\nstderr: {stderr}")
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what} after {HANG_GUARD:.0f} s: the process hangs")
        time.sleep(0.02)


def freeze_when(proc: subprocess.Popen, condition: Callable[[], object], what: str = "the condition") -> None:
    """Poll `condition()` while `proc` is stopped (SIGSTOP), and return with it still stopped once it holds: the
    signal the test sends next lands exactly there, however slowly this test process is scheduled, instead of
    wherever a running process has got to by then. Send it SIGCONT to let it go on (a signal sent in between
    waits for that). Fails like wait_for if the process ends first or the condition never comes."""
    def stopped_and_true() -> bool:
        proc.send_signal(signal.SIGSTOP)
        os.waitid(os.P_PID, proc.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)  # returns once it is stopped (or gone)
        if proc.poll() is None and condition():
            return True
        proc.send_signal(signal.SIGCONT)
        return False

    wait_for(stopped_and_true, proc, what)


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


def assert_one_line(result, *needles: str, code: int = 2) -> None:
    assert_clean_error(result, *needles, code=code)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert len(lines[0]) < 1000, f"the message is {len(lines[0])} characters long"


def in_private_tmpfs(script: str, mount_options: str, tmp: Path) -> subprocess.CompletedProcess:
    """Run a shell script in a private mount namespace with a tmpfs at $FS (gone when the script ends)."""
    # What this needs is part of the test: without it the test fails (saying what is missing), it never skips.
    assert shutil.which("unshare"), "this test needs unshare(1) (util-linux) to mount a private tmpfs"
    fs = tmp / "fs"
    fs.mkdir()
    wrapper = f'mount -t tmpfs -o {mount_options} tmpfs "$FS" || exit 77\n{script}'
    cmd = ["unshare", "--mount"] + (["--map-root-user"] if os.geteuid() != 0 else []) + ["sh", "-c", wrapper]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD,
                            env=subprocess_env(FS=str(fs), PY=sys.executable))
    assert result.returncode != 77, (f"cannot mount a private tmpfs here ({result.stderr.strip()}); this test needs "
                                     f"unprivileged user namespaces (or root)")
    return result


def in_private_tmpfs_or_none(script: str, mount_options: str, tmp: Path) -> subprocess.CompletedProcess | None:
    """Run a shell script with a fresh tmpfs mounted at $FS in a private mount namespace; None where mounting is
    impossible here (no unshare, no privileges)."""
    if shutil.which("unshare") is None:
        return None
    fs = tmp / "fs"
    fs.mkdir()
    wrapper = f'mount -t tmpfs -o {mount_options} tmpfs "$FS" || exit 77\n{script}'
    cmd = ["unshare", "--mount"] + (["--map-root-user"] if os.geteuid() != 0 else []) + ["sh", "-c", wrapper]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD,
                            env={**subprocess_env(), "FS": str(fs), "PY": sys.executable})
    return None if result.returncode == 77 else result
