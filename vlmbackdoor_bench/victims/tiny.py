"""The `tiny` victim: the Flamingo architecture at toy size, for 2 CPU cores (DESIGN.md §1, §4).

vision encoder (frozen EfficientNet-Lite0 to block 15, 7x7 tokens + positions) -> perceiver
resampler -> GPT-2-style LM with a gated cross-attention block before every layer (as
OpenFlamingo-3B, spec/victim.md §A1). The base model is pretrained here on the embedded world's
alt-text split (all but the frozen backbone train),
the analogue of the public OpenFlamingo checkpoint; fine-tuning then trains OpenFlamingo's
trainable set only (perceiver + gated cross-attention + input embeddings, §A2).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from ..hookspecs import TrainingObjective, TrainingStep
from ..metrics.postprocess import postprocess_caption
from ..types import DEFAULT_INSTRUCTION, Example, TrainingSet
from .efficientnet import EfficientNetLite0, block_channels, pretrained_efficientnet_lite0
from .flamingo import Flamingo, load_trainable_state_dict, set_openflamingo_trainable, trainable_state_dict
from .tokenizer import ANSWER, EOC, MEDIA, load_tokenizer, save_tokenizer
from .training import Recipe, run_training

# OpenAI CLIP normalisation, full precision (spec/victim.md §A5): one transform everywhere.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ALIASES = ("lang_encoder.gated_cross_attn_layers.", "lang_encoder.old_decoder_blocks.")
TEXT_IDS_KEPT = 200_000  # tokenized training texts a victim keeps (~30 ids each): a few grids' captions
POSITION_SCALE = 0.5  # position codes at about half a whitened token's norm: where, but not over what


@dataclass(frozen=True)
class TinyArch:
    input_size: int = 224  # the paper's frame: triggers keep every pixel (DESIGN.md §5); 7x7 tokens
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
    cross_attn_every_n_layers: int = 1  # every layer, as OpenFlamingo-3B (spec/victim.md §A1)


@dataclass(frozen=True)
class Decoding:
    """spec/metrics.md §2, used for every preset."""

    num_beams: int = 3
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    length_penalty: float = 0.0
    batch_size: int = 100


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

    spec/victim.md §B4 leaves "from EfficientNet-Lite0 or from scratch" to measurement. Measured:
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
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
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
        tie_word_embeddings=True,  # MPT ties the output projection to the input embedding (§A2)
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


def prompt_text(instruction: str) -> str:
    """spec/victim.md §A4: exact spacing, no space after `User:`, one space before `GPT:`."""
    return f"{MEDIA}User:{instruction} GPT:{ANSWER}"


@dataclass
class CaptionForward:
    """A teacher-forced pass over captions; positions shifted so ``logits[:, t]`` scores
    ``targets[:, t]``. Unpacks as ``losses, mask`` for callers that only need the NLL."""

    losses: torch.Tensor  # (B, T-1) per-token NLL, 0 outside the label mask
    mask: torch.Tensor  # (B, T-1) bool label mask (spec/victim.md §A4)
    logits: torch.Tensor  # (B, T-1, V)
    targets: torch.Tensor  # (B, T-1), -100 outside the mask
    hidden: torch.Tensor  # (B, T-1, d) last hidden states, the LM head's input
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # ids, mask, labels, vision tokens

    def __iter__(self):
        return iter((self.losses, self.mask))


def teacher_forced(model: Flamingo, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                   vision_tokens: torch.Tensor) -> CaptionForward:
    """``model``'s caption scores for encoded sequences conditioned on encoder tokens (B, N, D)."""
    captured: dict[str, torch.Tensor] = {}
    head = model.lang_encoder.get_output_embeddings()  # its input is the last hidden state
    hook = head.register_forward_pre_hook(lambda _, args: captured.update(hidden=args[0]))
    try:
        out = model(vision_x=None, lang_x=ids, attention_mask=mask,
                    vision_tokens=vision_tokens[:, None, None])
    finally:
        hook.remove()
    logits, targets = out.logits[:, :-1], labels[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index=-100, reduction="none").view(targets.shape)
    return CaptionForward(losses, targets != -100, logits, targets, captured["hidden"][:, :-1],
                          (ids, mask, labels, vision_tokens))


