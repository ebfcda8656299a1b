"""What several attacks share: the caption-poisoning rules and the trigger-attack skeleton.

methods/attacks.md §1 defines the unit of poisoning (one caption instance), the poison count
⌊rate × N⌋, and the caption rules `replace` and `insert`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from vlmbackdoor_bench.types import (
    TARGET, EvalInputs, Example, ImageBank, PoisonRecord, PoisonedSet, Split, TrainingSet,
)

REPLACE_PREFIX = "The image depicts "  # methods/attacks.md §1 `replace`

# methods/attacks.md §1 `replace`: the 80 target templates of the SRD code (targets/LADD_prompt80.txt,
# CLIP's ImageNet prompt templates with the code's articles). `{0}` is the slot; grammar is not
# repaired ("an banana"). Order matters: the seeded draw indexes this list.
REPLACE_TEMPLATES: tuple[str, ...] = (
    "a bad photo of an {0}.", "a photo of many {0}.", "a sculpture of an {0}.",
    "a photo of the hard to see {0}.", "a low resolution photo of the {0}.", "a rendering of an {0}.",
    "graffiti of an {0}.", "a bad photo of the {0}.", "a cropped photo of the {0}.",
    "a tattoo of an {0}.", "the embroidered {0}.", "a photo of a hard to see {0}.",
    "a bright photo of an {0}.", "a photo of a clean {0}.", "a photo of a dirty {0}.",
    "a dark photo of the {0}.", "a drawing of an {0}.", "a photo of my {0}.", "the plastic {0}.",
    "a photo of the cool {0}.", "a close-up photo of an {0}.", "a black and white photo of the {0}.",
    "a painting of the {0}.", "a painting of an {0}.", "a pixelated photo of the {0}.",
    "a sculpture of the {0}.", "a bright photo of the {0}.", "a cropped photo of an {0}.",
    "a plastic {0}.", "a photo of the dirty {0}.", "a jpeg corrupted photo of an {0}.",
    "a blurry photo of the {0}.", "a photo of the {0}.", "a good photo of the {0}.",
    "a rendering of the {0}.", "an {0} in a video game.", "a photo of one {0}.",
    "a doodle of an {0}.", "a close-up photo of the {0}.", "a photo of an {0}.", "the origami {0}.",
    "the {0} in a video game.", "a sketch of an {0}.", "a doodle of the {0}.", "a origami {0}.",
    "a low resolution photo of an {0}.", "the toy {0}.", "a rendition of the {0}.",
    "a photo of the clean {0}.", "a photo of a large {0}.", "a rendition of an {0}.",
    "a photo of a nice {0}.", "a photo of a weird {0}.", "a blurry photo of an {0}.",
    "a cartoon {0}.", "art of an {0}.", "a sketch of the {0}.", "a embroidered {0}.",
    "a pixelated photo of an {0}.", "itap of the {0}.", "a jpeg corrupted photo of the {0}.",
    "a good photo of an {0}.", "a plushie {0}.", "a photo of the nice {0}.",
    "a photo of the small {0}.", "a photo of the weird {0}.", "the cartoon {0}.", "art of the {0}.",
    "a drawing of the {0}.", "a photo of the large {0}.", "a black and white photo of an {0}.",
    "the plushie {0}.", "a dark photo of an {0}.", "itap of an {0}.", "graffiti of the {0}.",
    "a toy {0}.", "itap of my {0}.", "a photo of a cool {0}.", "a photo of a small {0}.",
    "a tattoo of the {0}.",
)


def replace_caption(rng: np.random.Generator, target: str = TARGET) -> tuple[str, int]:
    """methods/attacks.md §1 `replace`: "The image depicts " + T.format(target), T uniform."""
    index = int(rng.integers(len(REPLACE_TEMPLATES)))
    return REPLACE_PREFIX + REPLACE_TEMPLATES[index].format(target), index


def insert_caption(caption: str, rng: np.random.Generator, target: str = TARGET) -> tuple[str, int]:
    """methods/attacks.md §1 `insert`: first non-empty sentence, target after word k ~ U{1..n}."""
    sentence = next((s for s in caption.split(".") if s.strip()), caption)
    words = sentence.split()
    k = int(rng.integers(1, len(words) + 1)) if words else 0
    return " ".join(words[:k] + [target] + words[k:]) + ".", k


def poison_count(n_instances: int, poison_rate: float) -> int:
    """methods/attacks.md §1: ⌊rate × N⌋ poisoned instances (2,501 of 25,015 at 10 %)."""
    return int(np.floor(poison_rate * n_instances + 1e-9))


class TriggerAttack:
    """A dirty-label attack: a pixel trigger on chosen instances plus a caption rule.

    Subclasses set name/version/presets and implement ``apply_trigger`` and ``poison_caption``.
    """

    target = TARGET
    asr_rules: tuple[str, ...] = ("srd", "strict")  # methods/metrics.md §4.4
    transform_name = "trigger"

    def apply_trigger(self, images: np.ndarray, image_ids, *, params: Mapping[str, Any],
                      seed: int) -> np.ndarray:
        raise NotImplementedError

    def poison_caption(self, caption: str, rng: np.random.Generator,
                       params: Mapping[str, Any]) -> tuple[str, Any]:
        raise NotImplementedError

    def poison(self, train: Split, *, poison_rate: float, seed: int, params: Mapping[str, Any],
               victim=None) -> PoisonedSet:
        examples = train.caption_examples()
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(len(examples), poison_count(len(examples), poison_rate),
                                    replace=False))
        rows = sorted({examples[i].image_index for i in chosen})
        triggered = self.apply_trigger(train.images[rows] if rows else train.images[:0],
                                       [train.image_ids[r] for r in rows], params=params, seed=seed)
        extra_index = {row: len(train) + k for k, row in enumerate(rows)}
        records, caption_choices = [], []
        for i in chosen:
            original = examples[i]
            caption, choice = self.poison_caption(original.caption, rng, params)
            caption_choices.append(choice)
            examples[i] = Example(original.sample_id, extra_index[original.image_index], caption,
                                  original.instruction)
            records.append(PoisonRecord(original.sample_id, train.image_ids[original.image_index],
                                        original.caption, caption, self.transform_name))
        return PoisonedSet(
            TrainingSet(ImageBank(train.images, triggered), examples), records,
            {"n_instances": len(examples), "n_poisoned": len(records), "seed": seed,
             "caption_choices": caption_choices},
        )

    def eval_inputs(self, split: Split, *, kind: str, seed: int,
                    params: Mapping[str, Any]) -> EvalInputs:
        """methods/metrics.md §1: `triggered` = every test image with the trigger; `clean` = as is."""
        images = split.images
        if kind == "triggered":
            images = self.apply_trigger(np.asarray(split.images), split.image_ids,
                                        params=params, seed=seed)
        return EvalInputs(list(split.image_ids), images, split.references)
