"""The one image transform of every victim (methods/victim.md §A5): uint8 RGB in the paper's 224x224
frame -> resized to the encoder's input -> normalised with OpenAI CLIP's mean and std."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# OpenAI CLIP normalisation at full precision (methods/victim.md §A5), for every profile.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize(pixels: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(B, 3, s, s) -> (B, 3, size, size); a no-op when the size already matches. Each output
    pixel is a weighted sum of input pixels whose weights sum to one, so resizing commutes with
    the per-channel affine normalisation (encode_normalised relies on that)."""
    if pixels.shape[-1] == size:
        return pixels
    return F.interpolate(pixels, size=size, mode=mode, antialias=True, align_corners=False)


def normalise_uint8(images: np.ndarray, size: int, mode: str) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> CLIP-normalised float32 (B, 3, size, size) on the CPU."""
    x = torch.from_numpy(np.require(images, np.uint8, ["C", "W"])).permute(0, 3, 1, 2).float() / 255.0
    x = resize(x, size, mode)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std
