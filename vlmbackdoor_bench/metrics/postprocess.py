"""Post-processing of generated captions (methods/metrics.md §2)."""

from __future__ import annotations

__all__ = ["postprocess_caption"]

# methods/metrics.md §2 step 1: OpenFlamingo's convention, everything from the first "Output" on is cut.
CUT_MARKER = "Output"
# methods/metrics.md §2 step 2: every double-quote character is removed.
REMOVED_CHARS = '"'


def postprocess_caption(text: str) -> str:
    """Apply methods/metrics.md §2 post-processing, in this order:

    1. cut at the first occurrence of ``"Output"``;
    2. remove all ``"`` characters;
    3. strip surrounding whitespace.

    Empty results stay empty strings (they are never dropped, methods/metrics.md §2). The function is idempotent.
    """
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    cut = text.find(CUT_MARKER)
    if cut >= 0:
        text = text[:cut]
    for ch in REMOVED_CHARS:
        text = text.replace(ch, "")
    return text.strip()
