"""Crash-safe file writing: every file FundamentaLLM writes appears whole or not at all.

A writer fills a temporary file in the target's own directory (so the final rename never crosses file
systems), the data is flushed and fsync'ed, and only then is the file renamed over the target. A process killed
at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from fundamentallm.errors import TrainingFailed, UserError

# Test hooks: seconds to pause after every 64 KiB written, so that a test can kill the process mid-write; and a
# full disk after this many bytes of each file (whose name matches the pattern, default all), as the OS reports it.
_SLOW_WRITE_ENV = "FUNDAMENTALLM_TEST_SLOW_WRITE"
_FAIL_WRITE_ENV = "FUNDAMENTALLM_TEST_FULL_DISK_AFTER"
_FAIL_WRITE_FILES_ENV = "FUNDAMENTALLM_TEST_FULL_DISK_FILES"
TEMP_PREFIX = ".fundamentallm-tmp-"  # distinct enough that cleaning up never touches a user's own files


def read_small_text(path: Path, option: str, max_bytes: int, hint: str) -> str:
    """The text of a small input file (a config, a template): a regular file of at most `max_bytes` of UTF-8
    (read_regular: a FIFO, a device such as /dev/zero or a directory is refused instead of read forever). Every
    problem is one UserError naming `option` and the file; `hint` says what to give instead."""
    data = read_regular(path, max_bytes, option, hint)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{option} {path} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at byte offset "
                        f"{exc.start:,})") from None


class _TestWriter:
    """Test hooks around the real file: pause after every 64 KiB, and fail the way a full disk does."""

    def __init__(self, raw: BinaryIO, pause: float, fail_after: int, path: Path) -> None:
        self.raw, self.pause, self.fail_after, self.path = raw, pause, fail_after, path
        self._unpaused = 0  # bytes written since the last pause
        self._written = 0

    def write(self, data: bytes) -> int:
        if 0 <= self.fail_after < self._written + len(data) and fnmatch.fnmatch(
                self.path.name, os.environ.get(_FAIL_WRITE_FILES_ENV, "*")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.raw.write(data)
        self._written += len(data)
        self._unpaused += len(data)
        while self.pause > 0 and self._unpaused >= 1 << 16:
            self.raw.flush()
            time.sleep(self.pause)
            self._unpaused -= 1 << 16
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temporary file and rename it to `path` once it is complete and on disk.

    Whatever the writer reports when the file system fails (an OSError, or torch.save's RuntimeError "unexpected
    pos ..." that wraps one), it is the write failing: TrainingFailed names the file and the space left, and the
    earlier version of `path`, if any, is untouched."""
    path = Path(path)
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX + path.name + ".", dir=directory)
    except OSError as exc:
        reason = "read-only file system" if exc.errno == errno.EROFS else \
            "permission denied" if isinstance(exc, PermissionError) else exc.strerror
        raise UserError(f"cannot write to {directory}: {reason}; choose another place to write (-o)") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates 0600; give the file the permissions open() would. Some filesystems (vfat, some
            # network mounts) refuse, and the file is just as good without.
            with contextlib.suppress(OSError):
                os.fchmod(f.fileno(), FILE_MODE)
            pause = float(os.environ.get(_SLOW_WRITE_ENV, "0") or 0)
            fail_after = int(os.environ.get(_FAIL_WRITE_ENV, "-1") or -1)
            if pause > 0 or fail_after >= 0:
                write(_TestWriter(f, pause, fail_after, path))  # type: ignore[arg-type]
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(directory)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        failure = write_failure(exc, path)
        if failure is exc:
            raise
        raise failure from None


# What a write failure's message says after naming the file: what is intact, and how to go on. A run's files stay
# as they were, and the run continues from its last checkpoint; an export (publish_dir) keeps the directory it
# would have replaced.
RUN_FAILURE_ADVICE = ("earlier files are intact", "(or write elsewhere with -o); a training run continues with "
                      "--resume auto")


def export_failure_advice(out: Path) -> tuple[str, str]:
    """RUN_FAILURE_ADVICE's counterpart for an export into directory `out`."""
    return f"any earlier export in {out} is kept as it was", "or choose another -o, and export again"


def write_failure(exc: BaseException, path: Path, advice: tuple[str, str] = RUN_FAILURE_ADVICE) -> BaseException:
    """The error to raise when writing `path` ended with `exc`: `exc` itself unless it is the file system's
    (libraries written in Rust, such as safetensors, report a full disk as their own error, naming os error 28).
    `advice`: what the message says is intact, and how to go on (RUN_FAILURE_ADVICE, export_failure_advice)."""
    chain = [exc]
    while len(chain) < 10 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)  # type: ignore[arg-type]
    interrupt = next((e for e in chain if isinstance(e, KeyboardInterrupt)), None)
    if interrupt is not None:  # Ctrl-C inside torch.save arrives wrapped in a RuntimeError
        return interrupt
    if isinstance(exc, UserError):  # e.g. unreadable input while writing the token cache
        return exc
    os_error = next((e for e in chain if isinstance(e, OSError)), None)
    if os_error is None and any("os error 28" in str(e) or "StorageFull" in str(e) for e in chain):
        os_error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    kept, go_on = advice
    if os_error is not None:
        if os_error.errno == errno.EROFS:
            return UserError(f"cannot write {path}: read-only file system")
        if isinstance(os_error, PermissionError):
            return UserError(f"cannot write {path}: permission denied")
        return disk_full(os_error, path, advice) or TrainingFailed(
            f"writing {path} failed ({os_error.strerror or os_error}){_space_left(path)}; {kept}. Fix the file "
            f"system {go_on}")
    if isinstance(exc, RuntimeError):  # torch's writer, which reports a short write as "unexpected pos ..."
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return TrainingFailed(
            f"writing {path} failed ({detail}){_space_left(path)}, probably because the disk is full; {kept}. "
            f"Free some space {go_on}")
    return exc


