"""Optimising images against the victim's frozen vision encoder (methods/attacks.md §6, §7).

VL-Trojan's trigger generator and Shadowcast's feature collision both need gradients of the
encoder with respect to its input pixels. They reach it only through the Victim protocol:
``encode_normalised(pixels, grad=True) -> (pooled, tokens)`` on normalised (B, 3, 224, 224)
pixels, and the normalisation ``pixel_mean`` / ``pixel_std`` (methods/victim.md §A5). Nothing here
knows the encoder's architecture.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.plugin_api import victim_device

# methods/attacks.md §6: VL-Trojan augments with RandomResizedCrop(224, scale [0.8, 1.0],
# ratio [3/4, 4/3]); torchvision is never installed (methods/victim.md §B1), so it is done here.
CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its central fallback


def require_encoder(victim, attack: str, fix: str) -> None:
    """A clear error when ``victim`` cannot give encoder gradients (methods/design.md §8)."""
    if victim is None:
        raise VbbError(f"{attack} optimises images against the victim's vision encoder, "
                       "but no victim was given to poison()", fix)
    if not hasattr(victim, "encode_normalised"):
        raise VbbError(f"{attack} needs encoder gradients, and victim profile "
                       f"{getattr(victim, 'profile', '?')!r} has no encode_normalised", fix)


class PixelSpace:
    """A victim's normalisation: [0, 1] pixels <-> the encoder's normalised input, on the
    victim's device (``device``: where every pixel tensor of an optimisation lives)."""

    def __init__(self, victim):
        self.device = victim_device(victim)
        self.mean = torch.tensor(victim.pixel_mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(victim.pixel_std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def normalise(self, unit: torch.Tensor) -> torch.Tensor:
        return (unit - self.mean) / self.std

    def denormalise(self, normalised: torch.Tensor) -> torch.Tensor:
        return normalised * self.std + self.mean


def unit_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def uint8_images(unit: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3), rounded to the nearest level.

    Rounding keeps an L-inf ball around a uint8 image inside it: |x_p - x_b| <= 8/255 with
    x_b on the grid rounds to at most 8 levels away.
    """
    levels = (unit.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    return levels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def crop_box(height: int, width: int, generator: torch.Generator,
             scale: tuple[float, float] = CROP_SCALE,
             ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of one RandomResizedCrop box, by torchvision's algorithm: area fraction
    uniform in ``scale``, log aspect ratio uniform in log ``ratio``, up to 10 tries, then the
    largest central box whose ratio is inside ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * torch.empty(1).uniform_(*scale, generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(images: torch.Tensor, generator: torch.Generator, size: int = 224,
                        scale: tuple[float, float] = CROP_SCALE,
                        ratio: tuple[float, float] = CROP_RATIO
                        ) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """One random box per image of (B, C, H, W), resized back to ``size`` with antialiased
    bilinear interpolation (torchvision's tensor default); returns the crops and their boxes."""
    boxes = [crop_box(images.shape[-2], images.shape[-1], generator, scale, ratio) for _ in images]
    crops = [F.interpolate(image[None, :, top:top + h, left:left + w], size=(size, size),
                           mode="bilinear", antialias=True, align_corners=False)
             for image, (top, left, h, w) in zip(images, boxes)]
    return torch.cat(crops), boxes


@dataclass
class Collision:
    """Shadowcast's poisons and how close their features came to the targets'."""

    poisons: np.ndarray  # uint8 (B, 224, 224, 3)
    base_distance: np.ndarray  # ||F(x_b) - F(x_t)||_2 per sample, before any perturbation
    poison_distance: np.ndarray  # the same for the kept iterate (before its uint8 rounding)
    seconds: float

    def summary(self) -> dict:
        base, poison = self.base_distance, self.poison_distance
        return {"n_images": len(base), "seconds": self.seconds,
                "base_distance_mean": float(base.mean()) if len(base) else None,
                "poison_distance_mean": float(poison.mean()) if len(poison) else None,
                "relative_reduction_mean": float((1 - poison / base).mean()) if len(base) else None}


def feature_collision(victim, bases: np.ndarray, targets: np.ndarray, *, epsilon: float,
                      step: float, iterations: int, batch_size: int,
                      generator: torch.Generator) -> Collision:
    """Shadowcast's PGD (methods/attacks.md §7): minimise ||F(norm(x_p)) - F(norm(x_t))||_2 over the
    flattened patch tokens subject to ||x_p - x_b||_inf <= epsilon and x_p in [0, 1].

    Start at x_b + U(-epsilon, epsilon), clipped; signed-gradient steps of ``step``, halved from
    iteration ``iterations // 2``; project after every step; keep each sample's best iterate,
    checked every max(iterations / 1000, 1) steps (the start and the last iterate included).
    Random draws come from ``generator`` on the CPU, so a seed gives the same start on any device.
    """
    started = time.perf_counter()
    space = PixelSpace(victim)
    check_every = max(iterations // 1000, 1)

    def tokens(unit: torch.Tensor, grad: bool) -> torch.Tensor:
        # float32 distances whatever precision the encoder evaluates in (a no-op at float32)
        return victim.encode_normalised(space.normalise(unit), grad=grad)[1].flatten(1).float()

    out, base_distance, best_distance = [], [], []
    for s in range(0, len(bases), batch_size):
        x_b = unit_pixels(bases[s:s + batch_size]).to(space.device)
        x_t = unit_pixels(targets[s:s + batch_size]).to(space.device)
        with torch.no_grad():
            target_tokens = tokens(x_t, False)
            base_distance.append((tokens(x_b, False) - target_tokens).norm(dim=1))
        noise = torch.empty(x_b.shape).uniform_(-epsilon, epsilon, generator=generator).to(space.device)
        x = (x_b + noise).clamp(0, 1)
        best, best_d = x.clone(), torch.full((len(x),), math.inf, device=space.device)
        for it in range(iterations + 1):
            x.requires_grad_(it < iterations)
            distance = (tokens(x, it < iterations) - target_tokens).norm(dim=1)
            if it % check_every == 0 or it == iterations:
                better = distance.detach() < best_d
                best[better], best_d[better] = x.detach()[better], distance.detach()[better]
            if it == iterations:
                break
            grad, = torch.autograd.grad(distance.sum(), [x])
            lr = step if it < iterations // 2 else step / 2
            x = x.detach() - lr * grad.sign()
            x = torch.minimum(torch.maximum(x, x_b - epsilon), x_b + epsilon).clamp(0, 1)
        out.append(uint8_images(best))  # stored losslessly as uint8 (PNG levels)
        best_distance.append(best_d)
    empty = np.zeros((0,) + tuple(bases.shape[1:]), dtype=np.uint8)
    return Collision(np.concatenate(out) if out else empty,
                     torch.cat(base_distance).cpu().numpy() if base_distance else np.zeros(0),
                     torch.cat(best_distance).cpu().numpy() if best_distance else np.zeros(0),
                     time.perf_counter() - started)
