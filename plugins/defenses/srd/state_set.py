"""Stage 1: the defender's data, the custom poisoned state set and the surrogate's training set
(methods/srd.md §1).

`srd`: 3,000 images drawn with a seed, one caption each, one 20x20 N(128, 20²) patch drawn once
and stamped at one top-left position drawn once, "banana" inserted into the caption (the insert
rule of methods/attacks.md §1). `srd-code`: every caption instance, each image with a fresh VLOOD
noise trigger (methods/attacks.md §5), captions unused, each instance's own prompt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.types import DEFAULT_INSTRUCTION, Example, ImageBank, TrainingSet, sha256_of_images
from vlmbackdoor_bench_plugins.attacks._common import TARGET, insert_caption, replace_caption
from vlmbackdoor_bench_plugins.attacks.vlood import LAST_OFFSET, NOISE_MEAN, NOISE_SIGMA, PATCH, trigger_draw

STATE_SALT = 0x5D5  # separates the state-set draws from the attack's draws made with the same seed


@dataclass
class DefenderData:
    """The clean fine-tuning images and their caption instances, as the defender builds its
    surrogate from them (methods/srd.md §1: "the clean fine-tuning set")."""

    images: np.ndarray
    examples: list[Example]
    image_ids: list[int]
    source: str
    fingerprint: str = ""


def defender_data(context) -> DefenderData:
    """The clean split from ``context.extras["clean_split"]`` when the grid passes it; otherwise
    the defender's own training set restricted to the instances on the clean split's rows
    (``training_set.images.base``), i.e. the clean split without the instances an attack replaced.
    """
    split = context.extras.get("clean_split") if isinstance(context.extras, dict) else None
    if split is not None:
        data = DefenderData(np.asarray(split.images), split.caption_examples(), list(split.image_ids),
                            "clean_split")
    else:
        bank = context.training_set.images
        n_base = len(bank.base)
        examples = [e for e in context.training_set.examples if e.image_index < n_base]
        data = DefenderData(bank.base, examples, list(range(n_base)), "training_set_base_rows")
    if not data.examples:
        raise VbbError("SRD found no caption instances on the clean fine-tuning images",
                       "give the defense a training set whose examples use the split's images")
    h = hashlib.sha256(sha256_of_images(data.images).encode())
    h.update(json.dumps([[e.sample_id, e.image_index, e.caption, e.instruction] for e in data.examples]).encode())
    data.fingerprint = h.hexdigest()
    return data


@dataclass
class StateSet:
    """State images rendered on demand: ``rows[i]`` of ``source`` with trigger ``triggers[i]``."""

    source: np.ndarray
    rows: list[int]
    triggers: list[tuple[int, int, np.ndarray]]  # (top, left, patch) per state
    prompts: list[str]
    details: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def images(self, indices) -> np.ndarray:
        out = np.array(self.source[[self.rows[i] for i in indices]], dtype=np.uint8, copy=True)
        for k, i in enumerate(indices):
            top, left, patch = self.triggers[i]
            out[k, top:top + PATCH, left:left + PATCH] = patch  # replacement, no blending (methods/srd.md §1)
        return out


def fixed_noise_trigger(rng: np.random.Generator) -> tuple[int, int, np.ndarray]:
    """methods/srd.md §1: the patch N(128, 20²) per sub-pixel, clipped, uint8, drawn once; its
    top-left drawn once uniformly from {0..204}² and fixed for the whole set."""
    patch = np.clip(rng.normal(NOISE_MEAN, NOISE_SIGMA, (PATCH, PATCH, 3)), 0, 255).astype(np.uint8)
    top, left = (int(v) for v in rng.integers(0, LAST_OFFSET + 1, size=2))
    return top, left, patch


CAPTION_RULES = ("insert", "replace")  # methods/attacks.md §1 rules the surrogate's captions may follow


def paper_state_set(data: DefenderData, size: int, seed: int,
                    caption_rule: str = "insert") -> tuple[StateSet, TrainingSet]:
    """methods/srd.md §1 `srd`: the custom poisoned set and the surrogate's training set, in which
    the custom instances replace their clean versions; their captions follow ``caption_rule``
    (`insert`, the paper's; `replace` on the tiny profile, methods/srd.md §1.1)."""
    if caption_rule not in CAPTION_RULES:
        raise VbbError(f"SRD surrogate caption rule {caption_rule!r} is unknown",
                       f"set surrogate_caption_rule to one of {', '.join(CAPTION_RULES)}")
    rng = np.random.default_rng([seed, STATE_SALT])
    by_row: dict[int, list[int]] = {}
    for k, e in enumerate(data.examples):
        by_row.setdefault(e.image_index, []).append(k)
    rows_available = sorted(by_row)
    size = min(int(size), len(rows_available))
    rows = sorted(int(r) for r in rng.choice(rows_available, size, replace=False))
    chosen = [by_row[r][int(rng.integers(len(by_row[r])))] for r in rows]
    top, left, patch = fixed_noise_trigger(rng)
    states = StateSet(data.images, rows, [(top, left, patch)] * size, [DEFAULT_INSTRUCTION] * size,
                      {"kind": "paper", "n_states": size, "trigger_top_left": [top, left],
                       "patch_mean": float(patch.mean()), "target": TARGET})
    triggered = states.images(range(size))
    examples = list(data.examples)
    for k, instance in enumerate(chosen):
        original = examples[instance]
        if caption_rule == "insert":
            caption, _ = insert_caption(original.caption, rng, TARGET)  # methods/attacks.md §1
        else:
            caption, _ = replace_caption(rng, TARGET)
        examples[instance] = Example(original.sample_id, len(data.images) + k, caption, original.instruction)
    states.details.update(caption_rule=caption_rule, poisoned_instances=len(chosen), surrogate_instances=len(examples),
                          poisoned_fraction=len(chosen) / len(examples),
                          state_sample_ids=[data.examples[i].sample_id for i in chosen][:50])
    return states, TrainingSet(ImageBank(data.images, triggered), examples)


def code_state_set(data: DefenderData, seed: int) -> StateSet:
    """methods/srd.md §1 `srd-code`: every caption instance; each image a fresh VLOOD noise patch
    (p = 1/2 a corner, else uniform, methods/attacks.md §5); the instance's own prompt."""
    triggers = {row: trigger_draw(seed, data.image_ids[row]) for row in {e.image_index for e in data.examples}}
    rows = [e.image_index for e in data.examples]
    return StateSet(data.images, rows, [triggers[r] for r in rows], [e.instruction for e in data.examples],
                    {"kind": "code", "n_states": len(rows), "trigger": "vlood per image"})
