"""The OpenFlamingo-3B victim (methods/victim.md Part A), assembled from local directories.

CLIP ViT-L/14 vision tower (clip_vision) + MPT-1B (mosaic_gpt) + the GPT-NeoX-20B tokenizer with
OpenFlamingo's special tokens (neox_tokenizer) + our Flamingo with a gated cross-attention block
before every LM layer and the library's perceiver/cross-attention defaults (flamingo.py), then the
OpenFlamingo checkpoint imported strictly (of_checkpoint). Every size comes from the directories'
configs. Nothing is downloaded.

The base entry a grid stores is small: the imported trainable set (safetensors) and a manifest
naming the local directories with sha256 of their files; loading rebuilds the model from those
directories and refuses when a file changed. The 3B frozen weights are never copied into the store.

``random_weights=True`` builds the full-size architecture from the config files and tokenizer
alone (no weight file, no checkpoint, random initialisation on the target device): a model for
speed and memory benchmarks (``vbb bench``), never for results.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPVisionModelWithProjection

from ..atomic import write_text_atomic
from ..device import Precision
from ..errors import VbbError
from .clip_vision import ClipVisionAdapter, load_clip_vision
from .flamingo import Flamingo, set_openflamingo_trainable
from .flamingo_victim import Decoding, FlamingoVictim, trainable_modules
from .mosaic_gpt import MosaicGPT, load_mosaic_gpt, read_config
from .neox_tokenizer import load_openflamingo_tokenizer
from .of_checkpoint import CheckpointReport, architecture, import_checkpoint
from .token_cache import TokenCache
from .training import Recipe

MPT_DECODER_LAYERS = "transformer.blocks"  # methods/victim.md §B1
CROSS_ATTN_EVERY_N_LAYERS = 1  # OpenFlamingo-3B: before every LM layer (methods/victim.md §A1)
MAX_TEXT_TOKENS = 2048  # training sequences' max length (methods/victim.md §A4)
BASE_MANIFEST = "openflamingo_base.json"
BASE_FORMAT = "vlmbackdoor-bench/openflamingo-base/1"
HASHED_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth")  # configs, tokenizers, weights


@dataclass(frozen=True)
class LocalParts:
    """The four local paths of the profile (``[profile.openflamingo-3b]``)."""

    clip_vit_l14_dir: Path
    mpt_1b_dir: Path
    tokenizer_dir: Path
    openflamingo_checkpoint: Path

    @classmethod
    def from_params(cls, params) -> "LocalParts":
        return cls(*(Path(params[key]) for key in PART_KEYS))

    def as_dict(self) -> dict[str, str]:
        return {key: str(getattr(self, key)) for key in PART_KEYS}


PART_KEYS = tuple(f.name for f in fields(LocalParts))  # the profile's path keys
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime): a 3B weight file is hashed once per process


def file_sha256(path: Path) -> str:
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        _DIGESTS[memo] = digest.hexdigest()
    return _DIGESTS[memo]


def part_hashes(parts: LocalParts) -> dict[str, dict[str, str]]:
    """sha256 of every config, tokenizer and weight file of each part (a file for the checkpoint)."""
    out: dict[str, dict[str, str]] = {}
    for key, path in ((k, Path(v)) for k, v in parts.as_dict().items()):
        files = [path] if path.is_file() else sorted(
            p for p in path.iterdir() if p.is_file() and p.name.endswith(HASHED_SUFFIXES))
        out[key] = {p.name: file_sha256(p) for p in files}
    return out


def bf16_token_cache(max_bytes: int, directory: Path | None = None) -> TokenCache:
    """OpenFlamingo-3B's 256 x 1024 tokens per image in bfloat16 (0.5 MiB), bounded by bytes."""
    return TokenCache(max_images=2**62, directory=directory, dtype=torch.bfloat16, max_bytes=max_bytes)


