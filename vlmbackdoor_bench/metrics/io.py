"""Reading caption (result) files and reference files for scoring (methods/metrics.md §1, §3, §7).

Caption files (:func:`load_results`):

* COCO results: a JSON list of ``{"image_id": int, "caption": str}``;
* the SRD published format: that list followed by extra lines (a timestamp, metric JSON lines),
  which is not valid JSON as a whole; the list is read with ``json.JSONDecoder().raw_decode``;
* the benchmark's stored form (methods/metrics.md §7): a JSON object ``{image_id: caption}``.

Each image is evaluated exactly once (methods/metrics.md §1): for a repeated image id the first caption is kept.

Reference files (:func:`load_references`), detected from their content:

* COCO annotations (``captions_val2014.json``): ``{"images": [...], "annotations": [{"image_id",
  "caption"}]}``;
* Karpathy (``dataset_coco.json``): ``{"images": [{"split", "sentences": [{"raw"}], "cocoid" |
  "imgid"}]}``, restricted to one split; the image id is ``cocoid`` when present, else ``imgid``;
* a plain mapping ``{image_id: [captions]}`` (e.g. ``coco_karpathy_test_gt_sent.json``).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import VbbError

__all__ = ["load_results", "load_references", "RESULT_FORMATS", "REFERENCE_FORMATS"]

RESULT_FORMATS = (
    'a COCO results list [{"image_id": int, "caption": str}, ...] (optionally followed by extra '
    'lines, as in the SRD published files), or an object {"image_id": "caption", ...}'
)
REFERENCE_FORMATS = (
    'COCO annotations {"images": [...], "annotations": [{"image_id", "caption"}]}, '
    'Karpathy {"images": [{"split", "sentences": [{"raw"}], "cocoid"|"imgid"}]}, '
    'or a mapping {"image_id": ["caption", ...]}'
)


def _read_text(path: Path, what: str, formats: str) -> str:
    path = Path(path)
    if not path.is_file():
        raise VbbError(
            f"{what} file not found: {path}",
            f"pass the path of an existing file in one of these formats: {formats}",
        )
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VbbError(
            f"cannot read {what} file {path}: {exc}",
            f"pass a readable UTF-8 JSON file in one of these formats: {formats}",
        ) from exc


def _bad(path: Path, what: str, detail: str, formats: str) -> VbbError:
    return VbbError(
        f"{what} file {path} is not in a supported format: {detail}", f"expected {formats}"
    )


def _image_id(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"image id {value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise ValueError(f"image id {value!r} is not an integer")


def load_results(path: str | Path) -> dict[int, str]:
    """Captions of a result file as ``{image_id: caption}`` (first caption wins for repeated ids).

    Captions are returned as stored; scoring post-processes them (methods/metrics.md §2).
    """
    path = Path(path)
    what = "captions"
    text = _read_text(path, what, RESULT_FORMATS)
    stripped = text.lstrip()
    try:
        data, _end = json.JSONDecoder().raw_decode(stripped)
    except json.JSONDecodeError as exc:
        raise _bad(path, what, f"no JSON value at its start ({exc})", RESULT_FORMATS) from exc
    out: dict[int, str] = {}
    try:
        if isinstance(data, list):
            for k, item in enumerate(data):
                if not isinstance(item, dict) or "image_id" not in item or "caption" not in item:
                    raise ValueError(f'entry {k} is not an object with "image_id" and "caption"')
                cap = item["caption"]
                if not isinstance(cap, str):
                    raise ValueError(f"entry {k} has a non-string caption {cap!r}")
                out.setdefault(_image_id(item["image_id"]), cap)  # methods/metrics.md §1: evaluated once
        elif isinstance(data, dict):
            for key, cap in data.items():
                if not isinstance(cap, str):
                    raise ValueError(f"the value of {key!r} is not a caption string")
                out.setdefault(_image_id(key), cap)
        else:
            raise ValueError(f"the top-level JSON value is a {type(data).__name__}")
    except ValueError as exc:
        raise _bad(path, what, str(exc), RESULT_FORMATS) from exc
    _warn_repeated(path, [_image_id(item["image_id"]) for item in data] if isinstance(data, list) else [])
    return out


def _warn_repeated(path: Path, ids: list[int]) -> None:
    """Say which image ids a result list repeats: only the first caption of each is scored."""
    counts = Counter(ids)
    repeated = [(i, n) for i, n in counts.items() if n > 1]
    if repeated:
        listed = ", ".join(f"image id {i} ({n} times)" for i, n in repeated[:5])
        warnings.warn(f"{path}: {len(repeated)} image id(s) appear more than once, e.g. {listed}; "
                      "only the first caption of each is scored (methods/metrics.md §1)", stacklevel=2)


def _strings(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{where} is not a list of caption strings")


def load_references(path: str | Path, split: str = "test") -> dict[int, list[str]]:
    """References of a file as ``{image_id: [captions]}``; the format is detected (see module doc).

    ``split`` only applies to the Karpathy format (exact match of each image's ``"split"``).
    """
    path = Path(path)
    what = "references"
    text = _read_text(path, what, REFERENCE_FORMATS)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad(path, what, f"invalid JSON ({exc})", REFERENCE_FORMATS) from exc
    out: dict[int, list[str]] = {}
    try:
        if not isinstance(data, dict):
            raise ValueError(f"the top-level JSON value is a {type(data).__name__}, not an object")
        if "annotations" in data:  # COCO annotation format
            anns = data["annotations"]
            if not isinstance(anns, list):
                raise ValueError('"annotations" is not a list')
            for k, ann in enumerate(anns):
                if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
                    raise ValueError(f'annotation {k} lacks "image_id" or "caption"')
                if not isinstance(ann["caption"], str):
                    raise ValueError(f"annotation {k} has a non-string caption")
                out.setdefault(_image_id(ann["image_id"]), []).append(ann["caption"])
        elif "images" in data:  # Karpathy format
            images = data["images"]
            if not isinstance(images, list):
                raise ValueError('"images" is not a list')
            for k, img in enumerate(images):
                if not isinstance(img, dict) or "sentences" not in img or "split" not in img:
                    raise ValueError(f'image entry {k} lacks "split" or "sentences"')
                if img["split"] != split:
                    continue
                key = img.get("cocoid", img.get("imgid"))
                if key is None:
                    raise ValueError(f'image entry {k} has neither "cocoid" nor "imgid"')
                sents = []
                for s in img["sentences"]:
                    if not isinstance(s, dict) or not isinstance(s.get("raw"), str):
                        raise ValueError(f'a sentence of image entry {k} lacks a "raw" string')
                    sents.append(s["raw"])
                out.setdefault(_image_id(key), []).extend(sents)
            if not out:
                splits = sorted({str(i.get("split")) for i in images if isinstance(i, dict)})
                raise VbbError(
                    f"references file {path} (Karpathy format) has no images in split {split!r}",
                    f"use one of its splits: {', '.join(splits) or 'none found'}",
                )
        else:  # plain mapping
            for key, value in data.items():
                out[_image_id(key)] = _strings(value, f"the value of {key!r}")
    except ValueError as exc:
        raise _bad(path, what, str(exc), REFERENCE_FORMATS) from exc
    if not out:
        raise _bad(path, what, "it contains no references", REFERENCE_FORMATS)
    return out
