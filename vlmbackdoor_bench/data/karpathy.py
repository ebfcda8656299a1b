"""Caption datasets in Karpathy JSON format (COCO, Flickr30k, and the embedded world's export).

A Karpathy ``dataset_*.json`` file is ``{"dataset": "coco" | "flickr30k", "images": [record, ...]}``
with one record per image::

    {"filepath": "val2014",            # optional (COCO only): sub-folder of the image root
     "filename": "COCO_val2014_000000391895.jpg",
     "imgid": 0, "cocoid": 391895,     # image id = cocoid when present, else imgid
     "split": "train" | "restval" | "val" | "test",
     "sentids": [0, 1, ...],
     "sentences": [{"raw": "...", "tokens": [...], "sentid": 0, "imgid": 0}, ...]}

Images are opened with PIL, converted to RGB and resized to exactly 224x224 with bicubic
interpolation and no crop (methods/attacks.md §1). The decoded uint8 array of a selection is cached as
an ``.npy`` file keyed by the annotation file's sha256, the selected splits and ids and the size and
mtime of every image file, and memory-mapped read-only on later loads.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from ..atomic import write_text_atomic
from ..errors import VbbError
from ..types import IMAGE_SIZE, Split, SplitManifest, sha256_of_ids, sha256_of_images

CACHE_VERSION = 1
RESAMPLE = Image.Resampling.BICUBIC
_PARALLEL_MIN = 64  # below this many images decode in-process
_LAYOUT = (
    "expected a Karpathy annotation file (e.g. dataset_coco.json) and images at "
    "<image_root>/<filepath>/<filename> (COCO: <root>/train2014/..., <root>/val2014/...; "
    "Flickr30k: <image_root>/<filename>)"
)

__all__ = [
    "KarpathyRecord",
    "adopt_cache_file",
    "cache_file_for",
    "decode_image",
    "image_path",
    "load_karpathy_split",
    "load_records",
    "read_karpathy_json",
    "write_karpathy",
]


# --------------------------------------------------------------------------- reading
def read_karpathy_json(dataset_json: Path) -> tuple[dict, str]:
    """Parse and validate a Karpathy file; returns (document, sha256 of its bytes)."""
    dataset_json = Path(dataset_json)
    if not dataset_json.is_file():
        where = "is a directory, not a file" if dataset_json.is_dir() else "does not exist"
        raise VbbError(
            f"Karpathy annotation file {dataset_json} {where}",
            f"point the dataset at the folder holding it; {_LAYOUT}",
        )
    raw = dataset_json.read_bytes()
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VbbError(
            f"malformed JSON in Karpathy annotation file {dataset_json}: {e}",
            "re-download or re-export the file (it must be the Karpathy dataset_*.json)",
        ) from None
    problems = _validate(doc)
    if problems:
        more = f" (and {len(problems) - 5} more problems)" if len(problems) > 5 else ""
        raise VbbError(
            f"malformed Karpathy annotation file {dataset_json}: " + "; ".join(problems[:5]) + more,
            'each entry of "images" needs "filename", "split", "imgid" (or "cocoid") and '
            '"sentences" (a list of {"raw", "sentid"}); re-export the file',
        )
    return doc, hashlib.sha256(raw).hexdigest()


def _validate(doc) -> list[str]:
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        return ['top level must be an object with an "images" list']
    problems: list[str] = []
    for i, rec in enumerate(doc["images"]):
        where = f"images[{i}]"
        if not isinstance(rec, dict):
            problems.append(f"{where} is not an object")
            continue
        if isinstance(rec.get("filename"), str):
            where += f" ({rec['filename']})"
        for key, kind in (("filename", str), ("split", str), ("sentences", list)):
            if not isinstance(rec.get(key), kind):
                problems.append(f"{where}: missing or invalid key {key!r}")
        if not isinstance(rec.get("cocoid", rec.get("imgid")), int):
            problems.append(f"{where}: missing integer 'imgid' / 'cocoid'")
        if "filepath" in rec and not isinstance(rec["filepath"], str):
            problems.append(f"{where}: 'filepath' must be a string")
        sentences = rec.get("sentences")
        if isinstance(sentences, list):
            if not sentences:
                problems.append(f"{where}: no sentences")
            for j, s in enumerate(sentences):
                if not (isinstance(s, dict) and isinstance(s.get("raw"), str) and "sentid" in s):
                    problems.append(f"{where}: sentences[{j}] needs 'raw' (string) and 'sentid'")
        if len(problems) > 50:
            break
    return problems


def _image_id(rec: dict) -> int:
    return int(rec["cocoid"]) if "cocoid" in rec else int(rec["imgid"])


def image_path(image_root: Path, rec: dict) -> Path:
    """Where a Karpathy record's image lives under ``image_root``."""
    return image_root / rec["filepath"] / rec["filename"] if rec.get("filepath") else (
        image_root / rec["filename"]
    )


