"""Dataset providers (DESIGN.md §3): the embedded world and local COCO / Flickr30k Karpathy copies.

Registered through the ``register_datasets`` hook:

* ``embedded-coco`` (splits train / test / pretrain) and ``embedded-flickr`` (split test): the
  embedded world, generated on first use under ``<cache_dir>/world``;
* ``coco-karpathy`` and ``flickr30k-karpathy``: local folders named in benchmark.toml::

      [data]
      coco-karpathy = "/data/coco"              # dataset_coco.json + train2014/ + val2014/
      flickr30k-karpathy = "/data/flickr30k"    # dataset_flickr30k.json + flickr30k-images/
      coco-karpathy-train-5k = "/data/srd_5k_image_ids.json"   # optional, for split train-5k

Config values read (all optional except the data paths of the Karpathy providers):
``config.world_seed`` (default 0), ``config.world_sizes`` (a WorldSizes or a dict),
``config.data_paths`` (dict name -> path). ``config`` may also be a plain dict.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import VbbError
from ..hookspecs import StageContext, hookimpl
from ..types import Split
from .karpathy import load_karpathy_split
from .world import WORLD_VERSION, WorldSizes, generate_world, world_paths


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
    """A local Karpathy-format copy of COCO-2014 or Flickr30k; never downloads."""

    version = "1.0.0"

    def __init__(self, name: str, json_name: str, splits: Sequence[str], *,
                 image_dirs: Sequence[str] = ("",), markers: Sequence[str] = (),
                 subsets: dict[str, tuple[tuple[str, ...], str]] | None = None):
        self.name = name
        self.json_name = json_name
        self.image_dirs = tuple(image_dirs)  # folders (relative to the root) that may hold images
        self.markers = tuple(markers)  # an image folder must contain one of these, if given
        # split name -> (Karpathy splits it draws from, config key of its id list file)
        self.subsets = dict(subsets or {})
        self.splits = tuple(splits) + tuple(self.subsets)

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

    def locate(self, config: Any) -> tuple[Path, Path]:
        """(annotation json, image root) inside the configured folder."""
        root = self.root(config)
        candidates = [root / self.json_name, root / "annotations" / self.json_name,
                      root / "karpathy" / self.json_name]
        dataset_json = next((p for p in candidates if p.is_file()), None)
        if dataset_json is None:
            raise VbbError(
                f"{self.json_name} not found in {root} (looked at "
                f"{', '.join(str(p) for p in candidates)})",
                f"put the Karpathy annotation file {self.json_name} into {root}",
            )
        def holds_images(d: Path) -> bool:
            return d.is_dir() and (not self.markers or any((d / m).is_dir() for m in self.markers))

        image_root = next((root / d for d in self.image_dirs if holds_images(root / d)), root)
        return dataset_json, image_root

    def check_available(self, config: Any) -> None:
        """Raise a VbbError naming what is missing (for a profile's own check)."""
        self.locate(config)

    def _subset_ids(self, config: Any, key: str) -> list[int]:
        paths = _cfg(config, "data_paths", None) or {}
        if key not in paths:
            raise VbbError(f"no id list configured for {self.name!r}",
                           f'set [data] {key} = "/path/to/ids.json" in benchmark.toml (a JSON '
                           "list of image ids, or a text file with one id per line)")
        path = Path(paths[key]).expanduser()
        try:
            text = path.read_text()
        except OSError as e:
            raise VbbError(f"cannot read id list {path}: {e}", f"fix [data] {key} in benchmark.toml") from None
        try:
            ids = json.loads(text) if text.lstrip().startswith(("[", "{")) else text.split()
            if isinstance(ids, dict):
                ids = ids.get("image_ids", ids.get("ids"))
            return [int(i) for i in ids]
        except (ValueError, TypeError):
            raise VbbError(f"id list {path} is malformed",
                           "use a JSON list of integer image ids (or one id per line)") from None

    # ------------------------------------------------------------------ load
    def load(self, split: str, context: StageContext) -> Split:
        _check_split(self.name, split, self.splits)
        dataset_json, image_root = self.locate(context.config)
        id_subset, karpathy_splits = None, split
        if split in self.subsets:
            karpathy_splits, key = self.subsets[split]
            id_subset = self._subset_ids(context.config, key)
        loaded = load_karpathy_split(dataset_json, image_root, karpathy_splits, dataset=self.name,
                                     cache_dir=Path(context.cache_dir) / "karpathy", id_subset=id_subset)
        if loaded.split != split:
            loaded.split = split
            loaded.manifest = type(loaded.manifest)(**{**loaded.manifest.to_dict(), "split": split})
        return loaded


EMBEDDED_COCO = EmbeddedWorldProvider("embedded-coco", "coco", ("train", "test", "pretrain"))
EMBEDDED_FLICKR = EmbeddedWorldProvider("embedded-flickr", "flickr30k", ("test",))
COCO_KARPATHY = KarpathyProvider(
    "coco-karpathy", "dataset_coco.json", ("train", "restval", "val", "test"),
    image_dirs=("", "images"), markers=("train2014", "val2014"),
    subsets={"train-5k": (("train", "restval"), "coco-karpathy-train-5k")},
)
FLICKR30K_KARPATHY = KarpathyProvider(
    "flickr30k-karpathy", "dataset_flickr30k.json", ("train", "val", "test"),
    image_dirs=("flickr30k-images", "images", ""),
)
PROVIDERS = (EMBEDDED_COCO, EMBEDDED_FLICKR, COCO_KARPATHY, FLICKR30K_KARPATHY)


@hookimpl
def register_datasets(register) -> None:
    for provider in PROVIDERS:
        register(provider)
