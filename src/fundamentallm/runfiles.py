"""The files of a run directory: every name once, and the rules for starting a run in a directory.

No torch here, so that `status`, `plot` and `sweep` can read a run's directory without loading it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from fundamentallm.errors import UserError
from fundamentallm.files import file_kind, remove_stale_temporaries, why_unwritable

CONFIG = "config.yaml"  # the resolved configuration
METRICS = "metrics.jsonl"  # one JSON record per log interval and evaluation
PLOT = "training.png"  # the run's curves, drawn when it finishes
TENSORBOARD = "tensorboard"  # event files, with --tensorboard
BEST = "best_model.pt"  # weights only, at the lowest validation loss
FINAL = "final_model.pt"
INTERRUPTED = "interrupted.pt"
LR_FIND_CSV = "lr_find.csv"  # the range test's output (train --learning-rate auto puts it in the run directory)
LR_FIND_PLOT = "lr_find.png"
RUN_FILES = (CONFIG, METRICS, BEST, FINAL, INTERRUPTED, PLOT)
_PERIODIC = re.compile(r"^checkpoint_epoch_(\d+)\.pt$")


def periodic_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch}.pt"


def periodic_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every checkpoint_epoch_N.pt in `directory`, oldest first."""
    found = []
    for p in Path(directory).glob("checkpoint_epoch_*.pt"):
        match = _PERIODIC.match(p.name)
        if match:
            found.append((int(match.group(1)), p))
    return sorted(found)


def resumable_files(directory: Path) -> list[Path]:
    """The files of a run that may hold a training state: periodic checkpoints, interrupted.pt, final_model.pt."""
    directory = Path(directory)
    candidates = [p for _, p in periodic_checkpoints(directory)]
    return candidates + [p for p in (directory / INTERRUPTED, directory / FINAL) if p.exists()]


def prune_periodic(directory: Path, keep_last_n: int) -> None:
    """Keep the newest `keep_last_n` checkpoint_epoch_N.pt files (0 keeps all)."""
    if keep_last_n <= 0:
        return
    for _, path in periodic_checkpoints(directory)[:-keep_last_n]:
        path.unlink(missing_ok=True)


def check_output_dir(output_dir: Path, resume_path: Path | None, overwrite: bool) -> list[str]:
    """Refuse to mix two runs in one directory unless --resume or --overwrite says what to do; returns the
    files of an earlier run there. Nothing is created or removed yet, so a later error leaves all as it was.

    Resuming from a checkpoint inside the directory continues that run there; resuming from one elsewhere
    branches a new run off it, which needs a directory without a run of its own."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"-o {output_dir} is a file, not a directory")
    existing = [name for name in RUN_FILES if (output_dir / name).exists()]
    existing += [p.name for _, p in periodic_checkpoints(output_dir)]
    in_place = resume_path is not None and resume_path.resolve().parent == output_dir.resolve()
    if existing and resume_path is not None and not in_place:
        raise UserError(f"{output_dir} already holds another run ({', '.join(sorted(existing)[:4])}); to branch "
                        f"off {resume_path}, give an -o/--output-dir without a run in it")
    if existing and resume_path is None and not overwrite:
        raise UserError(f"{output_dir} already holds a run ({', '.join(sorted(existing)[:4])}); continue it "
                        f"with --resume auto, replace it with --overwrite, or choose another -o/--output-dir")
    parent = output_dir
    while not parent.exists():
        parent = parent.parent
    reason = why_unwritable(parent)
    if reason is not None:
        raise UserError(f"cannot write to {parent}: {reason}; choose another -o/--output-dir")
    return existing


def start_output_dir(output_dir: Path, earlier_run: list[str], resume: bool) -> None:
    """Create the directory; with --overwrite, remove the earlier run's files only now that the new run starts."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {output_dir}: {exc.strerror}") from None
    remove_stale_temporaries(output_dir)  # left by a process killed while saving
    if not resume:
        for name in earlier_run:
            (output_dir / name).unlink(missing_ok=True)
        shutil.rmtree(output_dir / TENSORBOARD, ignore_errors=True)