@dataclass
class _Selection:
    splits: tuple[str, ...]
    records: list[dict]
    paths: list[Path]
    key: str


def _select(doc: dict, json_sha: str, dataset_json: Path, image_root: Path, split,
            id_subset: Sequence[int] | None) -> _Selection:
    splits = (split,) if isinstance(split, str) else tuple(split)
    present = sorted({rec["split"] for rec in doc["images"]})
    unknown = [s for s in splits if s not in present]
    if not splits or unknown:
        raise VbbError(
            f"unknown split {', '.join(map(repr, unknown)) or '(none given)'} in {dataset_json}",
            f"use one of the splits present: {', '.join(present) or '(the file has no images)'}",
        )
    records = [rec for rec in doc["images"] if rec["split"] in splits]
    subset_key = "all"
    if id_subset is not None:
        wanted = list(dict.fromkeys(int(i) for i in id_subset))
        wanted_set = set(wanted)
        have = {_image_id(r) for r in records}
        missing = [i for i in wanted if i not in have]
        if missing:
            raise VbbError(
                f"{len(missing)} ids of the id subset are not in split {'+'.join(splits)} of "
                f"{dataset_json} (e.g. {missing[:5]})",
                "check the id list: it must hold image ids (cocoid, else imgid) of that split",
            )
        records = [r for r in records if _image_id(r) in wanted_set]
        subset_key = sha256_of_ids(sorted(wanted_set))
    if not records:
        raise VbbError(
            f"split {'+'.join(splits)} of {dataset_json} is empty",
            "choose a split (or id subset) that selects at least one image",
        )
    ids = [_image_id(r) for r in records]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise VbbError(
            f"duplicate image ids {dup} in split {'+'.join(splits)} of {dataset_json}",
            "each image record needs a unique cocoid (COCO) or imgid; re-export the file",
        )
    paths = [image_path(image_root, r) for r in records]
    h = hashlib.sha256(
        f"karpathy-cache-v{CACHE_VERSION}|{IMAGE_SIZE}|bicubic|{json_sha}|{'+'.join(splits)}|"
        f"{subset_key}\n".encode()
    )
    for rec, path in zip(records, paths):
        try:
            st = path.stat()
        except OSError:
            raise VbbError(
                f"image file {path} (listed in {dataset_json.name}) is missing",
                f"put the images under {image_root}; {_LAYOUT}",
            ) from None
        rel = f"{rec.get('filepath', '')}/{rec['filename']}"
        h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return _Selection(splits, records, paths, h.hexdigest())


# --------------------------------------------------------------------------- decoding
def pool_context():
    """Worker processes: fork where available (no re-import of ``__main__``, instant start; the
    workers use only numpy/PIL), else spawn."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def decode_image(path: Path) -> np.ndarray:
    """Open an image file as RGB and resize it to 224x224 (bicubic, no crop); uint8 HWC."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                im = im.resize((IMAGE_SIZE, IMAGE_SIZE), RESAMPLE)
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise VbbError(f"image file {path} is missing", f"restore the file; {_LAYOUT}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise VbbError(
            f"cannot decode image file {path}: {e}",
            "the file is corrupt or not an image; replace it with the original (re-extract the "
            "dataset archive)",
        ) from None


def _decode_rows(out: str | None, start: int, paths: list[str]):
    """Worker: decode ``paths`` into rows ``start..`` of the npy at ``out`` (or return them)."""
    try:
        arr = np.stack([decode_image(Path(p)) for p in paths])
    except VbbError as e:
        return ("error", e.problem, e.fix)
    if out is None:
        return ("rows", start, arr)
    mm = np.load(out, mmap_mode="r+")
    mm[start : start + len(arr)] = arr
    del mm  # shared page cache: the parent sees the rows without a (slow) msync
    return ("ok", start, None)


