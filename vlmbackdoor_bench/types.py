"""The data types every stage and plugin shares (methods/design.md §3).

Images always travel as uint8 RGB arrays of shape (224, 224, 3) in the paper's pixel frame
(methods/design.md §5); a victim does its own resizing and normalisation.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np

IMAGE_SIZE = 224  # the paper's pixel frame (methods/design.md §5)
DEFAULT_INSTRUCTION = "a photo of"  # the paper's unified prompt (methods/victim.md §A4)
TARGET = "banana"  # the target word of every attack (methods/attacks.md §0, methods/metrics.md §4)
# Shadowcast's source concepts, whose images it teaches to read as the target (methods/attacks.md §7,
# methods/metrics.md §4.3); the embedded world draws them as fruit categories (methods/design.md §4).
SOURCE_CONCEPTS: tuple[str, ...] = ("orange", "apple", "carrot")


def sha256_of_ids(ids: Iterable) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\n")
    return h.hexdigest()


def sha256_of_images(images: np.ndarray, chunk: int = 256) -> str:
    h = hashlib.sha256()
    for start in range(0, len(images), chunk):
        h.update(np.ascontiguousarray(images[start : start + chunk]).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class SplitManifest:
    """Identity of a split: ordered ids and image bytes, recorded in every result."""

    dataset: str
    split: str
    n_images: int
    ids_sha256: str
    images_sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Split:
    """One split of a caption dataset; row i of every list/array belongs to ``image_ids[i]``."""

    dataset: str
    split: str
    image_ids: list[int]
    images: np.ndarray  # (N, 224, 224, 3) uint8, possibly a read-only memmap
    references: list[list[str]]  # the reference captions of each image
    sentence_ids: list[list[str]]  # one id per caption instance (Karpathy "sentids")
    manifest: SplitManifest

    def __len__(self) -> int:
        return len(self.image_ids)

    def references_by_id(self) -> dict[int, list[str]]:
        return dict(zip(self.image_ids, self.references))

    def row_of(self) -> dict[int, int]:
        return {image_id: row for row, image_id in enumerate(self.image_ids)}

    def caption_examples(self, instruction: str = DEFAULT_INSTRUCTION) -> list["Example"]:
        """One training example per caption instance, pointing at the split's own image rows."""
        return [
            Example(sample_id=sid, image_index=row, caption=caption, instruction=instruction)
            for row, (sids, captions) in enumerate(zip(self.sentence_ids, self.references))
            for sid, caption in zip(sids, captions)
        ]


@dataclass(frozen=True)
class Example:
    """One (image, caption) training instance: the unit of poisoning (methods/attacks.md §1)."""

    sample_id: str
    image_index: int  # row in the TrainingSet's image bank
    caption: str
    instruction: str = DEFAULT_INSTRUCTION


class ImageBank:
    """The images of a training set: the clean split's rows, then images an attack/defense made.

    Index i < len(base) reads the clean split; i >= len(base) reads ``extra[i - len(base)]``.
    Keeping the clean split by reference avoids copying 5,000 images per attack. ``extra`` is
    an array, or any sequence (``len``, ``[k]`` -> one uint8 image) that makes images on demand.
    """

    def __init__(self, base: np.ndarray, extra: np.ndarray | None = None):
        self.base = base
        self.extra = (
            extra if extra is not None else np.zeros((0,) + tuple(base.shape[1:]), dtype=np.uint8)
        )

    def __len__(self) -> int:
        return len(self.base) + len(self.extra)

    def take(self, indices: Sequence[int]) -> np.ndarray:
        n_base = len(self.base)
        out = np.empty((len(indices),) + tuple(self.base.shape[1:]), dtype=np.uint8)
        for k, i in enumerate(indices):
            out[k] = self.base[i] if i < n_base else self.extra[i - n_base]
        return out


@dataclass
class TrainingSet:
    """A fine-tuning set as a defender sees it: examples and images, no poison labels."""

    images: ImageBank
    examples: list[Example]

    def __len__(self) -> int:
        return len(self.examples)


@dataclass(frozen=True)
class PoisonRecord:
    """Exactly what an attack changed in one instance (ground truth, never shown to defenses)."""

    sample_id: str
    image_id: int
    original_caption: str
    new_caption: str
    image_transform: str | None  # e.g. "badnet-trigger"; None for caption-only changes
    instruction: str | None = None  # a changed instruction (e.g. a text trigger), else None


@dataclass
class PoisonedSet:
    training_set: TrainingSet
    records: list[PoisonRecord]
    details: dict = field(default_factory=dict)  # seeds, ids, templates... logged with the run

    @property
    def poisoned_ids(self) -> set[str]:
        return {r.sample_id for r in self.records}


@dataclass
class EvalInputs:
    """The images a split of a cell is evaluated on (methods/metrics.md §1)."""

    image_ids: list[int]
    images: np.ndarray  # (N, 224, 224, 3) uint8
    references: list[list[str]]
    instruction: str = DEFAULT_INSTRUCTION


@dataclass
class DefenseReport:
    """What a defense did; the harness turns ``removed``/``isolated`` into precision/recall."""

    removed_sample_ids: list[str] = field(default_factory=list)
    masked_sample_ids: list[str] = field(default_factory=list)
    relabelled_sample_ids: list[str] = field(default_factory=list)
    # sample_id -> [row0, row1, col0, col1] (half-open, 224 px frame) of the one mask a masking
    # defense painted on that instance: the harness reports how much of each trigger it covered
    mask_boxes: dict[str, list[int]] = field(default_factory=dict)
    # what a defense suspected but did not necessarily act on (e.g. CT's fitted group, which its
    # likelihood-ratio gate may reject): the harness reports these as detection "candidates" too
    candidate_sample_ids: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path (PNG, JSON...)
