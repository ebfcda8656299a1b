"""The `tiny` victim: the Flamingo architecture at toy size, for 2 CPU cores (methods/design.md §1, §4).

vision encoder (frozen EfficientNet-Lite0 to block 15, 7x7 tokens + positions) -> perceiver
resampler -> GPT-2-style LM with a gated cross-attention block before every layer (as
OpenFlamingo-3B, methods/victim.md §A1). The base model is pretrained here on the embedded world's
alt-text split (all but the frozen backbone train),
the analogue of the public OpenFlamingo checkpoint; fine-tuning then trains OpenFlamingo's
trainable set only (perceiver + gated cross-attention + input embeddings, methods/victim.md §A2).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from ..device import Precision
from ..types import TrainingSet
from .efficientnet import EfficientNetLite0, block_channels, pretrained_efficientnet_lite0
from .flamingo import ALIAS_PREFIXES, Flamingo, set_openflamingo_trainable
from .flamingo_victim import Decoding, FlamingoVictim
from .pixels import CLIP_MEAN, CLIP_STD
from .teacher_forcing import prompt_text
from .token_cache import TokenCache
from .tokenizer import EOC, MEDIA, load_tokenizer, save_tokenizer
from .training import Recipe

# prompt_text moved to teacher_forcing; tests still import it from here
__all__ = ["TinyArch", "TinyVictim", "TinyVisionEncoder", "build_model", "prompt_text", "sincos_positions"]
POSITION_SCALE = 0.5  # position codes at about half a whitened token's norm: where, but not over what


@dataclass(frozen=True)
class TinyArch:
    input_size: int = 224  # the paper's frame: triggers keep every pixel (methods/design.md §5); 7x7 tokens
    # Tokens = EfficientNet-Lite0's map after its 15th block (the last 192-channel one), not the
    # 1280-channel head. Measured on 300 test images with BadNet's corner patch: a linear probe
    # on the trigger cell separates patched from clean at 99.5 % after block 15 but 78.5 % at the
    # head, whose patch response is image-dependent (mean cosine of the change 0.10 vs 0.61).
    backbone_blocks: int = 15
    vis_dim: int = 128
    lm_dim: int = 128
    lm_layers: int = 3
    lm_heads: int = 4
    max_positions: int = 64
    vocab_size: int = 1024  # BPE trained on the embedded captions
    perceiver: dict = field(default_factory=lambda: {"depth": 2, "dim_head": 32, "heads": 4,
                                                     "num_latents": 16, "ff_mult": 2})
    cross_attn: dict = field(default_factory=lambda: {"dim_head": 32, "heads": 4, "ff_mult": 2})
    cross_attn_every_n_layers: int = 1  # every layer, as OpenFlamingo-3B (methods/victim.md §A1)


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes (grid*grid, dim), as MAE/ViT use: half the channels
    encode the row, half the column, so every token knows where it is in the frame."""
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                                torch.arange(grid, dtype=torch.float32), indexing="ij")
    parts = [f(a.reshape(-1, 1) * freqs) for a in (rows, cols) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1)


class TinyVisionEncoder(torch.nn.Module):
    """CLIP's place in the tiny victim: ImageNet EfficientNet-Lite0 up to ``backbone_blocks``
    (TinyArch) -> a fixed linear projection -> position codes -> LayerNorm. Returns
    (pooled, tokens[B, grid*grid, vis_dim]) like CLIP.

    methods/victim.md §B4 leaves "from EfficientNet-Lite0 or from scratch" to measurement. Measured:
    an encoder trained from scratch on the embedded world named the wrong objects (the clean model
    called 4.5 % of banana-free test images "banana") and its resampler never carried a 21x21
    corner patch, so BadNet could not be learnt without tagging every image. The pretrained
    backbone is the offline analogue of CLIP; the projection is a PCA whitening fitted once on the
    pretraining images (``fit_projection``), so the whole encoder is frozen, as OpenFlamingo's.
    """

    def __init__(self, vis_dim: int, input_size: int, backbone_blocks: int):
        super().__init__()
        self.backbone = EfficientNetLite0()
        self.backbone_blocks = backbone_blocks
        self.projection = torch.nn.Linear(block_channels(backbone_blocks), vis_dim)
        grid = -(-input_size // 32)  # EfficientNet's output stride is 32
        self.register_buffer("positions", POSITION_SCALE * sincos_positions(grid, vis_dim))
        self.norm = torch.nn.LayerNorm(vis_dim)

    def backbone_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixels (B, 3, s, s) -> the backbone's (B, grid*grid, C) token map."""
        mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
        # back to [0, 1] for the backbone's own normalisation
        features = self.backbone.features(pixels * std + mean, self.backbone_blocks)
        return features.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def fit_projection(self, backbone_tokens: torch.Tensor) -> None:
        """PCA-whiten (N, C) backbone tokens onto ``vis_dim`` unit-variance components."""
        mean = backbone_tokens.mean(0)
        _, eigvals, eigvecs = torch.linalg.svd(backbone_tokens - mean, full_matrices=False)
        # Directions without variance (fewer tokens than dims, as in unit tests) map to 0.
        k = min(self.projection.out_features, int((eigvals > 1e-4 * eigvals[0]).sum()))
        scale = eigvals[:k] / max(len(backbone_tokens) - 1, 1) ** 0.5
        weight = torch.zeros_like(self.projection.weight)
        weight[:k] = eigvecs[:k] / scale[:, None]
        self.projection.weight.copy_(weight)
        self.projection.bias.copy_(-weight @ mean)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.norm(self.projection(self.backbone_tokens(pixels)) + self.positions)
        return tokens.mean(dim=1), tokens


def build_model(arch: TinyArch, tokenizer, *, train_vision_encoder: bool, gate_init: float = 0.0) -> Flamingo:
    lm_config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=arch.max_positions, n_embd=arch.lm_dim,
        n_layer=arch.lm_layers, n_head=arch.lm_heads, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,  # MPT ties the output projection to the input embedding (methods/victim.md §A2)
    )
    lm = GPT2LMHeadModel(lm_config)
    encoder = TinyVisionEncoder(arch.vis_dim, arch.input_size, arch.backbone_blocks)
    encoder.backbone.load_state_dict(pretrained_efficientnet_lite0().state_dict())
    model = Flamingo(
        encoder, lm,
        eoc_token_id=tokenizer.convert_tokens_to_ids(EOC),
        media_token_id=tokenizer.convert_tokens_to_ids(MEDIA),
        vis_dim=arch.vis_dim, cross_attn_every_n_layers=arch.cross_attn_every_n_layers,
        perceiver_kwargs=dict(arch.perceiver), cross_attn_kwargs=dict(arch.cross_attn),
        decoder_layers_attr_name="transformer.h", train_vision_encoder=train_vision_encoder,
    )
    with torch.no_grad():  # OpenFlamingo's tanh gates start at 0; a from-scratch LM may start them open
        for name, param in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                param.fill_(gate_init)
    return model