def frozen_dtype_for(device: torch.device, precision: Precision) -> torch.dtype:
    """On CUDA the frozen encoder and LM body are stored in the eval dtype (bf16 by default) to fit
    memory; every computation on them runs under autocast in that dtype anyway. Trainable weights
    stay float32 masters. On the CPU everything is float32."""
    return precision.eval_torch_dtype if device.type == "cuda" else torch.float32


def _random_vision(clip_dir: Path, tokens_after_post_ln: bool) -> ClipVisionAdapter:
    full = CLIPConfig.from_pretrained(clip_dir, local_files_only=True)
    full.vision_config.projection_dim = full.projection_dim  # as load_clip_vision reads it
    return ClipVisionAdapter(CLIPVisionModelWithProjection(full.vision_config),
                             tokens_after_post_ln=tokens_after_post_ln)


def assemble(parts: LocalParts, *, tokens_after_post_ln: bool, device: torch.device,
             frozen_dtype: torch.dtype, random_weights: bool = False):
    """(Flamingo on ``device``, tokenizer, token record) from the local parts, before any checkpoint."""
    tokenizer, tokens = load_openflamingo_tokenizer(parts.tokenizer_dir)
    if random_weights:
        with torch.device(device):  # initialise where it runs: 3B random weights on the CPU take minutes
            vision = _random_vision(parts.clip_vit_l14_dir, tokens_after_post_ln)
            lm = MosaicGPT(read_config(parts.mpt_1b_dir))
        vision.to(frozen_dtype)
        lm.to(frozen_dtype)
    else:
        vision = load_clip_vision(parts.clip_vit_l14_dir, tokens_after_post_ln=tokens_after_post_ln,
                                  dtype=frozen_dtype)
        lm = load_mosaic_gpt(parts.mpt_1b_dir, dtype=frozen_dtype)
    # OpenFlamingo's factory resizes the embedding to the extended tokenizer (methods/victim.md §A4);
    # the checkpoint import maps its rows onto these.
    lm.resize_token_embeddings(tokens.length, mean_resizing=False)
    with torch.device(device):
        model = Flamingo(vision, lm, eoc_token_id=tokens.eoc_id, media_token_id=tokens.media_id,
                         vis_dim=vision.vis_dim, cross_attn_every_n_layers=CROSS_ATTN_EVERY_N_LAYERS,
                         decoder_layers_attr_name=MPT_DECODER_LAYERS)
    set_openflamingo_trainable(model)
    for module in trainable_modules(model):
        module.float()  # fp32 master weights for what the optimiser updates
    return model.to(device).eval(), tokenizer, tokens


