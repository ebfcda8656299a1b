"""An exclusive lock between processes on one host (POSIX ``flock``), for outputs that several
processes may need at once: the first builds, the others wait and then reuse what it wrote.

The kernel drops the lock when its holder exits, killed or not, so a crashed build never leaves
the others waiting. Lock files are empty and stay in place (deleting one while another process
waits on it would let a third take a second lock on a new file)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def exclusive(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock on ``path`` (created if missing); ``on_wait()`` runs once if another process
    holds it, before waiting for it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent builds stay safe (atomic renames), just wasteful
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
