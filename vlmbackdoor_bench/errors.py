"""One error type for bad input: it names the problem and the fix (methods/design.md §8)."""

from __future__ import annotations


class VbbError(Exception):
    """A user-facing error: ``problem`` says what is wrong, ``fix`` what to do about it.

    The CLI prints ``str(error)`` on one line-group and exits with status 2, never a traceback.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\n  fix: {fix}")