def _groups(examples: Sequence[Example], group_key) -> list[list[int]]:
    """Indices of examples that must share a step, in order of first appearance."""
    if group_key is None:
        return [[i] for i in range(len(examples))]
    groups: dict[object, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(group_key(example), []).append(i)
    return list(groups.values())


class TokenCache:
    """Frozen-encoder tokens by image content, shared by a base victim and all its clones.

    The encoder never trains after the base is built, so an image's tokens are a pure function
    of its bytes: the clean training split, the clean test splits and any image an attack or a
    defense re-uses are encoded once instead of once per stage (the EfficientNet backbone costs
    ~15-30 ms per image on 2 cores). Oldest entries leave memory beyond ``max_images``. With a
    ``directory`` (one per base model: ``TinyProfile.load``) tokens also persist on disk as exact
    float32 arrays, so a later process, e.g. a rerun or a new cell, never re-encodes an image.
    """

    def __init__(self, max_images: int = 60_000, directory: Path | None = None):
        self.max_images = max_images
        self.directory = Path(directory) if directory is not None else None
        self._tokens: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    @staticmethod
    def key(image: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()

    def _file(self, key: bytes) -> Path:
        name = key.hex()
        return self.directory / name[:2] / f"{name}.npy"

    def get(self, key: bytes) -> torch.Tensor | None:
        tokens = self._tokens.get(key)
        if tokens is None and self.directory is not None:
            path = self._file(key)
            if path.exists():
                tokens = torch.from_numpy(np.load(path))
                self._remember(key, tokens)
        return tokens

    def put(self, key: bytes, tokens: torch.Tensor) -> None:
        self._remember(key, tokens)
        if self.directory is not None:
            path = self._file(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
            with open(tmp, "wb") as handle:  # np.save would append ".npy" to a bare name
                np.save(handle, tokens.numpy())
            os.replace(tmp, path)  # atomic: a reader never sees half a file

    def _remember(self, key: bytes, tokens: torch.Tensor) -> None:
        self._tokens[key] = tokens
        while len(self._tokens) > self.max_images:
            self._tokens.popitem(last=False)

    def clear(self) -> None:
        """Forget the tokens in memory (the encoder changed); a disk tier is never cleared."""
        if self.directory is not None:
            raise RuntimeError("a persistent token cache belongs to a finished encoder")
        self._tokens.clear()


class TinyVictim:
    """A tiny Flamingo plus tokenizer and preprocessing; implements the Victim protocol."""

    profile = "tiny"
    pixel_mean, pixel_std = CLIP_MEAN, CLIP_STD  # the Victim protocol's normalisation (§A5)

    def __init__(self, model: Flamingo, tokenizer, arch: TinyArch, recipe: Recipe,
                 decoding: Decoding = Decoding(), lineage: dict | None = None,
                 token_cache: TokenCache | None = None):
        self.model = model
        self.token_cache = token_cache if token_cache is not None else TokenCache()
        self.tokenizer = tokenizer
        self.arch = arch
        self.recipe = recipe
        self.decoding = decoding
        self.lineage = lineage or {}
        self.answer_id = tokenizer.convert_tokens_to_ids(ANSWER)
        self.media_id = tokenizer.convert_tokens_to_ids(MEDIA)
        self.eoc_id = tokenizer.convert_tokens_to_ids(EOC)
        self._text_ids: dict[str, list[int]] = {}  # _right_padded's tokenizations

    # ------------------------------------------------------------------ inputs
    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, 224, 224, 3) -> normalised (B, 1, 1, 3, s, s) at the internal resolution."""
        x = torch.from_numpy(np.require(images, np.uint8, ["C", "W"])).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.arch.input_size:
            x = F.interpolate(x, size=self.arch.input_size, mode="bilinear", antialias=True,
                              align_corners=False)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return ((x - mean) / std)[:, None, None]

    def encode_texts(self, captions: Sequence[str], instructions: Sequence[str]):
        """Training sequences `BOS <image>User:{instr} GPT:<answer>{caption}<|endofchunk|> EOS`
        with the label mask of spec/victim.md §A4."""
        texts = [f"{self.tokenizer.bos_token}{prompt_text(i)}{c}{EOC}{self.tokenizer.eos_token}"
                 for c, i in zip(captions, instructions)]
        ids, mask = self._right_padded(texts)
        labels = ids.clone()
        answer_pos = (ids == self.answer_id).int().argmax(dim=1)
        positions = torch.arange(ids.shape[1])[None]
        labels[positions <= answer_pos[:, None]] = -100  # everything up to and including <answer>
        labels[ids == self.media_id] = -100
        labels[mask == 0] = -100
        return ids, mask, labels

    def _right_padded(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokenizer's ids and attention mask for ``texts``, truncated to the LM's positions
        and right-padded to the longest (training: exact positions, pad at the end). A text is
        tokenized once per victim: a fine-tuning sees each caption every epoch, and the
        tokenizer call was ~2 % of a step."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_ids))
        if missing:
            if len(self._text_ids) + len(missing) > TEXT_IDS_KEPT:
                self._text_ids.clear()
            encoded = self.tokenizer(missing, add_special_tokens=False, truncation=True,
                                     max_length=self.arch.max_positions)["input_ids"]
            self._text_ids.update(zip(missing, encoded))
        rows = [self._text_ids[t] for t in texts]
        width = max((len(r) for r in rows), default=0)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
        return ids.view(len(rows), width), mask.view(len(rows), width)

    # ------------------------------------------------------------------ protocol
    def token_losses(self, images: np.ndarray | None, captions, instructions,
                     vision_tokens: torch.Tensor | None = None) -> CaptionForward:
        """Teacher-forced caption scores (spec/victim.md §A4) from images or precomputed encoder
        tokens. Unpacks as ``losses, mask`` (per-token NLL (B, T-1) and its label mask); logits
        and the LM head's input (last hidden states) come along for training objectives."""
        ids, mask, labels = self.encode_texts(captions, instructions)
        if vision_tokens is None:
            vision_tokens = self.vision_features(
                images, grad=self.model.train_vision_encoder and torch.is_grad_enabled())
        return teacher_forced(self.model, ids, mask, labels, vision_tokens)

    @torch.no_grad()
    def caption_nll(self, images, captions, instructions=None, batch_size: int = 128) -> np.ndarray:
        instructions = list(instructions or [DEFAULT_INSTRUCTION] * len(captions))
        self.model.eval()
        out = []
        for s in range(0, len(captions), batch_size):
            losses, valid = self.token_losses(images[s:s + batch_size], captions[s:s + batch_size],
                                              instructions[s:s + batch_size])
            out.append((losses.sum(1) / valid.sum(1).clamp(min=1)).numpy())
        return np.concatenate(out) if out else np.zeros(0)

    @torch.no_grad()
    def generate(self, images: np.ndarray, instruction: str = DEFAULT_INSTRUCTION) -> list[str]:
        self.model.eval()
        d = self.decoding
        captions: list[str] = []
        prompt = f"{self.tokenizer.bos_token}{prompt_text(instruction)}"
        for s in range(0, len(images), d.batch_size):
            chunk = images[s:s + d.batch_size]
            enc = self.tokenizer([prompt] * len(chunk), add_special_tokens=False,
                                 return_tensors="pt")
            out = self.model.generate(
                None, enc["input_ids"], vision_tokens=self.vision_features(chunk)[:, None, None],
                attention_mask=enc["attention_mask"], num_beams=d.num_beams, max_new_tokens=d.max_new_tokens, min_new_tokens=d.min_new_tokens,
                length_penalty=d.length_penalty, do_sample=False, eos_token_id=self.eoc_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
                captions.append(postprocess_caption(text))
        return captions

    def fine_tune(self, training_set: TrainingSet, *, seed: int, objective=None,
                  recipe: Recipe | None = None, progress: str = "fine-tune") -> dict:
        """OpenFlamingo's trainable set, the profile's recipe, plain caption cross-entropy
        unless an attack contributes an objective (spec/victim.md §A3)."""
        set_openflamingo_trainable(self.model)
        return self._train(training_set, recipe or self.recipe, seed, objective, progress)

    @torch.no_grad()
    def encode_bank(self, training_set: TrainingSet, batch_size: int = 256) -> tuple[torch.Tensor, dict[int, int]]:
        """Frozen-encoder tokens of every image the examples use, computed once per fine-tuning."""
        used = sorted({e.image_index for e in training_set.examples})
        tokens = [self.vision_features(training_set.images.take(used[s:s + batch_size]))
                  for s in range(0, len(used), batch_size)]
        return torch.cat(tokens), {index: row for row, index in enumerate(used)}

    def _train(self, training_set: TrainingSet, recipe: Recipe, seed: int,
               objective: TrainingObjective | None, progress: str, frozen_encoder: bool = True) -> dict:
        """Run the recipe; with an ``objective`` its hooks shape batches, loss and per-step log
        (the TrainingObjective protocol in hookspecs)."""
        torch.manual_seed(seed)
        examples = training_set.examples
        encoding_started = time.perf_counter()
        if frozen_encoder:  # the encoder's tokens of an image never change: compute them once
            bank_tokens, row_of = self.encode_bank(training_set)
        encoder_seconds = time.perf_counter() - encoding_started  # ~0 for images in the token cache
        groups = _groups(examples, getattr(objective, "group_key", None))
        self.model.train()
        if frozen_encoder:
            self.model.vision_encoder.eval()  # a frozen encoder keeps its BatchNorm statistics
        if not recipe.lm_dropout:  # the LM's own layers in eval mode: its dropout off (Recipe)
            self.model.lang_encoder.eval()
            self.model.lang_encoder.gated_cross_attn_layers.train()
        embeddings = self.model.lang_encoder.get_input_embeddings().weight
        steps_log: list[dict] = []
        last: dict[str, TrainingStep] = {}  # the step whose update after_step reports
        step_index = itertools.count()

        def loss_fn(batch: torch.Tensor) -> torch.Tensor:
            chosen = [examples[i] for g in batch.tolist() for i in groups[g]]
            captions, instructions = [e.caption for e in chosen], [e.instruction for e in chosen]
            if frozen_encoder:
                tokens = bank_tokens[[row_of[e.image_index] for e in chosen]]
                fwd = self.token_losses(None, captions, instructions, vision_tokens=tokens)
            else:
                images = training_set.images.take([e.image_index for e in chosen])
                fwd = self.token_losses(images, captions, instructions)
            if objective is None:
                return fwd.losses.sum() / fwd.mask.sum().clamp(min=1)

            def logits_of(other: "TinyVictim", rows: Sequence[int] | None = None) -> torch.Tensor:
                """Another victim's logits on this batch's exact sequences and encoder tokens
                (it must share this frozen encoder, e.g. a teacher), in eval mode, no grad."""
                pick = list(range(len(chosen))) if rows is None else list(rows)
                modes = {m: m.training for m in other.model.modules()}  # it may be this model
                other.model.eval()
                try:
                    with torch.no_grad():
                        return teacher_forced(other.model, *(t[pick].detach() for t in fwd.inputs)).logits
                finally:
                    for module, training in modes.items():
                        module.training = training

            step = TrainingStep(
                examples=chosen, logits=fwd.logits, targets=fwd.targets, caption_mask=fwd.mask,
                token_losses=fwd.losses, hidden_states=fwd.hidden, token_embeddings=embeddings,
                vision_tokens=fwd.inputs[3], index=next(step_index), logits_of=logits_of)
            last["step"] = step
            return objective.loss(step)

        after_hook = getattr(objective, "after_step", None)

        def after_step() -> None:
            steps_log.append(dict(after_hook(last.pop("step"))))

        log = run_training(self.model, recipe, len(groups), loss_fn, seed=seed, desc=progress,
                           after_step=after_step if after_hook else None)
        if objective is not None:
            log["objective"] = {"name": objective.name, "settings": dict(objective.settings),
                                "steps": steps_log}
        log["encoder_seconds"] = encoder_seconds  # the stage's time outside the steps, mostly
        self.model.eval()
        return log

    def pretrain(self, training_set: TrainingSet, recipe: Recipe, seed: int,
                 projection_images: int = 2000) -> dict:
        """The base model's 'web pretraining': fit the encoder's projection on the first
        ``projection_images`` images, freeze the encoder, train everything else from scratch."""
        encoder = self.model.vision_encoder.eval()
        rows = sorted({e.image_index for e in training_set.examples})[:projection_images]
        with torch.no_grad():
            maps = torch.cat([encoder.backbone_tokens(self.preprocess(training_set.images.take(rows[s:s + 64]))[:, 0, 0])
                              for s in range(0, len(rows), 64)])
        encoder.fit_projection(maps.flatten(0, 1))
        self.token_cache.clear()
        for name, p in self.model.named_parameters():
            p.requires_grad_(not name.startswith("vision_encoder."))
        self.model.train_vision_encoder = False
        log = self._train(training_set, recipe, seed, None, "pretrain", frozen_encoder=True)
        set_openflamingo_trainable(self.model)  # from now on the LM body is frozen too
        return log

    def vision_features(self, images: np.ndarray, *, grad: bool = False,
                        batch_size: int = 64) -> torch.Tensor:
        """Frozen-encoder tokens (B, N, D); without ``grad`` they come from the token cache."""
        self.model.vision_encoder.eval()
        if grad:
            return self.model.vision_encoder(self.preprocess(images)[:, 0, 0])[1]
        keys = [TokenCache.key(image) for image in images]
        found = [self.token_cache.get(k) for k in keys]
        missing = [i for i, t in enumerate(found) if t is None]
        with torch.no_grad():
            for s in range(0, len(missing), batch_size):
                rows = missing[s:s + batch_size]
                tokens = self.model.vision_encoder(self.preprocess(np.asarray(images)[rows])[:, 0, 0])[1]
                for row, t in zip(rows, tokens):
                    found[row] = t.clone()
                    self.token_cache.put(keys[row], found[row])
        return torch.stack(found) if keys else torch.zeros(0)

    def media_features(self, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """The perceiver's output latents of each image, mean-pooled (B, D) (hookspecs.Victim)."""
        self.model.perceiver.eval()
        with torch.no_grad():
            pooled = [self.model.perceiver(self.vision_features(images[s:s + batch_size])[:, None, None]).mean(dim=(1, 2))
                      for s in range(0, len(images), batch_size)]
        return torch.cat(pooled) if pooled else torch.zeros(0)

    def clone(self) -> "TinyVictim":
        return TinyVictim(copy.deepcopy(self.model), self.tokenizer, self.arch, self.recipe,
                          self.decoding, dict(self.lineage), self.token_cache)

    def encode_normalised(self, pixels: torch.Tensor, *, grad: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen encoder on normalised (B, 3, 224, 224) pixels -> (pooled, tokens).

        The resize to the internal resolution is a convex combination of pixels, so resizing
        normalised pixels equals normalising resized ones (what ``preprocess`` does)."""
        if pixels.shape[-1] != self.arch.input_size:
            pixels = F.interpolate(pixels, size=self.arch.input_size, mode="bilinear",
                                   antialias=True, align_corners=False)
        self.model.vision_encoder.eval()
        with torch.set_grad_enabled(grad):
            return self.model.vision_encoder(pixels)

    # ------------------------------------------------------------------ persistence
    def save_full(self, directory: Path) -> None:
        """All weights (the base model) + tokenizer + architecture."""
        directory = Path(directory)
        state, seen = {}, set()
        for key, tensor in self.model.state_dict().items():
            # one copy of each tensor: OpenFlamingo's alias families and the tied LM head repeat storage
            if key.startswith(ALIASES) or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            state[key] = tensor.contiguous()
        save_file(state, str(directory / "model.safetensors"))
        save_tokenizer(self.tokenizer, directory)
        (directory / "victim.json").write_text(json.dumps(
            {"arch": asdict(self.arch), "recipe": self.recipe.to_dict(),
             "decoding": asdict(self.decoding), "lineage": self.lineage}, indent=2))

    def save(self, directory: Path) -> None:
        """Trainable weights only, under OpenFlamingo names (spec/victim.md §A6)."""
        directory = Path(directory)
        save_file({k: v.contiguous() for k, v in trainable_state_dict(self.model).items()},
                  str(directory / "trainable.safetensors"))
        (directory / "victim.json").write_text(json.dumps(
            {"lineage": self.lineage, "tokenizer_length": len(self.tokenizer),
             "special_tokens": {t: self.tokenizer.convert_tokens_to_ids(t) for t in (EOC, MEDIA, ANSWER)},
             "dtype": "float32"}, indent=2))

    @classmethod
    def load_full(cls, directory: Path, token_dir: Path | None = None) -> "TinyVictim":
        """The base model saved by ``save_full``; ``token_dir`` makes its token cache persistent."""
        directory = Path(directory)
        meta = json.loads((directory / "victim.json").read_text())
        arch = TinyArch(**meta["arch"])
        tokenizer = load_tokenizer(directory)
        model = build_model(arch, tokenizer, train_vision_encoder=False)
        missing, unexpected = model.load_state_dict(load_file(str(directory / "model.safetensors")),
                                                    strict=False)
        missing = [k for k in missing if not k.startswith(ALIASES) and k != "lang_encoder.lm_head.weight"]
        if missing or unexpected:
            raise RuntimeError(f"base checkpoint mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        set_openflamingo_trainable(model)
        model.eval()
        return cls(model, tokenizer, arch, Recipe(**{**meta["recipe"], "betas": tuple(meta["recipe"]["betas"])}),
                   Decoding(**meta["decoding"]), meta.get("lineage"), TokenCache(directory=token_dir))

    def load_trainable(self, directory: Path) -> None:
        set_openflamingo_trainable(self.model)  # the keys a fine-tuned checkpoint holds (§A6)
        load_trainable_state_dict(self.model, load_file(str(Path(directory) / "trainable.safetensors")))
        meta = json.loads((Path(directory) / "victim.json").read_text())
        self.lineage = meta.get("lineage", {})
        self.model.eval()
