"""How stage outputs are written to and read from store entries (no pickle, methods/design.md §8)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import VbbError
from ..types import DefenseReport, Example, ImageBank, PoisonRecord, PoisonedSet, Split, TrainingSet
from .store import write_json_atomic


def clean_training_set(train: Split) -> TrainingSet:
    return TrainingSet(ImageBank(train.images), train.caption_examples())


def save_poisoned(poisoned: PoisonedSet, directory: Path) -> None:
    directory = Path(directory)
    np.save(directory / "extra_images.npy", poisoned.training_set.images.extra)
    write_json_atomic(directory / "examples.json",
                      [[e.sample_id, e.image_index, e.caption, e.instruction]
                       for e in poisoned.training_set.examples])
    write_json_atomic(directory / "records.json", [asdict(r) for r in poisoned.records])
    write_json_atomic(directory / "poisoned_ids.json", sorted(poisoned.poisoned_ids))
    write_json_atomic(directory / "details.json", poisoned.details)


def load_poisoned(directory: Path, train: Split) -> PoisonedSet:
    directory = Path(directory)
    extra = np.load(directory / "extra_images.npy", mmap_mode="r")
    examples = [Example(*row) for row in json.loads((directory / "examples.json").read_text())]
    records = [PoisonRecord(**r) for r in json.loads((directory / "records.json").read_text())]
    if any(e.image_index >= len(train) + len(extra) for e in examples):
        raise VbbError(f"poisoned set {directory} does not match the training split",
                       "delete this store entry and rerun `vbb run`")
    details = json.loads((directory / "details.json").read_text())
    return PoisonedSet(TrainingSet(ImageBank(train.images, extra), examples), records, details)


def report_to_dict(report: DefenseReport) -> dict:
    return asdict(report)


def read_captions(directory: Path) -> dict[int, str]:
    data = json.loads((Path(directory) / "captions.json").read_text())
    return {int(k): v for k, v in data.items()}


def detection(report: dict, poisoned_ids: set[str]) -> dict:
    """Precision/recall of the samples a defense removed or relabelled, against the poison set,
    and of its ``candidates`` (what it suspected, e.g. a group its own gate rejected) if any.

    The harness holds the ground truth; the defense only reports what it flagged (methods/design.md §3).
    """
    flagged = set(report.get("removed_sample_ids", [])) | set(report.get("relabelled_sample_ids", []))
    out = _precision_recall(flagged, poisoned_ids, "n_flagged")
    if report.get("candidate_sample_ids"):
        out["candidates"] = _precision_recall(set(report["candidate_sample_ids"]), poisoned_ids, "n_candidates")
    return out


def _precision_recall(chosen: set[str], poisoned_ids: set[str], count_name: str) -> dict:
    hits = len(chosen & poisoned_ids)
    return {
        "precision": 100.0 * hits / len(chosen) if chosen else None,
        "recall": 100.0 * hits / len(poisoned_ids) if poisoned_ids else None,
        count_name: len(chosen), "n_poisoned": len(poisoned_ids), "n_true_positive": hits,
    }


def trigger_coverage(mask_boxes: dict, poisoned: PoisonedSet, train: Split) -> dict | None:
    """How much of each poisoned instance's image trigger a masking defense's box covered.

    The trigger is what the attack changed: |poisoned - clean| summed over channels, per pixel
    (a patch is its square, a blend or PGD perturbation the whole frame); an instance's coverage
    is the share of that change inside its mask box. None when no box or no image trigger exists.
    """
    row_of_id = {image_id: row for row, image_id in enumerate(train.image_ids)}
    example_of = {e.sample_id: e for e in poisoned.training_set.examples}
    coverage = []
    for record in poisoned.records:
        box = mask_boxes.get(record.sample_id)
        if box is None or record.image_transform is None or record.sample_id not in example_of:
            continue
        image = poisoned.training_set.images.take([example_of[record.sample_id].image_index])[0]
        change = np.abs(image.astype(np.int16) - train.images[row_of_id[record.image_id]]).sum(-1)
        total = float(change.sum())
        if total > 0:
            row0, row1, col0, col1 = (int(v) for v in box)
            coverage.append(float(change[row0:row1, col0:col1].sum()) / total)
    if not coverage:
        return None
    coverage = np.asarray(coverage)
    return {"n_triggered": int(len(coverage)), "mean_coverage": 100.0 * float(coverage.mean()),
            "share_touched": 100.0 * float((coverage > 0).mean()),
            "share_half_covered": 100.0 * float((coverage >= 0.5).mean())}
