"""vlmbackdoor-bench: backdoor attacks and defenses on vision-language captioning models."""

import os as _os

# Nothing in this package may download at run time (DESIGN.md §8).
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"