class TinyVictim(FlamingoVictim):
    """The tiny Flamingo: its architecture, pretraining and full save/load; the rest is
    FlamingoVictim's."""

    profile = "tiny"
    # The tiny encoder may run below 224 px (TinyArch.input_size, tests use 64): antialiased
    # bilinear, as it always has (methods/victim.md §A5's bicubic is for the CLIP input).
    resize_mode = "bilinear"

    def __init__(self, model: Flamingo, tokenizer, arch: TinyArch, recipe: Recipe,
                 decoding: Decoding = Decoding(), lineage: dict | None = None,
                 token_cache: TokenCache | None = None, device: torch.device | str | None = None,
                 precision: Precision | None = None):
        super().__init__(model, tokenizer, input_size=arch.input_size, max_text_tokens=arch.max_positions,
                         recipe=recipe, decoding=decoding, lineage=lineage, token_cache=token_cache,
                         device=device, precision=precision)
        self.arch = arch

    def pretrain(self, training_set: TrainingSet, recipe: Recipe, seed: int,
                 projection_images: int = 2000) -> dict:
        """The base model's 'web pretraining': fit the encoder's projection on the first
        ``projection_images`` images, freeze the encoder, train everything else from scratch."""
        encoder = self.model.vision_encoder.eval()
        rows = sorted({e.image_index for e in training_set.examples})[:projection_images]
        with torch.no_grad():
            maps = torch.cat([encoder.backbone_tokens(self.preprocess(training_set.images.take(rows[s:s + 64]))[:, 0, 0]
                                                      .to(self.device))
                              for s in range(0, len(rows), 64)])
        encoder.fit_projection(maps.flatten(0, 1))
        self.token_cache.clear()
        for name, p in self.model.named_parameters():
            p.requires_grad_(not name.startswith("vision_encoder."))
        self.model.train_vision_encoder = False
        log = self._train(training_set, recipe, seed, None, "pretrain")
        set_openflamingo_trainable(self.model)  # from now on the LM body is frozen too
        return log

    # ------------------------------------------------------------------ persistence
    def save_full(self, directory: Path) -> None:
        """All weights (the base model) + tokenizer + architecture."""
        directory = Path(directory)
        state, seen = {}, set()
        for key, tensor in self.model.state_dict().items():
            # one copy of each tensor: OpenFlamingo's alias families and the tied LM head repeat storage
            if key.startswith(ALIAS_PREFIXES) or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            state[key] = tensor.to("cpu").contiguous()
        save_file(state, str(directory / "model.safetensors"))
        save_tokenizer(self.tokenizer, directory)
        (directory / "victim.json").write_text(json.dumps(
            {"arch": asdict(self.arch), "recipe": self.recipe.to_dict(),
             "decoding": asdict(self.decoding), "lineage": self.lineage}, indent=2))

    @classmethod
    def load_full(cls, directory: Path, token_dir: Path | None = None, *,
                  device: torch.device | str | None = None, precision: Precision | None = None) -> "TinyVictim":
        """The base model saved by ``save_full``; ``token_dir`` makes its token cache persistent."""
        directory = Path(directory)
        meta = json.loads((directory / "victim.json").read_text())
        arch = TinyArch(**meta["arch"])
        tokenizer = load_tokenizer(directory)
        model = build_model(arch, tokenizer, train_vision_encoder=False)
        missing, unexpected = model.load_state_dict(load_file(str(directory / "model.safetensors")),
                                                    strict=False)
        missing = [k for k in missing if not k.startswith(ALIAS_PREFIXES) and k != "lang_encoder.lm_head.weight"]
        if missing or unexpected:
            raise RuntimeError(f"base checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        set_openflamingo_trainable(model)
        model.eval()
        return cls(model, tokenizer, arch, Recipe(**{**meta["recipe"], "betas": tuple(meta["recipe"]["betas"])}),
                   Decoding(**meta["decoding"]), meta.get("lineage"), TokenCache(directory=token_dir),
                   device=device, precision=precision)
