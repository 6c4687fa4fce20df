"""Everything the user reads while a command runs.

Reports (headers, per-epoch metrics, final bar lines) go to stdout so that `| tee training.log` keeps them;
warnings and errors go to stderr. The live progress bar is drawn on stderr only when stderr is a terminal; when it
is not (a log file, CI), progress is written as plain lines to stdout now and then, so a log never fills with
carriage returns. Under torchrun only rank 0 speaks.

A command whose stdout carries data (`evaluate`, `status --json`, the text of `generate`) runs inside
`stdout_carries_data()`: then reports and progress lines go to stderr too, and stdout holds the data alone, so a
script can parse it however long the work takes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

_quiet = False  # set on non-zero ranks
_data_on_stdout = False  # inside stdout_carries_data()
# Test hook: seconds between plain progress lines (default 30), so that a test sees them on a small input.
_PROGRESS_SECONDS_ENV = "FUNDAMENTALLM_TEST_PROGRESS_SECONDS"


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


@contextlib.contextmanager
def stdout_carries_data() -> Iterator[None]:
    """While the block runs, everything but the command's data goes to stderr (see the module's docstring)."""
    global _data_on_stdout
    before, _data_on_stdout = _data_on_stdout, True
    try:
        yield
    finally:
        _data_on_stdout = before


def _report_stream() -> Any:
    return sys.stderr if _data_on_stdout else sys.stdout


def info(message: str = "") -> None:
    if not _quiet:
        print(message, file=_report_stream(), flush=True)


def warn(message: str) -> None:
    if not _quiet:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """1h02m03s, 4m05s or 6s."""
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _stderr_is_terminal() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


_NO_REMAINING = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"


class Progress:
    """A progress bar that looks like tqdm on a terminal and degrades to periodic plain lines in a log."""

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0,
                 log_every_seconds: float = 30.0, unit_scale: bool = False, remaining: bool = True) -> None:
        """remaining=False leaves tqdm's time-remaining estimate out (when the caller shows a better one)."""
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.bar_format = None if remaining else _NO_REMAINING
        self.n = initial
        self.initial = initial
        self.postfix: dict[str, Any] = {}
        self.start = time.perf_counter()
        self._last_line = self.start
        self._log_every = float(os.environ.get(_PROGRESS_SECONDS_ENV) or log_every_seconds)
        self._bar: tqdm | None = None
        if not _quiet and _stderr_is_terminal():
            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=False,
                             dynamic_ncols=True, file=sys.stderr, unit_scale=unit_scale, bar_format=self.bar_format)

    def set_total(self, total: int, desc: str | None = None) -> None:
        self.total, self.desc = total, desc or self.desc
        if self._bar is not None:
            self._bar.total = total
            self._bar.set_description_str(self.desc, refresh=False)
            self._bar.refresh()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif not _quiet and time.perf_counter() - self._last_line >= self._log_every and self.n < self.total:
            self._last_line = time.perf_counter()
            print(self.line(), file=_report_stream(), flush=True)

    def set_postfix(self, values: dict[str, Any] | None = None, **more: Any) -> None:
        values = {**(values or {}), **more}
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def line(self) -> str:
        postfix = ", ".join(f"{k}={v}" for k, v in self.postfix.items()) or None
        return tqdm.format_meter(self.n, self.total, time.perf_counter() - self.start, prefix=self.desc,
                                 unit=self.unit, unit_scale=self.unit_scale, ncols=140, postfix=postfix,
                                 initial=self.initial, bar_format=self.bar_format)

    def close(self, final_line: bool = True) -> None:
        """Remove the live bar and, if asked, leave one permanent line on stdout (stderr when it carries data)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if final_line and not _quiet:
            print(self.line(), file=_report_stream(), flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(final_line=exc[0] is None)