class OpenFlamingoVictim(FlamingoVictim):
    """OpenFlamingo-3B behind the Victim protocol; ``parts`` are the local directories it came from."""

    profile = "openflamingo-3b"

    def __init__(self, model: Flamingo, tokenizer, parts: LocalParts, *, recipe: Recipe,
                 decoding: Decoding = Decoding(), lineage: dict | None = None,
                 token_cache: TokenCache | None = None, device: torch.device | str | None = None,
                 precision: Precision | None = None, imported: CheckpointReport | None = None,
                 tokens_after_post_ln: bool = False):
        super().__init__(model, tokenizer, input_size=model.vision_encoder.image_size,
                         max_text_tokens=MAX_TEXT_TOKENS, recipe=recipe, decoding=decoding, lineage=lineage,
                         token_cache=token_cache, device=device, precision=precision)
        self.parts = parts
        self.imported = imported
        self.tokens_after_post_ln = tokens_after_post_ln

    @classmethod
    def from_parts(cls, parts: LocalParts, *, recipe: Recipe, token_cache_bytes: int,
                   decoding: Decoding = Decoding(), device: torch.device | str = "cpu",
                   precision: Precision | None = None, tokens_after_post_ln: bool = False,
                   random_weights: bool = False) -> "OpenFlamingoVictim":
        """Assemble and, unless ``random_weights``, import the OpenFlamingo checkpoint; the token
        cache holds up to ``token_cache_bytes`` of bf16 encoder tokens in memory."""
        device = torch.device(device)
        precision = precision or Precision()
        model, tokenizer, tokens = assemble(parts, tokens_after_post_ln=tokens_after_post_ln, device=device,
                                            frozen_dtype=frozen_dtype_for(device, precision),
                                            random_weights=random_weights)
        report = None if random_weights else import_checkpoint(parts.openflamingo_checkpoint, model, tokens)
        return cls(model, tokenizer, parts, recipe=recipe, decoding=decoding,
                   token_cache=bf16_token_cache(token_cache_bytes), device=device, precision=precision,
                   imported=report, tokens_after_post_ln=tokens_after_post_ln)

    def save_full(self, directory: Path) -> None:
        """The base entry: the trainable set (``save``) and a manifest of the local parts with the
        sha256 of their files; the frozen weights stay where they are."""
        if self.imported is None:
            raise VbbError("a random-weights OpenFlamingo model was asked to be saved as a base model",
                           "build the victim from the local weights (random_weights=False)")
        directory = Path(directory)
        self.save(directory)
        manifest = {"format": BASE_FORMAT, "parts": self.parts.as_dict(), "file_sha256": part_hashes(self.parts),
                    "tokens_after_post_ln": self.tokens_after_post_ln, "architecture": architecture(self.model),
                    "imported": self.imported.as_dict(), "recipe": self.recipe.to_dict(),
                    "decoding": asdict(self.decoding), "token_cache_bytes": self.token_cache.max_bytes}
        write_text_atomic(directory / BASE_MANIFEST, json.dumps(manifest, indent=2) + "\n")

    @classmethod
    def load_base(cls, directory: Path, *, device: torch.device | str = "cpu", precision: Precision | None = None,
                  token_dir: Path | None = None) -> "OpenFlamingoVictim":
        """Rebuild a base saved by ``save_full`` from its local parts; a VbbError if any file of
        them changed since (another LM, another checkpoint) or the parts now build another model.
        ``token_dir`` makes its token cache persistent (one directory per base)."""
        directory = Path(directory)
        manifest = json.loads((directory / BASE_MANIFEST).read_text())
        parts = LocalParts.from_params(manifest["parts"])
        missing = [f"{k} = {v}" for k, v in parts.as_dict().items() if not Path(v).exists()]
        if missing:
            raise VbbError(f"the OpenFlamingo base in {directory} was built from local files that are gone: "
                           + "; ".join(missing), "restore them, or point the profile at the new paths and rebuild "
                           "(a new base key)")
        now = part_hashes(parts)
        changed = sorted(f"{key}/{name}" for key in PART_KEYS
                         for name in set(now[key]) | set(manifest["file_sha256"][key])
                         if now[key].get(name) != manifest["file_sha256"][key].get(name))
        if changed:
            raise VbbError(f"files of the OpenFlamingo base's local parts changed since {directory} was built: "
                           + ", ".join(changed), "restore the original files, or delete this base entry so the "
                           "grid rebuilds it (results built on the old one stay theirs)")
        device = torch.device(device)
        precision = precision or Precision()
        tokens_after_post_ln = manifest["tokens_after_post_ln"]
        model, tokenizer, _ = assemble(parts, tokens_after_post_ln=tokens_after_post_ln, device=device,
                                       frozen_dtype=frozen_dtype_for(device, precision))
        if json.loads(json.dumps(architecture(model))) != manifest["architecture"]:
            raise VbbError(f"the local parts now build another architecture than the base in {directory}",
                           "rebuild the base from the current parts")
        recipe = Recipe(**{**manifest["recipe"], "betas": tuple(manifest["recipe"]["betas"])})
        victim = cls(model, tokenizer, parts, recipe=recipe, decoding=Decoding(**manifest["decoding"]),
                     token_cache=bf16_token_cache(manifest["token_cache_bytes"], token_dir), device=device,
                     precision=precision, imported=CheckpointReport(**manifest["imported"]),
                     tokens_after_post_ln=tokens_after_post_ln)
        victim.load_trainable(directory)
        return victim
