"""vlmbackdoor-bench: backdoor attacks and defenses on vision-language captioning models."""

import os as _os

# Nothing in this package may download at run time (methods/design.md §8).
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"


def __getattr__(name: str):
    """``from vlmbackdoor_bench import hookimpl``, the marker of a plugin's hook implementations
    (hookspecs), imported on first use so that ``import vlmbackdoor_bench`` stays light."""
    if name == "hookimpl":
        from .hookspecs import hookimpl

        return hookimpl
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
