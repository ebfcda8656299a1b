"""Dataset providers (methods/design.md §3): the embedded world and local COCO / Flickr30k Karpathy copies.

Registered through the ``register_datasets`` hook:

* ``embedded-coco`` (splits train / val / test / pretrain) and ``embedded-flickr`` (val / test): the
  embedded world, generated on first use under ``<cache_dir>/world``;
* ``coco-karpathy`` and ``flickr30k-karpathy``: local folders named in benchmark.toml::

      [data]
      coco-karpathy = "/data/coco"    # dataset_coco.json, train2014/, val2014/,
                                      # annotations/captions_train2014.json
      coco-karpathy-train-5k = "/data/coco/coco-5k-1-random.json"  # annotation ids (split train)
      flickr30k-karpathy = "/data/flickr30k"    # dataset_flickr30k.json + flickr30k-images/

Config values read (all optional except the data paths of the Karpathy providers):
``config.world_seed`` (default 0), ``config.world_sizes`` (a WorldSizes or a dict),
``config.data_paths`` (dict name -> path). ``config`` may also be a plain dict.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import VbbError
from ..hookspecs import StageContext, hookimpl
from ..types import Split
from .coco_captions import (
    annotation_subset_doc, load_annotation_subset, read_annotation_ids, read_coco_captions,
)
from .karpathy import load_karpathy_split
from .world import CATEGORIES, WORLD_VERSION, WorldSizes, generate_world, world_paths
from .world_captions import NOUNS


def _cfg(config: Any, key: str, default=None):
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _check_split(name: str, split: str, splits: Sequence[str]) -> None:
    if split not in splits:
        raise VbbError(f"dataset {name!r} has no split {split!r}",
                       f"use one of: {', '.join(splits)}")


class EmbeddedWorldProvider:
    """One dataset of the embedded world (``karpathy`` = "coco" or "flickr30k" inside it)."""

    version = f"{WORLD_VERSION}.0.0"

    def __init__(self, name: str, karpathy: str, splits: Sequence[str]):
        self.name = name
        self.karpathy = karpathy
        self.splits = tuple(splits)
        # Each category and the nouns the world's captions use for it: the entity lexicon a
        # defense receives as DefenseContext.lexicon (VDC's questions, methods/defenses.md §4).
        self.lexicon = {category: list(NOUNS[category]) for category in CATEGORIES}

    def world(self, context: StageContext) -> Path:
        """The world folder, generated now if needed (once per seed and sizes)."""
        seed = int(_cfg(context.config, "world_seed", 0) or 0)
        sizes = WorldSizes.coerce(_cfg(context.config, "world_sizes", None))
        progress = None
        if context.progress is not None:
            progress = lambda message: context.progress(message)  # noqa: E731
        return generate_world(Path(context.cache_dir) / "world", seed=seed, sizes=sizes,
                              workers=min(2, os.cpu_count() or 1), progress=progress)

    def load(self, split: str, context: StageContext) -> Split:
        _check_split(self.name, split, self.splits)
        world = self.world(context)
        dataset_json, image_root = world_paths(world, self.karpathy)
        return load_karpathy_split(dataset_json, image_root, split, dataset=self.name,
                                   cache_dir=world / "npy")


class KarpathyProvider:
    """A local Karpathy-format copy of Flickr30k (or any Karpathy dataset); never downloads."""

    version = "1.0.0"

    def __init__(self, name: str, json_name: str, splits: Sequence[str], *,
                 image_dirs: Sequence[str] = ("",), markers: Sequence[str] = ()):
        self.name = name
        self.json_name = json_name
        self.image_dirs = tuple(image_dirs)  # folders (relative to the root) that may hold images
        self.markers = tuple(markers)  # an image folder must contain all of these, if given
        self.splits = tuple(splits)

    # ------------------------------------------------------------------ paths
    def root(self, config: Any) -> Path:
        paths = _cfg(config, "data_paths", None) or {}
        if self.name not in paths:
            raise VbbError(
                f"no local folder configured for dataset {self.name!r}",
                f'set it in benchmark.toml: [data] {self.name} = "/path/to/folder" (holding '
                f"{self.json_name} and the images); nothing is downloaded",
            )
        root = Path(paths[self.name]).expanduser()
        if not root.is_dir():
            raise VbbError(
                f"dataset folder {root} for {self.name!r} does not exist",
                f"fix [data] {self.name} in benchmark.toml; the folder must hold {self.json_name} "
                f"(or annotations/{self.json_name}) and the images",
            )
        return root

    def _json_candidates(self, root: Path) -> list[Path]:
        return [root / self.json_name, root / "annotations" / self.json_name,
                root / "karpathy" / self.json_name]

    def _image_root(self, root: Path) -> Path | None:
        def holds_images(d: Path) -> bool:
            return d.is_dir() and all((d / m).is_dir() for m in self.markers)

        return next((root / d for d in self.image_dirs if holds_images(root / d)), None)

    def _missing_karpathy(self, root: Path) -> list[str]:
        """What Karpathy's splits need and ``root`` lacks, one line per file or folder."""
        missing = []
        if not any(p.is_file() for p in self._json_candidates(root)):
            missing.append(f"the Karpathy annotation file {root / self.json_name}")
        if self._image_root(root) is None:
            where = " or ".join(str(root / d) for d in self.image_dirs)
            missing.append(f"the image folder(s) {' + '.join(self.markers) or 'of the images'} in {where}")
        return missing

    def missing_files(self, config: Any) -> list[str]:
        """Everything the dataset's splits need and the configured folder lacks."""
        return self._missing_karpathy(self.root(config))

    def _refuse(self, missing: list[str]) -> None:
        if missing:
            raise VbbError(f"dataset {self.name!r} is incomplete: missing " + "; ".join(missing),
                           f"provision them under [data] {self.name} of benchmark.toml (README, "
                           '"Running the paper\'s grid on a GPU"); nothing is downloaded')

    def check_available(self, config: Any) -> None:
        """One VbbError naming every file or folder the dataset needs and lacks."""
        self._refuse(self.missing_files(config))

    def locate(self, config: Any) -> tuple[Path, Path]:
        """(annotation json, image root) inside the configured folder."""
        root = self.root(config)
        self._refuse(self._missing_karpathy(root))
        dataset_json = next(p for p in self._json_candidates(root) if p.is_file())
        return dataset_json, self._image_root(root)

    # ------------------------------------------------------------------ load
    def load(self, split: str, context: StageContext) -> Split:
        _check_split(self.name, split, self.splits)
        dataset_json, image_root = self.locate(context.config)
        return load_karpathy_split(dataset_json, image_root, split, dataset=self.name,
                                   cache_dir=Path(context.cache_dir) / "karpathy")


