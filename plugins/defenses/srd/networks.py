"""SB3's CnnPolicy feature extractor, NatureCNN, shared by the DQN, PPO and SAC files
(methods/srd.md §5), and the observation resize the tiny budget uses."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def resize_observations(obs: np.ndarray, size: int) -> np.ndarray:
    """uint8 (B, H, W, 3) -> uint8 (B, size, size, 3); identity at the native 224 px.

    The tiny profile's budget feeds the network at a lower resolution (antialiased bilinear):
    the replay buffer then stores what the network reads."""
    obs = np.asarray(obs, dtype=np.uint8)
    if obs.shape[1] == size:
        return obs
    x = torch.from_numpy(np.ascontiguousarray(obs)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_tensor(obs: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """methods/srd.md §5 input: HWC uint8 -> CHW float / 255, on ``device`` (moved as uint8)."""
    return torch.from_numpy(np.ascontiguousarray(obs)).to(device).permute(0, 3, 1, 2).float() / 255.0


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class NatureCNN(nn.Module):
    """methods/srd.md §5: conv 32@8x8/4 -> conv 64@4x4/2 -> conv 64@3x3/1, ReLU, flatten
    (64x24x24 = 36,864 at 224 px) -> linear 512, ReLU."""

    def __init__(self, obs_size: int, features: int = 512):
        super().__init__()
        self.cnn = nn.Sequential(
            nn.Conv2d(3, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            flat = self.cnn(torch.zeros(1, 3, obs_size, obs_size)).shape[1]
        self.flat_features = flat
        self.linear = nn.Sequential(nn.Linear(flat, features), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.cnn(x))