def check_export_dir(out: Path, source: Path, overwrite: bool) -> Path:
    """The directory `export -o OUT` writes, links and `.`/`..` resolved (a symlinked -o exports into the directory
    it points to and stays a link), once nothing of the user's can be lost: refused when it is a file or lies
    under one, when it is the current directory or one above it, when --overwrite would replace a training run
    or the checkpoint being exported, and when its parent cannot be written. Nothing is created yet."""
    try:
        target = Path(out).resolve()
    except (OSError, RuntimeError) as exc:  # a loop of symbolic links
        raise UserError(f"-o {out} cannot be resolved ({exc}); give a plain directory path") from None
    if target.exists() and not target.is_dir():
        raise UserError(f"-o {out} is a file; give a directory to export into")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"-o {out}: {parent} is a file, not a directory; choose another -o")
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents or target == target.parent:
        raise UserError(f"-o {out} is the current directory or one above it, which an export never replaces; "
                        f"give a directory of its own, e.g. -o exported")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise UserError(f"-o {out} is not empty; choose a new directory or add --overwrite to replace it")
        source = Path(source).resolve()
        if target == source or target in source.parents:
            raise UserError(f"-o {out} holds {source.name}, the checkpoint being exported; --overwrite would delete "
                            f"it: choose another directory")
        run = [name for name in (*RUN_FILES, LOCK) if (target / name).exists()] + \
            [p.name for _, p in periodic_checkpoints(target)]
        if run:
            raise UserError(f"-o {out} is a training run's directory ({', '.join(sorted(run)[:3])}); --overwrite "
                            f"would delete the run: choose another directory")
    reason = why_unwritable(parent)
    if reason is not None:
        raise UserError(f"cannot write to {parent}: {reason}; choose another -o")
    return target


# ----------------------------------------------------------------------------------------------------------
# One live process per run directory


LOCK = ".fundamentallm.lock"  # while a process holds the directory: its pid and command


@contextlib.contextmanager
def hold(directory: Path) -> Iterator[None]:
    """Hold `directory` for this process while the block runs: another train, resume, overwrite or sweep into it
    is refused, naming this process. The lock is the operating system's (flock), so it dies with the process: a
    killed run never leaves a stale lock behind (at most a lock file that nobody holds). A directory this creates
    is removed again if the block fails while it is still empty."""
    directory = Path(directory).resolve()
    created = not directory.exists()
    fd = _acquire(directory)
    try:
        yield
    except BaseException:
        if created and {p.name for p in directory.iterdir()} <= {LOCK}:
            _release(directory, fd)
            fd = -1
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    finally:
        if fd >= 0:
            _release(directory, fd)


def _acquire(directory: Path) -> int:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"-o {directory} is a file, not a directory") from None
    except OSError as exc:
        raise UserError(f"cannot write to {directory}: {exc.strerror}; choose another -o/--output-dir") from None
    path = directory / LOCK
    for attempt in range(40):  # `status` takes the lock for a moment to look: wait that out
        fd = _open_lock(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            if attempt == 39:
                raise UserError(f"{directory} is in use by a running FundamentaLLM process ({holder}); wait for "
                                f"it to finish or stop it first, or choose another -o/--output-dir") from None
            time.sleep(0.05)
            continue
        # The holder before us removes the file when it lets go: a lock on a file no longer at `path` holds nothing.
        if os.path.lexists(path) and os.lstat(path).st_ino == os.fstat(fd).st_ino:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}: {shlex.join(sys.argv)}\n".encode())
            return fd
        os.close(fd)
    raise UserError(f"could not lock {directory}; try again")


def _open_lock(path: Path, flags: int) -> int:
    """The lock file opened with `flags`: never through a symbolic link (whose target the pid would overwrite),
    never blocking, and only a regular file (a FIFO or a device in its place is refused by name)."""
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fix = "remove it (it is not FundamentaLLM's) or choose another -o/--output-dir"
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if os.path.islink(path):  # O_NOFOLLOW's ELOOP
            raise UserError(f"{path} is a symbolic link, not the lock file FundamentaLLM writes; {fix}") from None
        if isinstance(exc, IsADirectoryError):
            raise UserError(f"{path} is a directory, not the lock file FundamentaLLM writes; {fix}") from None
        raise UserError(f"cannot write to {path.parent}: {exc.strerror}; choose another -o/--output-dir") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UserError(f"{path} is {file_kind(mode)}, not the lock file FundamentaLLM writes; {fix}")
    return fd


def _release(directory: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        (directory / LOCK).unlink()  # while still locked: the next holder then locks a file of its own
    os.close(fd)


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    return text[:300] or "pid unknown"


def live_holder(directory: Path) -> str | None:
    """'pid N: command' of the live process holding `directory`, or None when no process holds it."""
    try:
        fd = _open_lock(Path(directory) / LOCK, os.O_RDONLY)
    except UserError:  # absent, or not a lock of ours: nobody holds the directory through it
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)
    return None
