"""BadNet (Gu et al.) adapted to captioning as the SRD code set it up (methods/attacks.md §2)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from vlmbackdoor_bench.hookspecs import hookimpl

from ._common import TriggerAttack, replace_caption

__version__ = "1.0.0"

CANVAS = 32  # methods/attacks.md §2: the trigger is drawn on a 32x32 canvas ...
CELLS = (29, 32)  # ... rows/cols 29-31 hold a 3x3 block ...
SCALE = 7  # ... nearest-upscaled x7 -> a 21x21 patch at rows/cols 203-223 of the 224 frame


def trigger_and_mask(pattern: str) -> tuple[np.ndarray, np.ndarray]:
    """The 224x224x3 trigger and mask of methods/attacks.md §2.

    ``checkerboard`` (srd-code): cell (i, j) is 255 where i + j is even, else 1 (near-black).
    ``white`` (original, BackdoorBench): the whole 3x3 block is 255.
    """
    canvas = np.zeros((CANVAS, CANVAS, 3), dtype=np.uint8)
    mask = np.zeros((CANVAS, CANVAS, 3), dtype=np.uint8)
    lo, hi = CELLS
    for i in range(lo, hi):
        for j in range(lo, hi):
            if pattern == "checkerboard":
                canvas[i, j] = 255 if (i - lo + j - lo) % 2 == 0 else 1
            elif pattern == "white":
                canvas[i, j] = 255
            else:
                raise ValueError(f"unknown BadNet pattern {pattern!r}: use 'checkerboard' or 'white'")
            mask[i, j] = 255
    upscale = lambda a: a.repeat(SCALE, axis=0).repeat(SCALE, axis=1)  # nearest interpolation
    return upscale(canvas), upscale(mask)


class BadNet(TriggerAttack):
    name = "badnet"
    label, order = "BadNet", 10  # the SRD paper's Table 1 rows
    version = __version__
    default_preset = "srd-code"
    transform_name = "badnet-patch"
    presets = {
        # methods/attacks.md §2 srd-code: checkerboard 255/1, replace captions, 10 %
        "srd-code": {"pattern": "checkerboard", "caption_rule": "replace"},
        # methods/attacks.md §2 original: all-white square, all-to-one relabelling -> replace
        "original": {"pattern": "white", "caption_rule": "replace"},
    }

    def apply_trigger(self, images: np.ndarray, image_ids, *, params: Mapping[str, Any],
                      seed: int) -> np.ndarray:
        """Replacement, no blending: x' = trigger where mask > 0, else x (methods/attacks.md §2)."""
        trigger, mask = trigger_and_mask(params["pattern"])
        out = np.array(images, dtype=np.uint8, copy=True)
        out[:, mask > 0] = trigger[mask > 0]
        return out

    def poison_caption(self, caption: str, rng: np.random.Generator, params) -> tuple[str, int]:
        return replace_caption(rng, self.target)


@hookimpl
def register_attacks(register) -> None:
    register(BadNet())