def _decode_all(paths: list[Path], out_npy: Path | None, workers: int) -> np.ndarray | None:
    n = len(paths)
    target = None
    if out_npy is not None:
        target = np.lib.format.open_memmap(
            out_npy, mode="w+", dtype=np.uint8, shape=(n, IMAGE_SIZE, IMAGE_SIZE, 3)
        )
    else:
        target = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    if workers <= 1 or n < _PARALLEL_MIN:
        for i, p in enumerate(paths):
            target[i] = decode_image(p)
    else:
        chunk = max(16, min(256, n // (workers * 8) + 1))
        if out_npy is not None:
            target.flush()
        with ProcessPoolExecutor(max_workers=workers, mp_context=pool_context()) as pool:
            futures = [
                pool.submit(_decode_rows, str(out_npy) if out_npy is not None else None, s,
                            [str(p) for p in paths[s : s + chunk]])
                for s in range(0, n, chunk)
            ]
            for fut in futures:
                kind, a, b = fut.result()
                if kind == "error":
                    for f in futures:
                        f.cancel()
                    raise VbbError(a, b)
                if kind == "rows":
                    target[a : a + len(b)] = b
    if out_npy is not None:
        target.flush()
        del target
        return None
    return target


# --------------------------------------------------------------------------- cache
def _cache_file(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"karpathy-{key[:32]}.npy"


def _read_cache(path: Path, n: int) -> tuple[np.ndarray, str] | None:
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        return None
    try:
        images = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if images.shape != (n, IMAGE_SIZE, IMAGE_SIZE, 3) or images.dtype != np.uint8:
        return None
    try:
        meta = json.loads(meta_path.read_text())
        digest = meta["images_sha256"]
        if meta.get("n_images") != n:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        digest = sha256_of_images(images)
        _write_meta(meta_path, n, digest)
    return images, digest


def _write_meta(meta_path: Path, n: int, digest: str) -> None:
    write_text_atomic(meta_path, json.dumps({"n_images": n, "images_sha256": digest,
                                             "cache_version": CACHE_VERSION}))


def _install(tmp_npy: Path, final: Path, n: int) -> str:
    """Hash a fully written temp npy, then move it (and its metadata) into place atomically."""
    images = np.load(tmp_npy, mmap_mode="r")
    digest = sha256_of_images(images)
    del images
    os.replace(tmp_npy, final)
    _write_meta(final.with_suffix(".json"), n, digest)
    return digest


def cache_file_for(dataset_json: Path, image_root: Path, split: str | Sequence[str],
                   cache_dir: Path, id_subset: Sequence[int] | None = None) -> Path:
    """Where :func:`load_karpathy_split` caches the decoded images of this selection."""
    doc, sha = read_karpathy_json(dataset_json)
    sel = _select(doc, sha, Path(dataset_json), Path(image_root), split, id_subset)
    return _cache_file(cache_dir, sel.key)


def adopt_cache_file(src_npy: Path, dataset_json: Path, image_root: Path,
                     split: str | Sequence[str], cache_dir: Path,
                     id_subset: Sequence[int] | None = None) -> Path:
    """Install an npy of already decoded images (e.g. written by the world generator) as the
    loader's cache of this selection. The caller guarantees the bytes equal the decode."""
    final = cache_file_for(dataset_json, image_root, split, cache_dir, id_subset)
    n = np.load(src_npy, mmap_mode="r").shape[0]
    _install(Path(src_npy), final, n)
    return final


# --------------------------------------------------------------------------- public loader
def load_karpathy_split(
    dataset_json: Path,
    image_root: Path,
    split: str | Sequence[str],
    *,
    dataset: str,
    cache_dir: Path | None,
    id_subset: Sequence[int] | None = None,
    workers: int | None = None,
) -> Split:
    """Load one split (or the union of several, e.g. ``("train", "restval")``) as a :class:`Split`.

    Rows keep the annotation file's order. ``id_subset`` keeps only those image ids.
    ``cache_dir=None`` decodes into memory without caching.
    """
    dataset_json, image_root = Path(dataset_json), Path(image_root)
    doc, json_sha = read_karpathy_json(dataset_json)
    return load_records(doc, json_sha, dataset_json, image_root, split, dataset=dataset,
                        cache_dir=cache_dir, id_subset=id_subset, workers=workers)


def _check_image_root(image_root: Path) -> None:
    if not image_root.is_dir():
        raise VbbError(
            f"image directory {image_root} does not exist",
            f"create it or point the dataset at the right folder; {_LAYOUT}",
        )


def load_records(doc: dict, source_sha: str, source: Path, image_root: Path,
                 split: str | Sequence[str], *, dataset: str, cache_dir: Path | None,
                 id_subset: Sequence[int] | None = None, workers: int | None = None) -> Split:
    """:func:`load_karpathy_split` on an already parsed, validated Karpathy-shaped ``doc``;
    ``source_sha`` identifies its content in the image cache key and ``source`` names it in
    errors (data/coco_captions.py builds such a doc from COCO annotation ids)."""
    _check_image_root(image_root)
    sel = _select(doc, source_sha, source, image_root, split, id_subset)
    n = len(sel.records)
    if workers is None:
        workers = min(2, os.cpu_count() or 1)

    if cache_dir is None:
        images = _decode_all(sel.paths, None, workers)
        digest = sha256_of_images(images)
    else:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        final = _cache_file(cache_dir, sel.key)
        cached = _read_cache(final, n)
        if cached is None:
            fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-", suffix=".npy")
            os.close(fd)
            try:
                _decode_all(sel.paths, Path(tmp), workers)
                _install(Path(tmp), final, n)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            cached = _read_cache(final, n)
            assert cached is not None
        images, digest = cached

    image_ids = [_image_id(r) for r in sel.records]
    references = [[s["raw"] for s in r["sentences"]] for r in sel.records]
    sentence_ids = [[str(s["sentid"]) for s in r["sentences"]] for r in sel.records]
    split_name = "+".join(sel.splits)
    manifest = SplitManifest(
        dataset=dataset, split=split_name, n_images=n,
        ids_sha256=sha256_of_ids(image_ids), images_sha256=digest,
    )
    return Split(dataset=dataset, split=split_name, image_ids=image_ids, images=images,
                 references=references, sentence_ids=sentence_ids, manifest=manifest)


# --------------------------------------------------------------------------- writing
@dataclass
class KarpathyRecord:
    """One image of a Karpathy export. ``image_id`` becomes ``cocoid`` for COCO-style files
    (``imgid`` is then the running index) and ``imgid`` otherwise."""

    image_id: int
    filename: str
    split: str
    captions: list[str]
    filepath: str | None = None
    extra: dict = field(default_factory=dict)


def tokenize(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", caption.lower())


def write_karpathy(out_dir: Path, dataset_name: str, records: Iterable[KarpathyRecord], *,
                   json_name: str | None = None, use_cocoid: bool | None = None) -> Path:
    """Write ``dataset_<name>.json`` (atomically) in Karpathy format; returns its path.

    Sentence ids run from 0 over the file. ``use_cocoid`` defaults to ``dataset_name == "coco"``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    use_cocoid = dataset_name == "coco" if use_cocoid is None else use_cocoid
    images, sentid = [], 0
    for imgid, rec in enumerate(records):
        row_imgid = imgid if use_cocoid else int(rec.image_id)
        sentences = []
        for raw in rec.captions:
            sentences.append({"tokens": tokenize(raw), "raw": raw, "imgid": row_imgid,
                              "sentid": sentid})
            sentid += 1
        entry: dict = {}
        if rec.filepath:
            entry["filepath"] = rec.filepath
        entry.update({"sentids": [s["sentid"] for s in sentences], "filename": rec.filename,
                      "imgid": row_imgid, "split": rec.split, "sentences": sentences})
        if use_cocoid:
            entry["cocoid"] = int(rec.image_id)
        entry.update(rec.extra)
        images.append(entry)
    path = out_dir / (json_name or f"dataset_{dataset_name}.json")
    return write_text_atomic(path, json.dumps({"images": images, "dataset": dataset_name}))
