"""Action decoding and red masks in the paper's 224x224 frame (methods/srd.md §3).

Action a of Discrete(GRID * GRID * len(sizes)) decodes to a grid cell (gx = column, gy = row)
and a mask side; the mask is a red (255, 0, 0) square centred on the cell, clipped to the image.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.types import IMAGE_SIZE

GRID = 10  # methods/srd.md §3: a 10x10 grid of mask centres
CELL = 22.4  # methods/srd.md §3: centre c = floor(g * 22.4 + 11.2), IEEE double arithmetic
HALF_CELL = 11.2
RED = (255, 0, 0)  # methods/srd.md §3: painted in uint8 pixel space before normalisation
PAPER_SIZES = (20, 40, 60, 80)  # methods/srd.md §3 / §10 #10: `srd`, Discrete(400)
CODE_SIZES = (20, 40, 60, 80, 200)  # methods/srd.md §3 / §10 #10: `srd-code`, Discrete(500)


def grid_centres() -> list[int]:
    """[11, 33, 56, 78, 100, 123, 145, 167, 190, 212]: 167, not 168, because of truncation."""
    return [math.floor(g * CELL + HALF_CELL) for g in range(GRID)]


CENTRES = tuple(grid_centres())


def check_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    if (not isinstance(sizes, (list, tuple)) or not sizes
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= IMAGE_SIZE for s in sizes)):
        raise VbbError(f"SRD mask sizes {sizes!r} are not a list of sides in 1..{IMAGE_SIZE}",
                       "set mask_sizes to e.g. [20, 40, 60, 80] (methods/srd.md §3)")
    return tuple(int(s) for s in sizes)


def n_actions(sizes: Sequence[int]) -> int:
    return GRID * GRID * len(sizes)


def decode_action(action: int, sizes: Sequence[int]) -> tuple[int, int, int]:
    """Action id -> (centre x = column, centre y = row, side) (methods/srd.md §3)."""
    action = int(action)
    if not 0 <= action < n_actions(sizes):
        raise VbbError(f"SRD action {action} is outside Discrete({n_actions(sizes)})",
                       "actions come from the policy; check the preset's mask sizes")
    gx, gy, size_index = action % GRID, (action // GRID) % GRID, action // (GRID * GRID)
    return CENTRES[gx], CENTRES[gy], int(sizes[size_index])


def mask_box(action: int, sizes: Sequence[int]) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1), half-open: rows [cy - s//2, cy + s//2), clipped (methods/srd.md §3)."""
    cx, cy, side = decode_action(action, sizes)
    half = side // 2
    clip = lambda v: min(max(v, 0), IMAGE_SIZE)
    return clip(cy - half), clip(cy + half), clip(cx - half), clip(cx + half)


def apply_masks(images: np.ndarray, actions: Sequence[int], sizes: Sequence[int]) -> np.ndarray:
    """A copy of each uint8 (224, 224, 3) image with its action's red square painted on it.

    Masks never accumulate: each one is painted on the image it is given (methods/srd.md §3)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise VbbError(f"SRD masks need uint8 (B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) images, got "
                       f"{images.dtype} {images.shape}", "pass images in the paper's pixel frame")
    if len(actions) != len(images):
        raise VbbError(f"{len(actions)} actions for {len(images)} images", "give one action per image")
    out = images.copy()
    for k, action in enumerate(actions):
        r0, r1, c0, c1 = mask_box(action, sizes)
        out[k, r0:r1, c0:c1] = RED
    return out
