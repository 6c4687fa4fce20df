"""Runs CLI commands each in a fresh process of its own, without paying for Python's and PyTorch's start-up each
time (helpers.run_subprocess starts one of these per test process and sends it every command).

It imports the package and torch once, then, for each request (one JSON line on its stdin), forks a child that
runs the real entry point, fundamentallm.cli.main, with the request's arguments, environment, working directory
and standard streams (files named in the request), and answers with the child's exit status (one JSON line on
its stdout). Each child is a separate process that ends when its command ends, like `python -m fundamentallm`;
nothing one command does reaches the next, which forks from the same untouched parent. Only the start-up is
shared, which tests/test_busy.py and tests/test_cli.py check in processes started from scratch."""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import time
import traceback

# The package before torch, as every entry point does (fundamentallm/__init__.py settles how OpenMP's threads
# wait before torch loads).
# isort: off
import fundamentallm.cli
import torch  # noqa: F401 - loaded once here, so that no command pays for it
# isort: on


def _exit_code(exc: SystemExit) -> int:
    """The status Python exits with for `sys.exit(code)`."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _child(request: dict, channels: tuple[int, ...]) -> None:
    """Become the command's process: its directory, environment and streams; run it; exit with its status."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in channels:
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path, flags in ((0, request["stdin"], os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                                (2, request["stderr"], os.O_WRONLY)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        sys.argv = ["fundamentallm", *request["args"]]
        try:
            fundamentallm.cli.main()
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
        except KeyboardInterrupt:  # as Python does: the traceback, then the end by the signal itself
            traceback.print_exc()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _wait(pid: int, timeout: float) -> dict:
    """The child's exit status as subprocess reports it (-N: ended by signal N); killed once `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"returncode": os.waitstatus_to_exitcode(status)}
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"timed_out": True}
        time.sleep(0.005)


def main() -> None:
    # The requests and answers get descriptors of their own; the streams a child inherits are its own files.
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    # Ctrl-C reaches the whole process group: the command it interrupts answers it; this process goes on (and
    # ends with the test process, or when its stdin closes).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for line in requests:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request, (requests.fileno(), answers.fileno()))
        answers.write(json.dumps(_wait(pid, request["timeout"])) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
