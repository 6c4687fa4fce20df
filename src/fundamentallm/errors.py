"""The one exception type users see.

Everything that is the user's to fix (a bad flag, a missing file, a corrupt checkpoint, a model that does not
fit in memory) is raised as a `UserError`. The CLI prints its message as a single line on stderr and exits with
its code, without a traceback. Anything else is a bug in FundamentaLLM and is reported as one.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; `str(error)` names the problem and the fix."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class TrainingFailed(UserError):
    """Training started but could not go on (NaN loss, out of memory, full disk)."""

    exit_code = 1
