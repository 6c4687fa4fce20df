"""Crash-safe file writing: every file FundamentaLLM writes appears whole or not at all.

A writer fills a temporary file in the target's own directory (so the final rename never crosses file
systems), the data is flushed and fsync'ed, and only then is the file renamed over the target. A process killed
at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from fundamentallm.errors import TrainingFailed, UserError

# Test hook: seconds to pause after every 64 KiB written, so that a test can kill the process mid-write.
_SLOW_WRITE_ENV = "FUNDAMENTALLM_TEST_SLOW_WRITE"
TEMP_PREFIX = ".fundamentallm-tmp-"  # distinct enough that cleaning up never touches a user's own files


class _SlowWriter:
    def __init__(self, raw: BinaryIO, pause: float) -> None:
        self.raw, self.pause = raw, pause
        self._unpaused = 0  # bytes written since the last pause

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self._unpaused += len(data)
        while self._unpaused >= 1 << 16:
            self.raw.flush()
            time.sleep(self.pause)
            self._unpaused -= 1 << 16
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temporary file and rename it to `path` once it is complete and on disk."""
    path = Path(path)
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX + path.name + ".", dir=directory)
    except PermissionError:
        raise UserError(f"cannot write to {directory}: permission denied; choose another directory "
                        f"with -o/--output-dir") from None
    except OSError as exc:
        raise UserError(f"cannot write to {directory}: {exc.strerror}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates 0600; give the file the permissions open() would. Some filesystems (vfat, some
            # network mounts) refuse, and the file is just as good without.
            with contextlib.suppress(OSError):
                os.fchmod(f.fileno(), FILE_MODE)
            pause = float(os.environ.get(_SLOW_WRITE_ENV, "0") or 0)
            write(_SlowWriter(f, pause) if pause > 0 else f)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(directory)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        full = disk_full(exc, path)
        if full is not None:
            raise full from None
        if isinstance(exc, PermissionError):
            raise UserError(f"cannot write {path}: permission denied") from None
        raise


def disk_full(exc: BaseException, path: Path) -> TrainingFailed | None:
    """The error to report when `exc` means the disk (or the file size limit) is full while writing `path`."""
    # torch.save reports a failed write as a RuntimeError ("unexpected pos ..."), with the OSError as its context.
    full = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    cause: BaseException | None = exc
    while cause is not None and not (isinstance(cause, OSError) and cause.errno in full):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    reason = "the file size limit was reached" if cause.errno == errno.EFBIG else "the disk is full"
    return TrainingFailed(f"{reason} while writing {path}; earlier checkpoints are intact. Free some space (or "
                          f"write elsewhere with -o), then resume with --resume auto")


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
