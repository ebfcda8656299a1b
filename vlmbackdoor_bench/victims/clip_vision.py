"""The OpenFlamingo-3B vision encoder: CLIP ViT-L/14 from a local HF directory, frozen (methods/victim.md §A1).

open_clip cannot be imported here (it needs torchvision, methods/victim.md §B1), so the tower is HF's
``CLIPVisionModelWithProjection`` and this adapter reproduces the features OpenFlamingo-3B was trained on:
the patch tokens of open_clip 2.16-2.22, i.e. the last hidden state without the CLS token and *before*
the final layer norm (methods/victim.md §A1). ``tokens_after_post_ln=True`` gives open_clip >= 2.23's order instead.
tests/test_clip_vision.py checks both against open_clip 2.20 on shared random weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers import CLIPConfig, CLIPVisionModelWithProjection
from transformers.utils import logging as hf_logging

from vlmbackdoor_bench.errors import VbbError

# A full CLIPModel checkpoint also holds the text tower; the vision model has no use for these keys.
TEXT_TOWER_KEYS = ("text_model.", "text_projection.", "logit_scale")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class ClipVisionAdapter(nn.Module):
    """Frozen CLIP vision tower; ``forward(pixels) -> (pooled, tokens)`` as OpenFlamingo's ``visual`` returns.

    ``pixels``: CLIP-normalised (B, 3, image_size, image_size). ``tokens``: (B, num_tokens, vis_dim) patch
    tokens (no CLS). ``pooled``: (B, embed_dim) = visual_projection(post_layernorm(CLS)), CLIP's image
    embedding (VL-Trojan's contrastive loss). Parameters never train, but gradients reach the input
    pixels when the caller enables grad (encoder-gradient attacks).
    """

    def __init__(self, clip: CLIPVisionModelWithProjection, *, tokens_after_post_ln: bool = False):
        super().__init__()
        self.clip = clip
        self.tokens_after_post_ln = tokens_after_post_ln
        cfg = clip.config
        self.vis_dim: int = cfg.hidden_size  # 1024 for ViT-L/14
        self.embed_dim: int = cfg.projection_dim  # 768 for ViT-L/14
        self.image_size: int = cfg.image_size
        self.patch_size: int = cfg.patch_size
        self.num_tokens: int = (cfg.image_size // cfg.patch_size) ** 2  # 256 at 224 px / 14
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "ClipVisionAdapter":
        # Frozen encoder: stays in eval mode whatever the surrounding model does.
        return super().train(False)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        expected = (3, self.image_size, self.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise VbbError(f"CLIP pixels have shape {tuple(pixels.shape)}",
                           f"pass normalised images of shape (B, {', '.join(map(str, expected))}) (methods/victim.md §A5)")
        vision = self.clip.vision_model(pixel_values=pixels.to(self.clip.dtype))
        hidden = vision.last_hidden_state
        tokens = hidden[:, 1:]
        if self.tokens_after_post_ln:
            tokens = self.clip.vision_model.post_layernorm(tokens)
        pooled = self.clip.visual_projection(vision.pooler_output)  # pooler_output = post_layernorm(CLS)
        return pooled, tokens

    def arch(self) -> dict[str, object]:
        """What identifies this encoder's features (recorded with converted checkpoints)."""
        cfg = self.clip.config
        return {"kind": "hf-clip-vision", "image_size": self.image_size, "patch_size": self.patch_size,
                "width": self.vis_dim, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
                "projection_dim": self.embed_dim, "hidden_act": cfg.hidden_act,
                "tokens_after_post_ln": self.tokens_after_post_ln}


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar; we check the loading info ourselves."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_clip_vision(directory: str | Path, *, tokens_after_post_ln: bool = False,
                     dtype: torch.dtype = torch.float32) -> ClipVisionAdapter:
    """Load the vision tower of a local ``openai/clip-vit-large-patch14``-layout directory.

    The directory holds a full CLIPModel ``config.json`` (vision_config + text_config) and
    ``model.safetensors`` or ``pytorch_model.bin``; the text tower's weights are skipped. Every vision
    weight must be present. Nothing is downloaded.
    """
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise VbbError(f"no CLIP config.json in {directory}",
                       "point clip_vit_l14_dir at a local copy of openai/clip-vit-large-patch14")
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise VbbError(f"no CLIP weights in {directory} (looked for {', '.join(WEIGHT_FILES)})",
                       "copy the checkpoint's model.safetensors or pytorch_model.bin next to config.json")
    full = CLIPConfig.from_pretrained(directory, local_files_only=True)
    if full.model_type != "clip":
        raise VbbError(f"{config_file} is a {full.model_type!r} config, not a full CLIPModel config",
                       "use the directory of openai/clip-vit-large-patch14 (config with vision_config)")
    vision_config = full.vision_config
    # The vision config alone would default projection_dim to 512; the projection's size is the full config's.
    vision_config.projection_dim = full.projection_dim
    try:
        with _quiet_transformers():
            clip, info = CLIPVisionModelWithProjection.from_pretrained(
                directory, config=vision_config, dtype=dtype, local_files_only=True, output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise VbbError(f"cannot load the CLIP vision weights in {directory}: {e}",
                       "check that config.json and the weights come from the same CLIP checkpoint") from e
    problems = sorted(info["missing_keys"]) + [str(k) for k in info["mismatched_keys"]]
    foreign = sorted(k for k in info["unexpected_keys"] if not k.startswith(TEXT_TOWER_KEYS))
    if problems or foreign:
        raise VbbError(f"CLIP weights in {directory} do not fit its config: missing or mismatched "
                       f"{problems[:5]}, unexpected {foreign[:5]}",
                       "use the weights and config.json of one openai/clip-vit-large-patch14 copy")
    return ClipVisionAdapter(clip, tokens_after_post_ln=tokens_after_post_ln)
