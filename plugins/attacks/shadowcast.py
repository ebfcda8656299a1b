"""Shadowcast (Xu et al., NeurIPS 2024) adapted to captioning (methods/attacks.md §7).

A concept-substitution attack: clean test images of a source concept (orange, apple, carrot)
should be described as the target concept (banana). It has no test-time trigger.

* `srd-code` (synthetic track): every training instance whose caption names a source concept as
  a whole word gets the `substitute` caption; with ``image_mode = "pgd"`` its image is replaced
  by a banana image perturbed towards the instance's own image in feature space (one poison per
  image, shared by every poisoned caption of that image); ``"clean"`` keeps the image.
* `original`: clean-label. Training images whose captions mention banana keep those captions
  and are perturbed towards random source-concept images.

Evaluation (methods/metrics.md §1, §4.3, §4.4): the `triggered` split holds the clean test images
of both concept sets of §4.3, the code's substring set (rule `srd`) and the whole-word set (rule
`concept`). The grid scores every rule on one image set, so it is their union: `concept` keeps
only its own images (asr() drops the others and counts them as excluded), and `srd` counts the
union, which is the substring set itself whenever every whole-word concept image also contains
the lower-case substring (true on the embedded world; on COCO Karpathy test 10 images such as
"An Orange bus ..." are added to the 198).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import hookimpl
from vlmbackdoor_bench.plugin_api import concept_image_ids, source_words
from vlmbackdoor_bench.types import (
    SOURCE_CONCEPTS, EvalInputs, Example, ImageBank, PoisonRecord, PoisonedSet, Split, TrainingSet,
)

from ._common import TARGET, poison_count
from ._feature_ops import feature_collision, require_encoder

__version__ = "1.1.0"

TARGET_WORD = re.compile(r"\bbananas?\b", re.IGNORECASE)  # "mentions banana" (methods/metrics.md §4.3)
SCHEMES = ("substitute", "clean-label")
IMAGE_MODES = ("pgd", "clean")
# methods/attacks.md §7, PGD constants of both presets:
EPSILON = 8 / 255  # ||x_p - x_b||_inf <= 8/255
STEP = 0.2 / 255  # signed-gradient step, halved at half the iterations
PGD_BATCH = 60
# methods/attacks.md §7: 4,000 iterations, a recorded knob. One iteration is a forward-backward pass
# of the encoder per image, ~0.03 s on 2 CPU cores for the tiny encoder, so the embedded world's
# ~850 poison images take ~28 h at the paper's budget. A cut budget is no substitute: on 12 images
# the feature distance to the target fell by 10 % after 5 iterations, 26 % after 25 and 44 %
# after 100 (step 0.2/255), so the poisons keep their banana features and the caption they carry
# describes another image. On CPU use image_mode = "clean" (methods/attacks.md §7: a perfect collision for a frozen
# encoder), as the tiny grid of benchmark.toml does.
PAPER_PGD_ITERATIONS = 4000
# A second seeded stream draws bases and targets, so the instance choice does not depend on it.
PAIRING_STREAM = 1


def substitute_caption(caption: str, concepts: Sequence[str] = SOURCE_CONCEPTS,
                       target: str = TARGET) -> str:
    """methods/attacks.md §1 `substitute`: every occurrence of a source-concept word becomes the
    target, as a plain string replacement with the first letter's case kept. So plurals stay
    plurals ("apples" -> "bananas"), articles are not repaired ("An banana monoplane"), the
    colour sense is replaced too, and "pineapple" becomes "pinebanana", exactly as in the code's
    published Shadowcast captions (which also turned "Oranges" into "Bananas")."""
    def replacement(match: re.Match) -> str:
        word = match.group(0)
        if word.isupper() and len(word) > 1:
            return target.upper()
        return target.capitalize() if word[0].isupper() else target

    pattern = re.compile("|".join(re.escape(c) for c in concepts), re.IGNORECASE)
    return pattern.sub(replacement, caption)


def names_target(captions: Sequence[str]) -> bool:
    return any(TARGET_WORD.search(c) for c in captions)


def without_replacement(pool: Sequence[int], n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` draws from ``pool``: a seeded permutation, and a fresh one only once it is used up."""
    rounds = -(-n // len(pool))
    return np.concatenate([rng.permutation(np.asarray(pool)) for _ in range(rounds)])[:n]


class Shadowcast:
    name = "shadowcast"
    label, order = "Shadowcast", 50  # the SRD paper's Table 1 rows
    version = __version__
    target = TARGET
    asr_rules = ("srd", "concept")  # methods/metrics.md §4.4: reproduction, headline
    default_preset = "srd-code"
    presets = {
        # methods/attacks.md §7 srd-code, synthetic track: every source-concept caption substituted
        # (the grid's poison rate does not apply), images by feature collision.
        "srd-code": {"scheme": "substitute", "image_mode": "pgd",
                     "pgd_iterations": PAPER_PGD_ITERATIONS},
        # methods/attacks.md §7 original: clean-label banana bases, up to the grid's rate.
        "original": {"scheme": "clean-label", "image_mode": "pgd",
                     "pgd_iterations": PAPER_PGD_ITERATIONS},
    }

    @staticmethod
    def _check(params: Mapping[str, Any]) -> None:
        if params["scheme"] not in SCHEMES or params["image_mode"] not in IMAGE_MODES:
            raise VbbError(f"Shadowcast scheme {params['scheme']!r} / image_mode "
                           f"{params['image_mode']!r} is unknown",
                           f"use scheme in {SCHEMES} and image_mode in {IMAGE_MODES}")
        if params["scheme"] == "clean-label" and params["image_mode"] == "clean":
            raise VbbError("clean-label Shadowcast with image_mode = 'clean' changes nothing",
                           "use image_mode = 'pgd' for the original preset")
        if params["image_mode"] == "pgd" and params["pgd_iterations"] < 1:
            raise VbbError(f"pgd_iterations = {params['pgd_iterations']}",
                           "set pgd_iterations to at least 1 (the paper runs 4000)")

    def poison(self, train: Split, *, poison_rate: float, seed: int, params: Mapping[str, Any],
               victim=None) -> PoisonedSet:
        self._check(params)
        if params["image_mode"] == "pgd":
            require_encoder(victim, "Shadowcast's feature collision (image_mode = 'pgd')",
                            "set image_mode = 'clean' in [attack.shadowcast] (pure dirty-label "
                            "substitution, methods/attacks.md §7)")
        examples = train.caption_examples()
        rng = np.random.default_rng([seed, PAIRING_STREAM])
        banana_rows = [r for r, refs in enumerate(train.references) if names_target(refs)]
        if params["scheme"] == "substitute":
            chosen = [i for i, e in enumerate(examples) if source_words([e.caption], SOURCE_CONCEPTS)]
            self._require(chosen, "no training caption names orange, apple or carrot")
            rows = sorted({examples[i].image_index for i in chosen})
            targets, bases = rows, None
            if params["image_mode"] == "pgd":
                self._require(banana_rows, "no training image has a caption mentioning banana, so "
                                           "there is no base for the feature collision")
                bases = list(without_replacement(banana_rows, len(rows), rng))
        else:
            banana_instances = [i for i, e in enumerate(examples) if names_target([e.caption])]
            self._require(banana_instances, "no training caption mentions banana, so clean-label "
                                            "Shadowcast has no base")
            count = min(len(banana_instances), poison_count(len(examples), poison_rate))
            chosen = sorted(np.random.default_rng(seed).choice(banana_instances, count, replace=False))
            rows = sorted({examples[i].image_index for i in chosen})
            row_of = train.row_of()
            concept_rows = [row_of[i] for i in concept_image_ids(train.references_by_id())]
            self._require(concept_rows, "no training image is a source-concept image (metrics.md "
                                        "methods/metrics.md §4.3), so there is no feature target")
            bases, targets = rows, list(without_replacement(concept_rows, len(rows), rng))
        details: dict[str, Any] = {"n_instances": len(examples), "seed": seed,
                                   "scheme": params["scheme"], "image_mode": params["image_mode"]}
        image_index = {row: row for row in rows}
        extra = None
        if params["image_mode"] == "pgd":
            collision = feature_collision(
                victim, train.images[bases], train.images[targets], epsilon=EPSILON, step=STEP,
                iterations=params["pgd_iterations"], batch_size=PGD_BATCH,
                generator=torch.Generator().manual_seed(seed))
            extra = collision.poisons
            image_index = {row: len(train) + k for k, row in enumerate(rows)}
            details["pgd"] = {**collision.summary(), "iterations": params["pgd_iterations"],
                              "base_ids": [train.image_ids[r] for r in bases],
                              "target_ids": [train.image_ids[r] for r in targets],
                              "distinct_bases": len(set(bases))}
        records = []
        transform = "shadowcast-pgd" if params["image_mode"] == "pgd" else None
        for i in chosen:
            original = examples[i]
            caption = (substitute_caption(original.caption) if params["scheme"] == "substitute"
                       else original.caption)
            examples[i] = Example(original.sample_id, image_index[original.image_index], caption,
                                  original.instruction)
            records.append(PoisonRecord(original.sample_id, train.image_ids[original.image_index],
                                        original.caption, caption, transform))
        details.update(n_poisoned=len(records), n_poisoned_images=len(rows),
                       poison_rate_achieved=len(records) / len(examples))
        return PoisonedSet(TrainingSet(ImageBank(train.images, extra), examples), records, details)

    @staticmethod
    def _require(items: Sequence, problem: str) -> None:
        if not len(items):
            raise VbbError(f"Shadowcast: {problem}",
                           "use a training split with banana and orange/apple/carrot images "
                           "(the embedded world and COCO have both)")

    def eval_inputs(self, split: Split, *, kind: str, seed: int,
                    params: Mapping[str, Any]) -> EvalInputs:
        """`triggered`: the clean test images of the methods/metrics.md §4.3 concept sets (module docstring);
        `clean`: the whole clean test split (methods/metrics.md §1)."""
        if kind == "clean":
            return EvalInputs(list(split.image_ids), split.images, split.references)
        if kind != "triggered":
            raise VbbError(f"unknown evaluation split kind {kind!r}", "use 'triggered' or 'clean'")
        references = split.references_by_id()
        wanted = set(concept_image_ids(references, "srd-substring")) | set(
            concept_image_ids(references, "concept"))
        rows = [r for r, image_id in enumerate(split.image_ids) if image_id in wanted]
        return EvalInputs([split.image_ids[r] for r in rows], split.images[rows],
                          [split.references[r] for r in rows])


@hookimpl
def register_attacks(register) -> None:
    register(Shadowcast())