def _space_left(path: Path) -> str:
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return ""
    amount = f"{free / 2**30:,.1f} GiB" if free >= 2**30 else f"{free / 2**20:,.1f} MiB"
    return f" with {amount} free on that file system"


def disk_full(exc: BaseException, path: Path, advice: tuple[str, str] = RUN_FAILURE_ADVICE) -> TrainingFailed | None:
    """The error to report when `exc` means the disk (or the file size limit) is full while writing `path`."""
    # torch.save reports a failed write as a RuntimeError ("unexpected pos ..."), with the OSError as its context.
    full = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    cause: BaseException | None = exc
    while cause is not None and not (isinstance(cause, OSError) and cause.errno in full):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    reason = "the file size limit was reached" if cause.errno == errno.EFBIG else "the disk is full"
    kept, go_on = advice
    return TrainingFailed(f"{reason} while writing {path}{_space_left(path)}; {kept}. Free some space {go_on}")


def why_unwritable(directory: Path) -> str | None:
    """Why new files cannot be created in an existing `directory` ("read-only file system", "permission
    denied"), or None when they can."""
    with contextlib.suppress(OSError, AttributeError):  # statvfs: not on Windows
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return "read-only file system"
    return None if os.access(directory, os.W_OK) else "permission denied"


# ----------------------------------------------------------------------------------------------------------
# Reading: regular files only


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a file of this st_mode is, in words ("a named pipe (FIFO)"); "a regular file" for one."""
    return next((kind for test, kind in _KINDS if test(mode)), "a regular file" if stat.S_ISREG(mode) else
                "not a regular file")


def is_regular(path: Path) -> bool:
    """Whether `path` (followed if a link) is a regular file: a stat, which never blocks, unlike opening it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular(path: Path | str, what: str = "", hint: str = "") -> BinaryIO:
    """`path` opened for reading in binary, or a UserError when it is missing, unreadable or anything but a regular
    file. The open never blocks (O_NONBLOCK: opening a FIFO without a writer would wait forever) and the type is
    checked on the open file (fstat), so nothing swapped in between is read. `what` names the file in the message
    ("checkpoint", "--config"); `hint` is appended to it (the fix)."""
    name = f"{what} {path}" if what else str(path)
    fix = f"; {hint}" if hint else ""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UserError(f"{name} does not exist{fix}") from None
    except PermissionError:
        raise UserError(f"cannot read {name}: permission denied") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise UserError(f"cannot read {name}: {getattr(exc, 'strerror', None) or exc}{fix}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UserError(f"{name} is {file_kind(mode)}, not a regular file{fix}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: Path | str, max_bytes: int, what: str = "", hint: str = "") -> bytes:
    """The bytes of a regular file (see open_regular) of at most `max_bytes`; a larger one is refused unread."""
    with open_regular(path, what, hint) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise UserError(f"cannot read {what + ' ' if what else ''}{path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        size = f"{max_bytes >> 20} MiB" if max_bytes >= 1 << 20 else f"{max_bytes:,} bytes"
        raise UserError(f"{what + ' ' if what else ''}{path} is larger than {size}, more than such a file ever "
                        f"holds; {hint or 'is this the right file?'}")
    return data


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: setting the umask to read it would race with other threads later
FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (e.g. Windows), where it is skipped.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: Path, idle_seconds: float = 0) -> None:
    """Delete temporary files left by a process that was killed while writing; with idle_seconds, only those
    unchanged for that long (another process may be writing the others right now)."""
    for tmp in Path(directory).glob(TEMP_PREFIX + "*"):
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime >= idle_seconds:
                tmp.unlink()


