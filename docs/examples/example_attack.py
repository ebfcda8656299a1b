"""A complete attack plugin: a yellow corner patch that makes the victim say the target word.

Guide: docs/guides/adding-an-attack.md. ``poison`` replaces a share of the training instances
by triggered copies whose caption names the target (``types.TARGET``); ``eval_inputs`` gives
the test images with the trigger ("triggered", scored with ASR) and without ("clean").
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from vlmbackdoor_bench import hookimpl
from vlmbackdoor_bench.types import (TARGET, EvalInputs, Example, ImageBank, PoisonRecord,
                                     PoisonedSet, Split, TrainingSet)

__version__ = "1.0.0"


def add_patch(images: np.ndarray, size: int, colour: tuple[int, int, int]) -> np.ndarray:
    """Copies of ``images`` with a ``size`` x ``size`` square of ``colour`` in the bottom-right
    corner."""
    out = np.array(images, dtype=np.uint8, copy=True)
    out[:, -size:, -size:] = colour
    return out


class CornerPatch:
    name = "example-corner-patch"
    version = __version__
    label, order = "Corner patch", 100  # row label and position in the tables
    target = TARGET
    asr_rules = ("srd", "strict")
    presets = {"default": {"patch_size": 28, "colour": [255, 220, 0], "caption": f"a {TARGET}"}}
    default_preset = "default"

    def poison(self, train: Split, *, poison_rate: float, seed: int, params: Mapping[str, Any],
               victim=None) -> PoisonedSet:
        """Pick ``round(poison_rate * n)`` caption instances with the seed; each points at a
        triggered copy of its image (appended to the image bank) and gets the target caption."""
        examples = train.caption_examples()
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(len(examples), size=round(poison_rate * len(examples)), replace=False))
        rows = sorted({examples[i].image_index for i in chosen})
        triggered = add_patch(train.images[rows], params["patch_size"], tuple(params["colour"]))
        extra_row = {row: len(train) + k for k, row in enumerate(rows)}
        records = []
        for i in chosen:
            clean = examples[i]
            examples[i] = Example(clean.sample_id, extra_row[clean.image_index], params["caption"],
                                  clean.instruction)
            records.append(PoisonRecord(clean.sample_id, train.image_ids[clean.image_index],
                                        clean.caption, params["caption"], "corner-patch"))
        return PoisonedSet(TrainingSet(ImageBank(train.images, triggered), examples), records,
                           {"seed": seed, "n_poisoned": len(records)})

    def eval_inputs(self, split: Split, *, kind: str, seed: int,
                    params: Mapping[str, Any]) -> EvalInputs:
        images = split.images if kind == "clean" else add_patch(
            split.images, params["patch_size"], tuple(params["colour"]))
        return EvalInputs(list(split.image_ids), images, split.references)


@hookimpl
def register_attacks(register) -> None:
    register(CornerPatch())
