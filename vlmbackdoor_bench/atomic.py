"""Writing a file whole or not at all (methods/design.md §6: a killed run loses only what it was building)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write UTF-8 ``text`` (``\\n`` line ends) to ``path`` through a temporary sibling renamed
    into place: a reader sees the old file or the new one, never part of it. The temporary file
    (``.<name>.<random>.tmp``) is removed if anything fails, and the error propagates."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