# ----------------------------------------------------------------------------------------------------------
# Whole directories (exports)


def publish_dir(out: Path, write: Callable[[Path], None]) -> None:
    """Fill a hidden sibling of directory `out` with `write(tmp)`, then swap it in: `out` is either what it was
    or the whole new directory. A file-system failure is one error naming `out` (as in atomic_write); SIGTERM or
    Ctrl-C while writing removes the hidden directory before the process ends, and hidden directories left by a
    killed process (one no longer alive) are removed the next time."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_siblings(out)
        tmp, old = parent / f".{out.name}.export-{os.getpid()}", parent / f".{out.name}.replaced-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise write_failure(exc, out, export_failure_advice(out)) from None
        reason = "read-only file system" if exc.errno == errno.EROFS else \
            "permission denied" if isinstance(exc, PermissionError) else exc.strerror
        raise UserError(f"cannot write to {parent}: {reason}; choose another place to write (-o)") from None
    try:
        with _signals_interrupt():
            write(tmp)
            pause = float(os.environ.get(_SLOW_WRITE_ENV, "0") or 0)
            time.sleep(pause * 4)  # test hook: a slow disk, so that a test can stop an export mid-way
            for p in tmp.rglob("*"):
                if p.is_file():
                    p.chmod(FILE_MODE)  # some writers create 0600 files; give them the permissions open() would
            if out.exists():
                out.rename(old)
            tmp.rename(out)
            _fsync_directory(parent)
    except BaseException as exc:
        failure = write_failure(exc, out, export_failure_advice(out))
        if failure is exc:
            raise
        raise failure from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _remove_dead_siblings(out: Path) -> None:
    for hidden in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = hidden.name[len(out.name) + 2:].rpartition("-")
        if kind in ("export", "replaced") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(hidden, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process: alive
        return True
    return True


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM (and SIGINT) raise KeyboardInterrupt inside the block, so that cleanup code runs; the CLI turns it
    into "Aborted." and exit code 128 + the signal."""
    def interrupt(signum: int, frame: object) -> None:
        exc = KeyboardInterrupt()
        exc.signum = signum  # type: ignore[attr-defined]
        raise exc

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
