"""A complete dataset plugin: coloured shapes on a grey background, drawn from a seed.

Guide: docs/guides/adding-a-dataset.md. A dataset provider has a ``name``, a ``version``, the
``splits`` it offers and ``load(split, context)``; a victim profile names it in its
``dataset_sources`` under a benchmark role ("coco" is the role the grid fine-tunes on).
"""

from __future__ import annotations

import numpy as np

from vlmbackdoor_bench import hookimpl
from vlmbackdoor_bench.hookspecs import StageContext
from vlmbackdoor_bench.types import IMAGE_SIZE, Split, SplitManifest, sha256_of_ids, sha256_of_images

__version__ = "1.0.0"

COLOURS = {"red": (200, 30, 30), "green": (30, 160, 40), "blue": (40, 60, 210)}
SHAPES = ("square", "disc")
BACKGROUND = 128  # mid grey
# Images per split. "pretrain" trains the public base model (the grid hands it to the profile's
# build_base) and doubles as the defenders' reserved clean split; "train" is fine-tuned on and
# poisoned; "test" is captioned.
SIZES = {"pretrain": 36, "train": 48, "test": 18}
SPLIT_SEEDS = {"pretrain": 11, "train": 12, "test": 13}  # disjoint draws per split
FIRST_ID = {"pretrain": 0, "train": 1000, "test": 2000}  # image ids never repeat across splits


def draw(colour: str, shape: str, rng: np.random.Generator) -> np.ndarray:
    """One 224x224 RGB uint8 image: the shape (side / diameter 96-120 px) at the centre, with
    per-pixel noise so that no two images are equal."""
    half = int(rng.integers(48, 61))
    rows, cols = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE] - IMAGE_SIZE // 2
    inside = (np.maximum(abs(rows), abs(cols)) < half) if shape == "square" else (rows ** 2 + cols ** 2 < half ** 2)
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BACKGROUND, dtype=np.int16)
    image[inside] = COLOURS[colour]
    image += rng.integers(-12, 13, size=image.shape, dtype=np.int16)
    return image.clip(0, 255).astype(np.uint8)


def references(colour: str, shape: str) -> list[str]:
    return [f"a {colour} {shape} on a grey background", f"a {colour} {shape}"]


class ShapesDataset:
    name = "example-shapes"
    version = __version__
    splits = tuple(SIZES)

    def load(self, split: str, context: StageContext) -> Split:
        """Every split cycles through the six (colour, shape) classes; the draw depends on the
        split's seed and the grid's world seed (``context.config.world_seed``)."""
        rng = np.random.default_rng([SPLIT_SEEDS[split], context.config.world_seed])
        classes = [(c, s) for c in COLOURS for s in SHAPES]
        picked = [classes[i % len(classes)] for i in range(SIZES[split])]
        images = np.stack([draw(c, s, rng) for c, s in picked])
        ids = [FIRST_ID[split] + i for i in range(len(picked))]
        refs = [references(c, s) for c, s in picked]
        manifest = SplitManifest(self.name, split, len(ids), sha256_of_ids(ids), sha256_of_images(images))
        return Split(dataset=self.name, split=split, image_ids=ids, images=images, references=refs,
                     sentence_ids=[[f"{i}-{k}" for k in range(len(r))] for i, r in zip(ids, refs)],
                     manifest=manifest)


@hookimpl
def register_datasets(register) -> None:
    register(ShapesDataset())
