"""Blended (Chen et al.) adapted to captioning as the SRD code set it up (methods/attacks.md §3).

The paper's key image (hello_kitty.jpeg) cannot ship with the project, so the default key is the
scikit-image logo bundled with scikit-image: a bright cartoon-like graphic on white, as the
Hello Kitty drawing is (mean pixel 200 vs 199), and not one of the embedded world's backdrop
photos (chelsea, astronaut... would make the trigger look like ordinary scenery). ``key_image``
takes a path to use the paper's file (or any other key).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import hookimpl
from vlmbackdoor_bench.types import IMAGE_SIZE, PoisonedSet, Split

from ._common import TriggerAttack, replace_caption

__version__ = "1.0.0"

BUNDLED_KEY = "bundled"  # `key_image` value naming the shipped default key (the scikit-image logo)
CHUNK = 64  # images blended at a time: a float64 blend of 5,000 frames at once takes 6 GB


@functools.lru_cache(maxsize=4)
def key_image(source: str) -> np.ndarray:
    """The 224x224 uint8 RGB key: resized without cropping, bicubic (methods/attacks.md §1, §3)."""
    if source == BUNDLED_KEY:
        from skimage import data  # the logo ships inside the scikit-image wheel: no download

        image = Image.fromarray(data.logo()).convert("RGB")  # fully opaque RGBA -> RGB
    else:
        path = Path(source).expanduser()
        try:
            image = Image.open(path).convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise VbbError(f"Blended key image {source!r} cannot be read ({exc})",
                           f"set key_image in [attack.blended] to a readable image file, or to "
                           f"{BUNDLED_KEY!r} for the bundled key") from exc
    key = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), dtype=np.uint8)
    key.setflags(write=False)  # shared by every caller through the cache
    return key


def blend(images: np.ndarray, key: np.ndarray, alpha: float) -> np.ndarray:
    """x' = (1 - α)·x + α·k in float, clipped to [0, 255], truncated to uint8 (methods/attacks.md §3)."""
    if not 0.0 <= alpha <= 1.0:
        raise VbbError(f"Blended alpha = {alpha} is outside [0, 1]",
                       "set alpha in [attack.blended] to a blend weight such as 0.1")
    out = np.empty(images.shape, dtype=np.uint8)
    for start in range(0, len(images), CHUNK):
        chunk = images[start:start + CHUNK].astype(np.float64)
        out[start:start + CHUNK] = np.clip((1.0 - alpha) * chunk + alpha * key, 0, 255).astype(np.uint8)
    return out


class Blended(TriggerAttack):
    name = "blended"
    label, order = "Blended", 20  # the SRD paper's Table 1 rows
    version = __version__
    default_preset = "srd-code"
    transform_name = "blended-key"
    presets = {
        # methods/attacks.md §3 srd-code: α = 0.1 at training and test time, replace captions, 10 %
        "srd-code": {"alpha": 0.1, "key_image": BUNDLED_KEY, "caption_rule": "replace"},
        # methods/attacks.md §3 original: BackdoorBench's default α = 0.2, replace captions, 10 %
        "original": {"alpha": 0.2, "key_image": BUNDLED_KEY, "caption_rule": "replace"},
    }

    def apply_trigger(self, images: np.ndarray, image_ids, *, params: Mapping[str, Any],
                      seed: int) -> np.ndarray:
        return blend(np.asarray(images), key_image(str(params["key_image"])), float(params["alpha"]))

    def poison_caption(self, caption: str, rng: np.random.Generator, params) -> tuple[str, int]:
        return replace_caption(rng, self.target)

    def poison(self, train: Split, *, poison_rate: float, seed: int, params: Mapping[str, Any],
               victim=None) -> PoisonedSet:
        poisoned = super().poison(train, poison_rate=poison_rate, seed=seed, params=params, victim=victim)
        key = key_image(str(params["key_image"]))  # which key a run used, whatever its path
        poisoned.details["key_image_sha256"] = hashlib.sha256(key.tobytes()).hexdigest()
        return poisoned


@hookimpl
def register_attacks(register) -> None:
    register(Blended())
