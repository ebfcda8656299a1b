"""Input Diversity Regularization: fresh random spatial, colour and instruction perturbations of
every training sample at every step (spec/robustit.md §2).

The sources name only the three perturbation families; every operation, magnitude and
probability below is the benchmark's reconstruction (UNVERIFIED, spec/robustit.md §2 table) and
a knob of the preset. Images are the uint8 224 px frames the attack delivered, before the
victim's normalisation; the caption is never touched.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# spec/robustit.md §2 textual (c): the instruction prefixes swapped for one another (UNVERIFIED)
PROMPT_PHRASES = ("a photo of", "an image of", "a picture of", "a photograph of")
TEXT_OPERATIONS = ("drop", "swap", "phrase")  # §2 textual (a), (b), (c)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, torchvision's rgb_to_grayscale


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


def resized_crop(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The ``box`` of a float (3, H, W) image resized back to (H, W), bicubic (§2)."""
    top, left, height, width = box
    crop = image[None, :, top:top + height, left:left + width]
    return F.interpolate(crop, size=tuple(image.shape[1:]), mode="bicubic", align_corners=False)[0]


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luma of float (N, 3, H, W) images in [0, 1]."""
    weights = torch.tensor(GRAY_WEIGHTS, dtype=images.dtype)[:, None, None]
    return (images * weights).sum(-3, keepdim=True)


def blend(images: torch.Tensor, other: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """factor · image + (1 − factor) · other, one factor per image (N,), clamped to [0, 1]."""
    f = factors[:, None, None, None]
    return (f * images + (1.0 - f) * other).clamp(0.0, 1.0)


def shift_hue(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of float (N, 3, H, W) images in [0, 1] by ``shifts`` (N,) turns; HSV value
    and saturation unchanged."""
    r, g, b = images.unbind(-3)
    value, low = images.amax(-3), images.amin(-3)
    chroma = value - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(value == r, torch.remainder((g - b) / safe, 6.0),
                      torch.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) / 6.0
    hue = torch.where(chroma > 0, torch.remainder(hue + shifts[:, None, None], 1.0), hue)
    # HSV -> RGB: channel n in (5, 3, 1) is v - c * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0])[:, None, None] + 6.0 * hue[:, None], 6.0)
    return value[:, None] - chroma[:, None] * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def jitter_draws(rng: np.random.Generator, p: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """One image's ColorJitter draw, torchvision's semantics: (brightness, contrast, saturation
    factors uniform in [1 - x, 1 + x] and a hue shift uniform in [-h, h]; the order of the four)."""
    factors = [rng.uniform(max(0.0, 1.0 - p[f"idr_{name}"]), 1.0 + p[f"idr_{name}"])
               for name in ("brightness", "contrast", "saturation")]
    factors.append(rng.uniform(-p["idr_hue"], p["idr_hue"]))
    return np.array(factors), rng.permutation(4)


def color_jitter(images: torch.Tensor, factors: np.ndarray, orders: np.ndarray) -> torch.Tensor:
    """Float (N, 3, H, W) images, each jittered with its row of ``factors`` (N, 4) in its
    ``orders`` (N, 4) of operations 0 brightness, 1 contrast, 2 saturation, 3 hue (§2); batched
    over the images that take the same operation at the same position."""
    images = images.clone()
    factors = torch.as_tensor(factors, dtype=images.dtype)
    for slot in range(4):
        for operation in range(4):
            rows = torch.as_tensor(np.flatnonzero(orders[:, slot] == operation))
            if not len(rows):
                continue
            x, f = images[rows], factors[rows, operation]
            if operation == 0:
                x = blend(x, torch.zeros_like(x), f)
            elif operation == 1:
                x = blend(x, grayscale(x).mean(dim=(-3, -2, -1), keepdim=True).expand_as(x), f)
            elif operation == 2:
                x = blend(x, grayscale(x).expand_as(x), f)
            else:
                x = shift_hue(x, f)
            images[rows] = x
    return images


def perturb_text(instruction: str, rng: np.random.Generator, p: Mapping[str, Any]) -> tuple[str, str]:
    """(the perturbed instruction, the operation drawn): §2 textual (a) word dropout, (b) one
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

    def images(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) images, each spatially (p = idr_crop_p, then a flip with
        idr_flip_p) and in colour (p = idr_color_p) perturbed with its own draw."""
        p, rng = self.p, self.rng
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        jittered, draws = [], []
        for i in range(len(x)):
            if rng.random() < p["idr_crop_p"]:
                x[i] = resized_crop(x[i], random_resized_box(rng, x.shape[-2], p["idr_crop_scale"],
                                                             p["idr_crop_ratio"]))
                self.counts["crop"] += 1
            if rng.random() < p["idr_flip_p"]:
                x[i] = x[i].flip(-1)
                self.counts["flip"] += 1
            if rng.random() < p["idr_color_p"]:
                jittered.append(i)
                draws.append(jitter_draws(rng, p))
                self.counts["color"] += 1
        if jittered:
            factors, orders = (np.stack(d) for d in zip(*draws))
            x[jittered] = color_jitter(x[jittered], factors, orders)
        return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def instruction(self, instruction: str) -> str:
        if self.rng.random() >= self.p["idr_text_p"]:
            return instruction
        text, operation = perturb_text(instruction, self.rng, self.p)
        self.counts[f"text_{operation}"] += 1
        return text

    def batch(self, examples: Sequence[Any], images: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """TrainingObjective.batch_inputs: a fresh draw for every sample of the step."""
        self.counts["samples"] += len(examples)
        return self.images(images), [self.instruction(e.instruction) for e in examples]
