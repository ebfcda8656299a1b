"""The COCO-2014 fine-tuning subset defined by COCO annotation ids (methods/victim.md §A3).

The SRD code's "5k" subset is a JSON list of COCO *annotation* ids (one per caption instance,
25,015 for 5,000 images; the published file holds them as strings). An annotation id names one
caption of ``annotations/captions_train2014.json``, which is in the COCO annotation format::

    {"images": [{"id": 391895, "file_name": "COCO_train2014_000000391895.jpg", ...}, ...],
     "annotations": [{"id": 770337, "image_id": 391895, "caption": "A man ..."}, ...]}

So the subset's instances are exactly the listed (image, caption) pairs: an image's references
are its listed captions only (COCO images have 5-7 captions; the list may hold fewer of them), its
pixels come from ``train2014/<file_name>``. Rows follow the first appearance of each image in the
list, captions the list's order; a caption's sentence id is its annotation id.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from ..errors import VbbError
from ..types import Split, sha256_of_ids
from .karpathy import load_records

IMAGE_FOLDER = "train2014"  # methods/victim.md §A3: "Images are read from COCO train2014"

__all__ = ["IMAGE_FOLDER", "annotation_subset_doc", "load_annotation_subset", "read_annotation_ids",
           "read_coco_captions"]


def read_coco_captions(path: Path) -> tuple[dict, str]:
    """Parse and validate a COCO caption annotation file; returns (document, sha256 of its bytes)."""
    path = Path(path)
    if not path.is_file():
        raise VbbError(f"COCO caption annotation file {path} does not exist",
                       "put COCO-2014's captions_train2014.json (from annotations_trainval2014.zip) "
                       f"at {path}")
    raw = path.read_bytes()
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VbbError(f"malformed JSON in COCO caption annotation file {path}: {e}",
                       "re-extract captions_train2014.json from annotations_trainval2014.zip") from None
    if not (isinstance(doc, dict) and isinstance(doc.get("images"), list)
            and isinstance(doc.get("annotations"), list)):
        raise VbbError(f"{path} is not a COCO caption annotation file (it needs top-level "
                       '"images" and "annotations" lists)',
                       "use captions_train2014.json from annotations_trainval2014.zip")
    bad = [i for i, a in enumerate(doc["annotations"])
           if not (isinstance(a, dict) and isinstance(a.get("id"), int)
                   and isinstance(a.get("image_id"), int) and isinstance(a.get("caption"), str))]
    bad_images = [i for i, im in enumerate(doc["images"])
                  if not (isinstance(im, dict) and isinstance(im.get("id"), int)
                          and isinstance(im.get("file_name"), str))]
    if bad or bad_images:
        where = [f"annotations[{i}]" for i in bad[:3]] + [f"images[{i}]" for i in bad_images[:3]]
        raise VbbError(f"malformed COCO caption annotation file {path}: {', '.join(where)} "
                       f"({len(bad) + len(bad_images)} entries) lack integer ids, a caption or a "
                       "file_name", "re-extract captions_train2014.json")
    return doc, hashlib.sha256(raw).hexdigest()


def read_annotation_ids(path: Path) -> list[int]:
    """A JSON list of COCO annotation ids (integers or digit strings, as the SRD code's files)."""
    path = Path(path)
    fix = ("it must be a JSON list of COCO annotation ids, like the SRD code's "
           "poison_ids/coco-5k-1-random.json (e.g. [\"240496\", \"205386\", ...])")
    try:
        ids = json.loads(path.read_text())
    except OSError as e:
        raise VbbError(f"cannot read the annotation id list {path}: {e.strerror or e}",
                       f"put the file there or fix its path; {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VbbError(f"malformed JSON in the annotation id list {path}: {e}", fix) from None
    try:
        if not isinstance(ids, list) or any(isinstance(i, (bool, float)) for i in ids):
            raise ValueError
        ids = [int(i) for i in ids]
    except (TypeError, ValueError):
        raise VbbError(f"the annotation id list {path} is not a list of integer ids", fix) from None
    if not ids:
        raise VbbError(f"the annotation id list {path} is empty", fix)
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise VbbError(f"the annotation id list {path} repeats ids {dup}",
                       "each caption instance must be listed once")
    return ids


def annotation_subset_doc(captions: dict, annotation_ids: Sequence[int], *, split: str,
                          source: Path) -> dict:
    """A Karpathy-shaped document (one record per image, split ``split``) holding exactly the
    listed captions; unknown ids -> one VbbError (saying when they look like image ids)."""
    by_id = {a["id"]: a for a in captions["annotations"]}
    missing = [i for i in annotation_ids if i not in by_id]
    if missing:
        image_ids = {im["id"] for im in captions["images"]}
        hint = (" (they match image ids: the list must hold annotation ids, one per caption)"
                if all(i in image_ids for i in missing) else "")
        raise VbbError(f"{len(missing)} of {len(annotation_ids)} annotation ids are not in {source}"
                       f"{hint} (e.g. {missing[:5]})",
                       "use the id list that belongs to COCO-2014's captions_train2014.json")
    files = {im["id"]: im["file_name"] for im in captions["images"]}
    records: dict[int, dict] = {}
    for ann_id in annotation_ids:
        ann = by_id[ann_id]
        image_id = ann["image_id"]
        if image_id not in files:
            raise VbbError(f"annotation {ann_id} of {source} points at image {image_id}, which its "
                           '"images" list lacks', "re-extract captions_train2014.json")
        rec = records.setdefault(image_id, {"filepath": IMAGE_FOLDER, "filename": files[image_id],
                                            "cocoid": image_id, "split": split, "sentences": []})
        rec["sentences"].append({"raw": ann["caption"], "sentid": ann_id})
    return {"images": list(records.values())}


def load_annotation_subset(captions_json: Path, image_root: Path, ids_file: Path, *, dataset: str,
                           split: str, cache_dir: Path | None) -> Split:
    """The (image, caption) instances listed in ``ids_file`` as a :class:`Split` named ``split``;
    images at ``<image_root>/train2014/<file_name>``, decoded and cached like Karpathy splits."""
    captions, captions_sha = read_coco_captions(captions_json)
    annotation_ids = read_annotation_ids(ids_file)
    doc = annotation_subset_doc(captions, annotation_ids, split=split, source=Path(captions_json))
    # the image cache key: the annotation file's bytes and the ordered id list
    source_sha = hashlib.sha256(f"{captions_sha}|{sha256_of_ids(annotation_ids)}".encode()).hexdigest()
    return load_records(doc, source_sha, Path(captions_json), Path(image_root), split,
                        dataset=dataset, cache_dir=cache_dir)
