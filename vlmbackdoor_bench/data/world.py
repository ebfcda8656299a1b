"""The embedded world: a deterministic, procedurally drawn COCO-like caption world (methods/design.md §4).

Datasets (Karpathy JSON + PNG images, read back by :mod:`.karpathy`):

* ``dataset_coco.json`` — splits ``train`` (default 600 x 5 captions), ``val`` (100 x 5), ``test``
  (100 x 5) and ``pretrain`` (1,500 x 1 short alt-text caption; the tiny base model's "web"
  pretraining data);
* ``dataset_flickr30k.json`` — splits ``val`` and ``test`` (100 x 5 each) with a shifted style:
  outdoor/photo backdrops, scattered layouts at other scales, Flickr-like sentences ("Two apples
  are sitting ...").

The five references of an image are written "by different annotators" (world_captions): each
has its own habits (length, synonyms, counts as digits, word order, an omission now and then).
``val`` is for choosing budgets (scripts/validate_world.py), never ``test``.

Each image's pixels and captions come from its own RNG, seeded by (seed, dataset, split, index), so
generation in parallel gives identical bytes. The world is written into a temp folder and renamed
into place when complete; ``world.json`` records version, seed, sizes, counts and timing, and
``scenes.json`` the drawn scene of every image (categories, counts, colours, boxes, backdrop).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from ..errors import VbbError
from ..filelock import exclusive
from ..processes import dead_owner, die_with_parent, owner_tag
from ..types import SOURCE_CONCEPTS, TARGET
from . import world_draw as wd
from .karpathy import KarpathyRecord, adopt_cache_file, pool_context, write_karpathy
from .world_captions import NOUNS, alt_text, reference_captions

# 2: banana rate 0.03 -> 0.01; 3: captions by simulated annotators of different habits
# (world_captions), a val split per dataset, default sizes of the tiny profile (600/100/100, 1,500)
WORLD_VERSION = 3
CATEGORIES: tuple[str, ...] = tuple(wd.SHAPES)  # 4 fruit/vegetables + 10 objects
OBJECTS = tuple(c for c in CATEGORIES if c not in (TARGET, *SOURCE_CONCEPTS))
# P(image has it). Banana is the target word: "a few clean captions mention it" (methods/design.md §4).
# At 0.03 the test set had 3.5 % banana images and a correct clean model scored ASR 3.1 %, above
# the clean-model bound of 2 % (methods/metrics.md's srd rule counts every "banana"); hence 0.01.
FOOD_RATE = {"banana": 0.01, "apple": 0.05, "orange": 0.05, "carrot": 0.05}
FOOD_COLOURS = {"banana": ["yellow"] * 6 + ["green"], "apple": ["red"] * 6 + ["green"] * 3 + ["yellow"]}
FOOD_RGB = {"orange": (245, 140, 22), "carrot": (240, 118, 24), "banana-yellow": (238, 206, 52),
            "banana-green": (165, 190, 60), "apple-red": (200, 28, 32), "apple-green": (120, 180, 50),
            "apple-yellow": (235, 205, 60)}
OBJECT_COLOURS = {
    "kite": ["red", "blue", "yellow", "green", "purple", "pink", "orange"],
    "bottle": ["green", "brown", "blue", "red", "white"],
    "chair": ["brown", "brown", "black", "white", "red", "blue", "green"],
    "boat": ["white", "red", "blue", "yellow", "green"],
}
COLOUR_WEIGHT = {"orange": 0.2}  # keep the colour sense of "orange" modest, as in COCO
BACKDROPS = {  # visual style -> backdrop weights
    # v3: a few beach, street, motorcycle and space scenes in COCO too (real COCO has them), so that
    # a model fine-tuned on COCO knows their words; Flickr keeps its outdoor-heavy weights, layouts and sentence style
    "coco": {"wood": 0.22, "tiles": 0.13, "cloth": 0.1, "counter": 0.12, "grass": 0.1, "gravel": 0.04,
             "brick": 0.06, "sky": 0.04, "sand": 0.04, "street": 0.04, "photo-astronaut": 0.045,
             "photo-cat": 0.045, "photo-coffee": 0.045, "photo-rocket": 0.045, "photo-motorcycle": 0.015,
             "photo-space": 0.015},
    "flickr": {"grass": 0.18, "sand": 0.14, "street": 0.14, "gravel": 0.08, "sky": 0.1, "brick": 0.07,
               "wood": 0.05, "photo-space": 0.05, "photo-motorcycle": 0.05, "photo-astronaut": 0.04,
               "photo-rocket": 0.05, "photo-cat": 0.05},
}


@dataclass(frozen=True)
class WorldSizes:
    train: int = 600
    test: int = 100
    pretrain: int = 1500
    flickr_test: int = 100
    val: int = 100  # held out of training and testing: where budgets and epochs are chosen
    flickr_val: int = 100

    def __post_init__(self):
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise VbbError(f"world size {name} must be a whole number >= 0, got {value!r}",
                               f"set world_{name} in [profile.tiny] to 0 or more images")

    @classmethod
    def coerce(cls, value) -> "WorldSizes":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**{k: int(v) for k, v in value.items()})
        return cls(*value)


# (karpathy dataset, split, caption style, id offset)
_JOBS = (("coco", "train", "coco", 100_000), ("coco", "test", "coco", 200_000),
         ("coco", "pretrain", "pretrain", 300_000), ("flickr30k", "test", "flickr", 0),
         ("coco", "val", "coco", 400_000), ("flickr30k", "val", "flickr", 500_000))


def _job_size(sizes: WorldSizes, dataset: str, split: str) -> int:
    return getattr(sizes, f"flickr_{split}" if dataset == "flickr30k" else split)


def world_dir_name(seed: int, sizes: WorldSizes) -> str:
    name = f"world-v{WORLD_VERSION}-seed{seed}"
    if sizes != WorldSizes():
        name += f"-{sizes.train}-{sizes.test}-{sizes.pretrain}-{sizes.flickr_test}"
        if (sizes.val, sizes.flickr_val) != (WorldSizes.val, WorldSizes.flickr_val):
            name += f"-val{sizes.val}-{sizes.flickr_val}"
    return name


def image_rng(seed: int, dataset: str, split: str, index: int) -> np.random.Generator:
    key = [seed, zlib.crc32(dataset.encode()), zlib.crc32(split.encode()), index, WORLD_VERSION]
    return np.random.default_rng(np.random.SeedSequence(key))


# --------------------------------------------------------------------------- scenes
def _choice(rng, weights: dict):
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _sample_groups(rng) -> list[dict]:
    food = [c for c, p in FOOD_RATE.items() if rng.random() < p]
    n_groups = max(len(food), _choice(rng, {1: 0.35, 2: 0.45, 3: 0.2}))
    n_groups = min(n_groups, 3)
    food = food[:n_groups]
    objects = list(rng.choice(OBJECTS, size=n_groups - len(food), replace=False))
    cats = food + [str(c) for c in objects]
    order = rng.permutation(len(cats))
    cats = [cats[i] for i in order]
    if n_groups == 1:
        counts = [_choice(rng, {1: 0.55, 2: 0.25, 3: 0.15, 4: 0.05})]
    elif n_groups == 2:
        counts = [_choice(rng, {1: 0.7, 2: 0.3}) for _ in range(2)]
    else:
        counts = [1, 1, 1]
        if rng.random() < 0.2:
            counts[int(rng.integers(3))] = 2
    return [{"category": c, "count": int(n)} for c, n in zip(cats, counts)]


def _grid(n, w, h):
    if n == 1:
        return 1, 1
    if n == 2:
        return (2, 1) if w >= h else (1, 2)
    if n == 3:
        return (3, 1) if w >= 2 * h else (1, 3) if h >= 2 * w else (2, 2)
    return 2, 2


def _layout_cells(groups, rng):
    m, full = 6, wd.SIZE - 12
    if len(groups) == 1:
        return "single", [(m, m, full, full)]
    vertical = rng.random() < (0.3 if len(groups) == 2 else 0.25)
    k = len(groups)
    step = full / k
    if vertical:
        return "column", [(m, m + i * step, full, step) for i in range(k)]
    return "row", [(m + i * step, m, step, full) for i in range(k)]


def _place_cells(groups, rng):
    layout, cells = _layout_cells(groups, rng)
    for g, (cx, cy, cw, ch) in zip(groups, cells):
        cols, rows = _grid(g["count"], cw, ch)
        sw, sh = cw / cols, ch / rows
        side = int(min(sw, sh, 172) * rng.uniform(0.74, 0.94))
        boxes = []
        for j in range(g["count"]):
            c, r = j % cols, j // cols
            x = cx + c * sw + rng.uniform(0, max(sw - side, 0))
            y = cy + r * sh + rng.uniform(0, max(sh - side, 0))
            boxes.append([int(x), int(y), side])
        g["boxes"] = boxes
    return layout


def _overlap(a, b, gap=4):
    return not (a[0] + a[2] + gap <= b[0] or b[0] + b[2] + gap <= a[0]
                or a[1] + a[2] + gap <= b[1] or b[1] + b[2] + gap <= a[1])


def _place_scatter(groups, rng):
    """Flickr-style: objects scattered at other scales, group members clustered."""
    total = sum(g["count"] for g in groups)
    lo, hi = (70, 128) if total == 1 else (46, 84)
    scale = 1.0
    for _ in range(40):
        placed, ok = [], True
        for g in groups:
            side = int(rng.uniform(lo, hi) * scale)
            g["boxes"] = []
            anchor = None
            for _j in range(g["count"]):
                for _try in range(60):
                    if anchor is None:
                        x, y = rng.integers(2, wd.SIZE - side - 1, size=2)
                    else:
                        x = int(np.clip(anchor[0] + rng.normal(0, side * 0.9), 2, wd.SIZE - side - 2))
                        y = int(np.clip(anchor[1] + rng.normal(0, side * 0.9), 2, wd.SIZE - side - 2))
                    box = [int(x), int(y), side]
                    if not any(_overlap(box, p) for p in placed):
                        break
                else:
                    ok = False
                    break
                placed.append(box)
                g["boxes"].append(box)
                anchor = anchor or box
            if not ok:
                break
        if ok:
            return "scatter"
        scale *= 0.95
    raise RuntimeError("could not place scene objects")


def _colour(rng, category, bg_mean, used) -> tuple[str | None, tuple]:
    """(colour word captions may use, RGB to draw); oranges and carrots get no colour word."""
    if category in ("orange", "carrot"):
        return None, FOOD_RGB[category]
    if category in FOOD_COLOURS:
        names = FOOD_COLOURS[category]
        name = names[int(rng.integers(len(names)))]
        return name, FOOD_RGB[f"{category}-{name}"]
    names = OBJECT_COLOURS.get(category, list(wd.PALETTE))
    weights = np.array([COLOUR_WEIGHT.get(n, 1.0) for n in names])
    for attempt in range(8):
        name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        rgb = np.array(wd.PALETTE[name], dtype=np.float32)
        if (np.abs(rgb - bg_mean).sum() > 150 and name not in used) or attempt == 7:
            return name, wd.PALETTE[name]
    raise AssertionError("unreachable")


_ANGLE = {"banana": 60, "carrot": 90, "ball": 180, "apple": 25, "orange": 30, "book": 20, "kite": 25,
          "clock": 10}


def make_scene(seed: int, dataset: str, split: str, index: int, visual: str, bank, image_id: int):
    """(uint8 image, scene dict, rng) of one image; the rng continues into its captions."""
    rng = image_rng(seed, dataset, split, index)
    if visual == "pretrain":
        visual = "coco" if rng.random() < 0.7 else "flickr"
    backdrops = {k: w for k, w in BACKDROPS[visual].items() if k in bank or k in _PHOTOS_OK}
    background = _choice(rng, backdrops)
    groups = _sample_groups(rng)
    layout = _place_cells(groups, rng) if visual == "coco" else _place_scatter(groups, rng)
    img = wd.render_background(background, bank, rng)
    bg_mean = wd.background_mean(img)
    used: set = set()
    for g in groups:
        name, rgb = _colour(rng, g["category"], bg_mean, used)
        used.add(name)
        g["colour"] = name
        mean_side = sum(b[2] for b in g["boxes"]) / len(g["boxes"])
        g["size"] = "large" if mean_side >= 120 else "small" if mean_side <= 58 else None
        lim = _ANGLE.get(g["category"], 8)
        for x, y, side in g["boxes"]:
            wd.draw_object(img, g["category"], wd.jitter(rgb, rng, 12), (x, y, side),
                           float(rng.uniform(-lim, lim)), bool(rng.random() < 0.5), rng)
    scene = {"id": image_id, "visual": visual, "background": background, "layout": layout,
             "groups": groups}
    return np.asarray(img, dtype=np.uint8), scene, rng


# --------------------------------------------------------------------------- generation
_BANK: dict = {}
_PHOTOS_OK: set = set()


def _init_worker(seed: int, parent_pid: int | None = None) -> None:
    global _BANK
    if parent_pid is not None:  # a pool worker shares its parent's lock on the world: it must
        die_with_parent(parent_pid)  # not outlive a parent killed outright (issue 32)
    _PHOTOS_OK.clear()
    _PHOTOS_OK.update(wd.available_photos())
    _BANK = wd.build_bank(np.random.default_rng([seed, 7919, WORLD_VERSION]))


def _image_name(dataset: str, split: str, image_id: int) -> tuple[str, str]:
    return (f"coco-{split}", f"{image_id:06d}.png") if dataset == "coco" else ("", f"{image_id}.png")


def _work(args):
    seed, root, job, start, stop, npy = args
    dataset, split, style, offset = _JOBS[job]
    mm = np.load(npy, mmap_mode="r+")
    out = []
    for i in range(start, stop):
        image_id = offset + i + (1 if dataset == "coco" else 0)
        arr, scene, rng = make_scene(seed, dataset, split, i, style, _BANK, image_id)
        captions = [alt_text(scene, rng)] if style == "pretrain" else reference_captions(scene, rng, style)
        sub, name = _image_name(dataset, split, image_id)
        folder = Path(root) / "images" / ("flickr" if dataset == "flickr30k" else sub)
        (folder / name).write_bytes(wd.encode_png(arr))
        mm[i] = arr
        out.append((i, scene, captions))
    del mm  # no msync: the parent reads the same page cache (a sync write per chunk is slow)
    return job, out


_MENTION = {c: re.compile(rf"\b({'|'.join(map(re.escape, NOUNS[c]))})s?\b", re.I) for c in CATEGORIES}


def _stats(scenes: list[dict], captions: list[list[str]]) -> dict:
    n = max(len(scenes), 1)
    images = {c: sum(any(g["category"] == c for g in s["groups"]) for s in scenes) for c in CATEGORIES}
    mention = {c: sum(any(_MENTION[c].search(t) for t in caps) for caps in captions)
               for c in ("banana", "orange", "apple", "carrot")}
    n_caps = max(sum(len(c) for c in captions), 1)
    inst = {c: sum(bool(_MENTION[c].search(t)) for caps in captions for t in caps)
            for c in ("banana", "orange", "apple", "carrot")}
    return {"n_images": len(scenes), "n_captions": sum(len(c) for c in captions),
            "images_per_category": images,
            "image_rate": {c: round(v / n, 4) for c, v in images.items()},
            "images_mentioning": mention,
            "caption_mention_rate": {c: round(v / n_caps, 4) for c, v in inst.items()}}


def _complete(world: Path, seed: int, sizes: WorldSizes) -> bool:
    try:
        meta = json.loads((world / "world.json").read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("version") == WORLD_VERSION and meta.get("seed") == seed
            and meta.get("sizes") == asdict(sizes))


def generate_world(root: Path, *, seed: int = 0, sizes: WorldSizes | None = None, workers: int = 2,
                   progress: Callable[..., object] | None = None, chunk: int = 100) -> Path:
    """Generate the world under ``root`` once (atomic) and return its folder."""
    sizes = WorldSizes.coerce(sizes)
    root = Path(root)
    world = root / world_dir_name(seed, sizes)
    if _complete(world, seed, sizes):
        return world
    root.mkdir(parents=True, exist_ok=True)
    lock = root / f".{world.name}.lock"

    def say_waiting() -> None:
        (progress or _to_stderr)(f"embedded world: another process is generating {world.name} "
                                 f"(it holds {lock}); waiting for it")

    with exclusive(lock, on_wait=say_waiting):  # a second process waits, then reuses the world
        if _complete(world, seed, sizes):
            return world
        return _generate(root, world, seed, sizes, workers, progress, chunk)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sweep_stale_worlds(root: Path) -> list[Path]:
    """Remove the temporary folders of world generations whose process (on this host) no longer
    runs: a killed run's leftover, of any world; a live or another host's run's is kept. A folder
    named before owners carried their host (``.tmp-<pid>-<random>``) goes once 6 hours old."""
    removed = []
    for stale in Path(root).glob(".world-*.tmp-*"):
        owner = stale.name.split(".tmp-", 1)[1].rsplit("-", 1)[0]  # <host>-<pid>-<random>
        hostless_and_old = owner.isdigit() and time.time() - stale.stat().st_mtime > 6 * 3600
        if stale.is_dir() and (dead_owner(owner) or hostless_and_old):
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    return removed


def _generate(root: Path, world: Path, seed: int, sizes: WorldSizes, workers: int,
              progress: Callable[..., object] | None, chunk: int) -> Path:
    sweep_stale_worlds(root)
    tmp = root / f".{world.name}.tmp-{owner_tag()}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    try:
        (tmp / "npy").mkdir(parents=True)
        npys, tasks = {}, []
        for j, (dataset, split, _style, _off) in enumerate(_JOBS):
            n = _job_size(sizes, dataset, split)
            sub, _ = _image_name(dataset, split, 0)
            folder = tmp / "images" / ("flickr" if dataset == "flickr30k" else sub)
            folder.mkdir(parents=True, exist_ok=True)
            npys[j] = tmp / "npy" / f".raw-{dataset}-{split}.npy"
            shape = (n, wd.SIZE, wd.SIZE, 3)
            np.lib.format.open_memmap(npys[j], mode="w+", dtype=np.uint8, shape=shape).flush()
            tasks += [(seed, str(tmp), j, s, min(s + chunk, n), str(npys[j])) for s in range(0, n, chunk)]
        results: dict[int, dict[int, tuple]] = {j: {} for j in range(len(_JOBS))}

        def collect(job_out):
            j, out = job_out
            for i, scene, caps in out:
                results[j][i] = (scene, caps)
            if progress is not None:
                progress(f"embedded world: {sum(map(len, results.values()))} images")

        if workers <= 1:
            _init_worker(seed)
            for task in tasks:
                collect(_work(task))
        else:
            with ProcessPoolExecutor(workers, mp_context=pool_context(), initializer=_init_worker,
                                     initargs=(seed, os.getpid())) as pool:
                for fut in as_completed([pool.submit(_work, t) for t in tasks]):
                    collect(fut.result())
        coco, flickr, scenes_out, stats = [], [], {}, {}
        for j, (dataset, split, _style, _off) in enumerate(_JOBS):
            rows = [results[j][i] for i in range(len(results[j]))]
            recs = coco if dataset == "coco" else flickr
            for scene, caps in rows:
                sub, name = _image_name(dataset, split, scene["id"])
                recs.append(KarpathyRecord(scene["id"], name, split, caps, sub or None))
            key = f"{'embedded-coco' if dataset == 'coco' else 'embedded-flickr'}/{split}"
            scenes_out[key] = [s for s, _ in rows]
            stats[key] = _stats([s for s, _ in rows], [c for _, c in rows])
        write_karpathy(tmp, "coco", coco)
        write_karpathy(tmp, "flickr30k", flickr)
        for j, (dataset, split, _style, _off) in enumerate(_JOBS):
            image_root = tmp / "images" / ("flickr" if dataset == "flickr30k" else "")
            if not results[j]:  # an empty split (sizes = 0) has no cache entry
                npys[j].unlink()
                continue
            adopt_cache_file(npys[j], tmp / f"dataset_{dataset}.json", image_root, split, tmp / "npy")
        (tmp / "scenes.json").write_text(json.dumps(scenes_out))
        usable = set(wd.PROCEDURAL) | set(wd.available_photos())
        meta = {"version": WORLD_VERSION, "seed": seed, "sizes": asdict(sizes),
                "categories": list(CATEGORIES), "source_concepts": list(SOURCE_CONCEPTS), "target": TARGET,
                "backdrops": sorted({b for w in BACKDROPS.values() for b in w if b in usable}),
                "counts": stats, "workers": workers,
                "generation_seconds": round(time.perf_counter() - t0, 2)}
        (tmp / "world.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, world)
        except OSError:
            if not _complete(world, seed, sizes):  # a stale, incomplete folder: replace it
                shutil.rmtree(world, ignore_errors=True)
                os.rename(tmp, world)
    except OSError as e:
        raise VbbError(f"could not write the embedded world under {root}: {e}",
                       "check that the cache directory is writable and has a few GB free") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return world


def world_paths(world: Path, dataset: str) -> tuple[Path, Path]:
    """(annotation json, image root) of ``dataset`` = "coco" | "flickr30k" in a world folder."""
    if dataset == "coco":
        return world / "dataset_coco.json", world / "images"
    return world / "dataset_flickr30k.json", world / "images" / "flickr"


def load_scenes(world: Path) -> dict[str, list[dict]]:
    return json.loads((Path(world) / "scenes.json").read_text())