class CocoKarpathyProvider(KarpathyProvider):
    """COCO-2014 as the paper uses it (methods/victim.md §A3): split ``train`` is the fine-tuning
    subset, the caption instances named by the COCO annotation ids of the id list under
    ``[data] coco-karpathy-train-5k`` (read through ``annotations/captions_train2014.json``, images
    from ``train2014/``); ``test`` / ``val`` / ``restval`` are Karpathy's splits of
    ``dataset_coco.json``. ``restval`` (val2014 images) is the defenders' reserved clean set and is
    checked to share no image with the fine-tuning subset."""

    CAPTIONS = "captions_train2014.json"
    IDS_KEY = "coco-karpathy-train-5k"

    def __init__(self):
        super().__init__("coco-karpathy", "dataset_coco.json", ("train", "restval", "val", "test"),
                         image_dirs=("", "images"), markers=("train2014", "val2014"))

    def _captions_candidates(self, root: Path) -> list[Path]:
        return [root / "annotations" / self.CAPTIONS, root / self.CAPTIONS]

    def ids_file(self, config: Any) -> Path:
        paths = _cfg(config, "data_paths", None) or {}
        if self.IDS_KEY not in paths:
            raise VbbError(
                f"no fine-tuning id list configured for {self.name!r}",
                f'set [data] {self.IDS_KEY} = "/path/to/coco-5k-1-random.json" in benchmark.toml: '
                "the SRD code's JSON list of the 25,015 COCO annotation ids of its 5k subset",
            )
        return Path(paths[self.IDS_KEY]).expanduser()

    def missing_files(self, config: Any) -> list[str]:
        missing = super().missing_files(config)
        root = self.root(config)
        if not any(p.is_file() for p in self._captions_candidates(root)):
            missing.append(f"the COCO caption annotations {self._captions_candidates(root)[0]}")
        paths = _cfg(config, "data_paths", None) or {}
        if self.IDS_KEY not in paths:
            missing.append(f"the fine-tuning annotation id list ([data] {self.IDS_KEY} is not set)")
        elif not self.ids_file(config).is_file():
            missing.append(f"the annotation id list {self.ids_file(config)} ([data] {self.IDS_KEY})")
        return missing

    def _captions_file(self, config: Any) -> Path:
        candidates = self._captions_candidates(self.root(config))
        return next((p for p in candidates if p.is_file()), candidates[0])  # absent: the reader names it

    def fine_tuning_split(self, context: StageContext) -> Split:
        _, image_root = self.locate(context.config)
        return load_annotation_subset(self._captions_file(context.config), image_root,
                                      self.ids_file(context.config), dataset=self.name, split="train",
                                      cache_dir=Path(context.cache_dir) / "karpathy")

    def fine_tuning_image_ids(self, config: Any) -> set[int]:
        """The images of the fine-tuning subset, without decoding them."""
        path = self._captions_file(config)
        doc = annotation_subset_doc(read_coco_captions(path)[0], read_annotation_ids(self.ids_file(config)),
                                    split="train", source=path)
        return {rec["cocoid"] for rec in doc["images"]}

    def load(self, split: str, context: StageContext) -> Split:
        _check_split(self.name, split, self.splits)
        if split == "train":
            return self.fine_tuning_split(context)
        loaded = super().load(split, context)
        if split == "restval":
            shared = set(loaded.image_ids) & self.fine_tuning_image_ids(context.config)
            if shared:
                raise VbbError(
                    f"the reserved clean split restval shares {len(shared)} images with the "
                    f"fine-tuning subset (e.g. {sorted(shared)[:5]})",
                    f"the id list [data] {self.IDS_KEY} must name train2014 captions only, and "
                    "dataset_coco.json must be Karpathy's file (restval = val2014 images)")
        return loaded


EMBEDDED_COCO = EmbeddedWorldProvider("embedded-coco", "coco", ("train", "val", "test", "pretrain"))
EMBEDDED_FLICKR = EmbeddedWorldProvider("embedded-flickr", "flickr30k", ("val", "test"))
COCO_KARPATHY = CocoKarpathyProvider()
FLICKR30K_KARPATHY = KarpathyProvider(
    "flickr30k-karpathy", "dataset_flickr30k.json", ("train", "val", "test"),
    image_dirs=("flickr30k-images", "images", ""),
)
PROVIDERS = (EMBEDDED_COCO, EMBEDDED_FLICKR, COCO_KARPATHY, FLICKR30K_KARPATHY)


@hookimpl
def register_datasets(register) -> None:
    for provider in PROVIDERS:
        register(provider)
