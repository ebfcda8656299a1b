"""Input Diversity Regularization: fresh random spatial, colour and instruction perturbations of
every training sample at every step (methods/defenses.md §R2).

The sources name only the three perturbation families; every operation, magnitude and
probability below is the benchmark's reconstruction (UNVERIFIED, methods/defenses.md §R2 table) and
a knob of the preset. Images are the uint8 224 px frames the attack delivered, before the
victim's normalisation; the caption is never touched.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageEnhance

# methods/defenses.md §R2 textual (c): the instruction prefixes swapped for one another (UNVERIFIED)
PROMPT_PHRASES = ("a photo of", "an image of", "a picture of", "a photograph of")
TEXT_OPERATIONS = ("drop", "swap", "phrase")  # methods/defenses.md §R2 textual (a), (b), (c)


def random_resized_box(rng: np.random.Generator, size: int, scale: Sequence[float],
                       ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop covering a ``scale`` share of the area with aspect
    ``ratio`` (log-uniform), torchvision's RandomResizedCrop rule: 10 tries, then the centre crop
    with the aspect clamped to ``ratio``."""
    area = size * size
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        width, height = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < width <= size and 0 < height <= size:
            return int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1)), height, width
    return 0, 0, size, size  # a square frame: the clamped centre crop is the whole image


def resized_crop(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The ``box`` (top, left, height, width) of ``image`` resized back to its size, bicubic (methods/defenses.md §R2)."""
    top, left, height, width = box
    return image.crop((left, top, left + width, top + height)).resize(image.size, Image.BICUBIC)


def jitter_draws(rng: np.random.Generator, p: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """One image's ColorJitter draw, torchvision's semantics: (brightness, contrast, saturation
    factors uniform in [1 - x, 1 + x] and a hue shift uniform in [-h, h]; the order of the four)."""
    factors = [rng.uniform(max(0.0, 1.0 - p[f"idr_{name}"]), 1.0 + p[f"idr_{name}"])
               for name in ("brightness", "contrast", "saturation")]
    factors.append(rng.uniform(-p["idr_hue"], p["idr_hue"]))
    return np.array(factors), rng.permutation(4)


def shift_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by ``shift`` turns in 8-bit HSV, value and saturation kept (torchvision's
    adjust_hue on PIL images)."""
    hue, saturation, value = image.convert("HSV").split()
    turned = (np.asarray(hue, dtype=np.int16) + int(shift * 255)) % 256
    return Image.merge("HSV", (Image.fromarray(turned.astype(np.uint8), "L"), saturation, value)).convert("RGB")


def color_jitter(image: Image.Image, factors: np.ndarray, order: np.ndarray) -> Image.Image:
    """torchvision's ColorJitter on a PIL image: operations 0 brightness, 1 contrast,
    2 saturation (PIL's ImageEnhance blends with black, the mean grey, the greyscale image),
    3 hue, in ``order``, with ``factors`` (4,) (methods/defenses.md §R2)."""
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for operation in order:
        if operation < 3:
            image = enhancers[operation](image).enhance(float(factors[operation]))
        else:
            image = shift_hue(image, float(factors[3]))
    return image


def perturb_text(instruction: str, rng: np.random.Generator, p: Mapping[str, Any]) -> tuple[str, str]:
    """(the perturbed instruction, the operation drawn): methods/defenses.md §R2 textual (a) word dropout, (b) one
    adjacent swap, (c) a prompt-phrase swap (no change when the instruction has no such prefix)."""
    operation = TEXT_OPERATIONS[int(rng.integers(len(TEXT_OPERATIONS)))]
    words = instruction.split()
    if operation == "drop" and words:
        kept = [w for w in words if rng.random() >= p["idr_word_drop_p"]]
        words = kept or [words[int(rng.integers(len(words)))]]
    elif operation == "swap" and len(words) >= 2:
        i = int(rng.integers(len(words) - 1))
        words[i], words[i + 1] = words[i + 1], words[i]
    elif operation == "phrase":
        lowered = instruction.lower()
        prefix = next((ph for ph in PROMPT_PHRASES if lowered == ph or lowered.startswith(ph + " ")), None)
        if prefix is None:
            return instruction, operation
        others = [ph for ph in PROMPT_PHRASES if ph != prefix]
        return others[int(rng.integers(len(others)))] + instruction[len(prefix):], operation
    return " ".join(words), operation


class InputDiversity:
    """Per-sample perturbations drawn from one seeded generator, counted per operation."""

    def __init__(self, params: Mapping[str, Any], seed: int):
        self.p = params
        self.rng = np.random.default_rng([seed, 0x1D12])
        self.counts: Counter = Counter()
        self.seconds = 0.0  # spent perturbing (the rest of a step's input time is encoding)

    def images(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) images, each spatially (p = idr_crop_p, then a flip with
        idr_flip_p) and in colour (p = idr_color_p) perturbed with its own draw."""
        return np.stack([self.image(image) for image in images]) if len(images) else images

    def image(self, image: np.ndarray) -> np.ndarray:
        p, rng = self.p, self.rng
        picture = Image.fromarray(np.ascontiguousarray(image))
        if rng.random() < p["idr_crop_p"]:
            box = random_resized_box(rng, picture.height, p["idr_crop_scale"], p["idr_crop_ratio"])
            picture = resized_crop(picture, box)
            self.counts["crop"] += 1
        if rng.random() < p["idr_flip_p"]:
            picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            self.counts["flip"] += 1
        if rng.random() < p["idr_color_p"]:
            picture = color_jitter(picture, *jitter_draws(rng, p))
            self.counts["color"] += 1
        return np.asarray(picture, dtype=np.uint8)

    def instruction(self, instruction: str) -> str:
        if self.rng.random() >= self.p["idr_text_p"]:
            return instruction
        text, operation = perturb_text(instruction, self.rng, self.p)
        self.counts[f"text_{operation}"] += 1
        return text

    def batch(self, examples: Sequence[Any], images: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """TrainingObjective.batch_inputs: a fresh draw for every sample of the step."""
        started = time.perf_counter()
        self.counts["samples"] += len(examples)
        out = self.images(images), [self.instruction(e.instruction) for e in examples]
        self.seconds += time.perf_counter() - started
        return out
