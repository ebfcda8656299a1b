"""Import an OpenFlamingo checkpoint into our Flamingo once, kept in the benchmark's format (methods/victim.md §A6).

What open-flamingo 2.0.1 saves (open_flamingo/train/train_utils.py ``filter_state_dict_to_trainable``, and the
public ``checkpoint.pt`` files made with it): the trainable parameters only, i.e. ``perceiver.*``, the gated
cross-attention layers under ``lang_encoder.<decoder layers>.<i>.gated_cross_attn_layer.*`` (the duplicate
``lang_encoder.gated_cross_attn_layers.<i>.*`` alias is dropped; other savers keep either or both) and the LM
input embedding ``lang_encoder.transformer.wte.weight``, which stays in the file because it trains unless
``--freeze_lm_embeddings``. A training checkpoint wraps that dict in ``{"model_state_dict": ..., "epoch": ...}``
with DDP's ``module.`` prefix. Nothing is ever unpickled beyond tensors (``weights_only=True``).

Embedding rows are mapped, never resized: the checkpoint has one row per token of OpenFlamingo's tokenizer
(base vocabulary, ``<|endofchunk|>``, ``<image>``, ``<PAD>``); our tokenizer adds ``<answer>`` after those
(neox_tokenizer), whose row is set by :data:`EXTRA_ROW_RULE`.

Pairing with the LM: OpenFlamingo-3B's run script trains with DDP, where train_utils masks the embedding
gradient to the ``<image>`` and ``<|endofchunk|>`` rows and train.py puts no weight decay on the embedding,
so the checkpoint's base-vocabulary rows are the LM's own rows. Their relative difference is the pairing
statistic (see :data:`BASE_ROW_DRIFT_LIMIT`). OpenFlamingo-3B-vitl-mpt1b pairs with the non-dolly
``anas-awadalla/mpt-1b-redpajama-200b``; the ``-dolly`` LM pairs with ``-langinstruct`` (methods/victim.md §A1).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerFast

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.victims.flamingo import (
    ALIAS_PREFIXES,
    Flamingo,
    describe_key_mismatch,
    input_embeddings,
    load_trainable_state_dict,
    set_openflamingo_trainable,
    trainable_state_dict,
)
from vlmbackdoor_bench.victims.neox_tokenizer import OpenFlamingoTokens, openflamingo_tokens

FLAT_ALIAS = ALIAS_PREFIXES[0]  # "lang_encoder.gated_cross_attn_layers."
TRAINING_CHECKPOINT_KEY = "model_state_dict"  # open-flamingo 2.0.1 train_utils.save_checkpoint
DDP_PREFIX = "module."  # stripped by open-flamingo's own resume code (train.py)
# The base-vocabulary rows of a paired checkpoint equal the LM's (module docstring); storing either side in
# bf16 moves them by at most 2^-9 relative per element (~0.1 % RMS). 1 % leaves room for that and flags
# embeddings that were trained or come from another LM. Derived from open-flamingo 2.0.1's training code,
# unverified on the real OpenFlamingo-3B / MPT-1B weights (how far the dolly LM's rows are from the base
# LM's has not been measured).
BASE_ROW_DRIFT_LIMIT = 1e-2
EXTRA_ROW_RULE = "mean of the checkpoint's base-vocabulary rows"
TRAINABLE_FILE = "trainable.safetensors"
METADATA_FILE = "openflamingo_import.json"
FORMAT = "vlmbackdoor-bench/openflamingo-trainable/1"
NON_DOLLY = ("OpenFlamingo-3B-vitl-mpt1b pairs with the non-dolly anas-awadalla/mpt-1b-redpajama-200b "
             "(the -dolly LM pairs with OpenFlamingo-3B-vitl-mpt1b-langinstruct), methods/victim.md §A1")


@dataclass(frozen=True)
class CheckpointReport:
    """What an import found and did. ``alias_family``: which gated cross-attention names the file used
    (``nested`` = ``lang_encoder.<layers>.<i>.gated_cross_attn_layer.*``, ``flat`` =
    ``lang_encoder.gated_cross_attn_layers.<i>.*``, ``both``). The import is strict, so a returned report has
    ``missing == unexpected == 0``; any other count is raised as a VbbError that states both counts."""

    source: str
    container: str  # "state dict", "training checkpoint" or "safetensors"
    epoch: int | None
    checkpoint_dtype: str
    loaded: int
    missing: int
    unexpected: int
    alias_family: str
    alias_duplicates_dropped: int
    alias_renamed: int
    checkpoint_rows: int
    openflamingo_rows: int
    tokenizer_length: int
    lm_rows: int
    extra_rows: dict[str, str] = field(default_factory=dict)
    base_rows_compared: int = 0
    base_row_drift: float = 0.0
    base_row_drift_limit: float | None = BASE_ROW_DRIFT_LIMIT

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- reading


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str, int | None]:
    """(state dict, container kind, epoch) of a ``.pt``/``.bin`` (weights only) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise VbbError(f"no OpenFlamingo checkpoint at {path}",
                       "set openflamingo_checkpoint to a local checkpoint.pt or .safetensors file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), "safetensors", None
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise VbbError(f"cannot read the safetensors checkpoint {path}: {e}", "download the file again") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        reason = detail.group(1).strip() if detail else str(e).splitlines()[0]
        if "Unsupported global" not in str(e):  # not a torch pickle at all (damaged, or another format)
            raise VbbError(f"cannot read the checkpoint {path}: {reason}", "download or copy the file again") from e
        raise VbbError(f"{path} holds pickled objects other than tensors and plain containers, so it cannot be "
                       f"loaded with weights_only=True and is never unpickled here ({reason})",
                       "re-save its state dict of tensors (torch.save(state_dict) or safetensors) in a trusted "
                       "environment") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise VbbError(f"cannot read the checkpoint {path}: {e}", "download or copy the file again") from e
    container, epoch = "state dict", None
    if isinstance(obj, dict) and isinstance(obj.get(TRAINING_CHECKPOINT_KEY), dict):
        container, epoch = "training checkpoint", obj.get("epoch")
        obj = obj[TRAINING_CHECKPOINT_KEY]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise VbbError(f"{path} is not a state dict of tensors (nor a training checkpoint with "
                       f"'{TRAINING_CHECKPOINT_KEY}')", "pass OpenFlamingo's checkpoint.pt")
    state = {k.removeprefix(DDP_PREFIX): v for k, v in obj.items()}
    return state, container, epoch if isinstance(epoch, int) else None


def merge_aliases(state: dict[str, torch.Tensor],
                  decoder_layers: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Keep one name per gated cross-attention tensor: ``lang_encoder.<decoder_layers>.<i>.gated_cross_attn_layer.*``
    (the name our trainable state uses). Flat-alias tensors are renamed to it; where both names are present
    the tensors must be equal (else a VbbError)."""
    nested = re.compile(rf"^lang_encoder\.{re.escape(decoder_layers)}\.(\d+)\.gated_cross_attn_layer\.")
    out: dict[str, torch.Tensor] = {}
    flat: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        (flat if key.startswith(FLAT_ALIAS) else out)[key] = tensor
    n_nested = sum(1 for k in out if nested.match(k))
    dropped = renamed = 0
    for key, tensor in flat.items():
        index, _, rest = key.removeprefix(FLAT_ALIAS).partition(".")
        target = f"lang_encoder.{decoder_layers}.{index}.gated_cross_attn_layer.{rest}"
        if target in out:
            twin = out[target]
            if twin.shape != tensor.shape or not torch.equal(twin, tensor.to(twin.dtype)):
                raise VbbError(f"the checkpoint's two names of one gated cross-attention tensor differ: {key} and "
                               f"{target}", "the file is inconsistent; re-export it from the trained model")
            dropped += 1
        else:
            out[target] = tensor
            renamed += 1
    family = ("both" if flat and n_nested else "flat" if flat else "nested" if n_nested else "none")
    return out, {"alias_family": family, "alias_duplicates_dropped": dropped, "alias_renamed": renamed}


# ---------------------------------------------------------------- pairing and embedding rows


def _param_name(model: nn.Module, param: nn.Parameter) -> str:
    return next(name for name, p in model.named_parameters() if p is param)


def _gated_layers(state: Iterable[str], decoder_layers: str) -> set[int]:
    nested = re.compile(rf"^lang_encoder\.{re.escape(decoder_layers)}\.(\d+)\.gated_cross_attn_layer\.")
    return {int(m.group(1)) for k in state if (m := nested.match(k))}


def check_pairing(model: Flamingo, state: dict[str, torch.Tensor], embedding_key: str) -> None:
    """Vision width, LM width and the gated layers of ``state`` against ``model``; a VbbError naming the part."""
    latents = state.get("perceiver.latents")
    if latents is not None and latents.shape[-1] != model.vis_dim:
        raise VbbError(f"the checkpoint's perceiver takes {latents.shape[-1]}-wide vision tokens, the vision encoder "
                       f"gives {model.vis_dim}", "use the vision encoder the checkpoint was trained with (CLIP "
                       "ViT-L/14, width 1024, for OpenFlamingo-3B)")
    layers = model.lang_encoder.decoder_layers_attr_name
    norm = re.compile(rf"^lang_encoder\.{re.escape(layers)}\.\d+\.gated_cross_attn_layer\.attn\.norm\.weight$")
    widths = {int(state[embedding_key].shape[-1])} if embedding_key in state else set()
    widths |= {int(t.shape[0]) for k, t in state.items() if norm.match(k)}
    if widths and widths != {model.lang_dim}:
        raise VbbError(f"the checkpoint was made for an LM of width {sorted(widths)}, this LM has d_model "
                       f"{model.lang_dim}", f"use the LM the checkpoint was trained with: {NON_DOLLY}")
    found = _gated_layers(state, layers)
    ours = {i for i, g in enumerate(model.lang_encoder.gated_cross_attn_layers) if g is not None}
    if found and found != ours:
        n_layers = len(model.lang_encoder.decoder_layers())
        raise VbbError(f"the checkpoint has gated cross-attention before {len(found)} LM layers "
                       f"(indices {min(found)}..{max(found)}), this model before {len(ours)} of its {n_layers}",
                       "build the Flamingo with the checkpoint's cross_attn_every_n_layers (1 for OpenFlamingo-3B) "
                       f"on the LM it was trained with: {NON_DOLLY}")


def base_row_drift(checkpoint_rows: torch.Tensor, lm_rows: torch.Tensor, chunk: int = 8192) -> float:
    """||C - L|| / ||L|| (Frobenius, float32) over the rows both have, chunked to bound memory."""
    diff = ref = 0.0
    for s in range(0, lm_rows.shape[0], chunk):
        c, l = checkpoint_rows[s:s + chunk].float(), lm_rows[s:s + chunk].detach().float().cpu()
        diff += float((c - l).square().sum())
        ref += float(l.square().sum())
    return (diff / ref) ** 0.5 if ref > 0 else float("inf")


def map_embedding_rows(rows: torch.Tensor, tokens: OpenFlamingoTokens) -> tuple[torch.Tensor, dict[str, str]]:
    """The checkpoint's embedding (OpenFlamingo tokenizer order) as one row per token of our tokenizer."""
    n = rows.shape[0]
    if n == tokens.length:  # already in our order (e.g. a model fine-tuned with <answer>)
        return rows, {}
    if n != tokens.openflamingo_length:
        raise VbbError(f"the checkpoint's input embedding has {n} rows; OpenFlamingo's tokenizer for this base "
                       f"vocabulary has {tokens.openflamingo_length} ({tokens.base_length} base tokens + "
                       f"<|endofchunk|>, <image>{', <PAD>' if tokens.pad_added else ''}) and ours "
                       f"{tokens.length} (+ <answer>)",
                       "use the tokenizer the checkpoint was trained with (EleutherAI/gpt-neox-20b for "
                       "OpenFlamingo-3B) loaded by load_openflamingo_tokenizer")
    fill = rows[:tokens.base_length].float().mean(dim=0).to(rows.dtype)
    extra = tokens.extra_tokens()
    mapped = torch.cat([rows, fill.expand(len(extra), -1)])
    # openflamingo_tokens guarantees the extra tokens are the ids right after the checkpoint's rows.
    return mapped, {token: f"row {i}: {EXTRA_ROW_RULE} ({tokens.base_length} rows)" for token, i in extra.items()}


# ---------------------------------------------------------------- import, convert, load converted


def _tokens(tokenizer: PreTrainedTokenizerFast | OpenFlamingoTokens) -> OpenFlamingoTokens:
    return tokenizer if isinstance(tokenizer, OpenFlamingoTokens) else openflamingo_tokens(tokenizer)


def import_checkpoint(path: str | Path, model: Flamingo, tokenizer: PreTrainedTokenizerFast | OpenFlamingoTokens, *,
                      max_base_row_drift: float | None = BASE_ROW_DRIFT_LIMIT) -> CheckpointReport:
    """Load an OpenFlamingo checkpoint into ``model``'s trainable set (methods/victim.md §A2, made trainable here), strictly.

    ``model``'s LM embedding must already have one row per token of ``tokenizer`` (resize it to
    ``len(tokenizer)`` first). ``max_base_row_drift=None`` reports the pairing statistic without enforcing it
    (for checkpoints whose whole embedding was trained).
    """
    tokens = _tokens(tokenizer)
    state, container, epoch = read_checkpoint(path)
    set_openflamingo_trainable(model)
    emb = input_embeddings(model.lang_encoder).weight
    embedding_key = _param_name(model, emb)
    if emb.shape[0] != tokens.length:
        raise VbbError(f"the LM's input embedding has {emb.shape[0]} rows, the tokenizer {tokens.length} tokens",
                       "resize the LM's embeddings to len(tokenizer) before importing (methods/victim.md §A4)")
    state, aliases = merge_aliases(state, model.lang_encoder.decoder_layers_attr_name)
    check_pairing(model, state, embedding_key)
    expected = trainable_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if embedding_key in missing:
        raise VbbError(f"{path} has no input embedding ({embedding_key}): trained with --freeze_lm_embeddings or "
                       "saved without it, so its <image> and <|endofchunk|> rows are missing",
                       "use a checkpoint that carries the embedding (open-flamingo's default)")
    dtype = ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in state.values()}))
    if missing or unexpected:
        raise VbbError(f"{path} does not match the model's trainable parameters (loaded 0, missing {len(missing)}, "
                       f"unexpected {len(unexpected)}); {describe_key_mismatch(expected, state)}",
                       "an OpenFlamingo checkpoint holds perceiver.*, the gated cross-attention layers and the "
                       "LM input embedding only; build the model like the checkpoint's (methods/victim.md §A6)")
    rows, extra = map_embedding_rows(state[embedding_key], tokens)
    drift = base_row_drift(state[embedding_key][:tokens.base_length], emb[:tokens.base_length])
    if max_base_row_drift is not None and not drift <= max_base_row_drift:
        raise VbbError(f"the checkpoint's {tokens.base_length} base-vocabulary embedding rows differ from this LM's "
                       f"by {drift:.3g} (relative), above {max_base_row_drift:g}: the checkpoint was trained on "
                       "another LM", f"point the LM directory at the one the checkpoint was trained with: {NON_DOLLY}")
    load_trainable_state_dict(model, {**state, embedding_key: rows})
    return CheckpointReport(
        source=str(path), container=container, epoch=epoch, checkpoint_dtype=dtype, loaded=len(expected),
        missing=0, unexpected=0, **aliases, checkpoint_rows=int(state[embedding_key].shape[0]),
        openflamingo_rows=tokens.openflamingo_length, tokenizer_length=tokens.length, lm_rows=int(emb.shape[0]),
        extra_rows=extra, base_rows_compared=tokens.base_length, base_row_drift=drift,
        base_row_drift_limit=max_base_row_drift)


def tensors_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """One sha256 over names, dtypes, shapes and bytes of tensors, in the given order."""
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def frozen_fingerprint(model: Flamingo) -> dict[str, str]:
    """sha256 of the frozen vision encoder and of the frozen LM body (what a converted checkpoint assumes)."""
    def frozen(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
    return {"vision_encoder": tensors_sha256(frozen(model.vision_encoder)),
            "lang_encoder": tensors_sha256(frozen(model.lang_encoder))}


def architecture(model: Flamingo) -> dict[str, Any]:
    """Sizes a converted checkpoint is only valid for."""
    lm = model.lang_encoder
    vision_arch = getattr(model.vision_encoder, "arch", None)
    return {"vision_encoder": vision_arch() if callable(vision_arch) else type(model.vision_encoder).__name__,
            "vis_dim": model.vis_dim, "lm_class": type(lm).__name__, "lm_width": model.lang_dim,
            "lm_layers": len(lm.decoder_layers()), "decoder_layers": lm.decoder_layers_attr_name,
            "gated_layers": [i for i, g in enumerate(lm.gated_cross_attn_layers) if g is not None],
            "perceiver_latents": list(model.perceiver.latents.shape), "perceiver_depth": len(model.perceiver.layers)}


def convert_checkpoint(checkpoint_path: str | Path, out_dir: str | Path, model: Flamingo,
                       tokenizer: PreTrainedTokenizerFast | OpenFlamingoTokens, *,
                       max_base_row_drift: float | None = BASE_ROW_DRIFT_LIMIT) -> CheckpointReport:
    """Import ``checkpoint_path`` into ``model`` (:func:`import_checkpoint`) and write its trainable state to
    ``out_dir/trainable.safetensors`` (OpenFlamingo names, one alias) with ``out_dir/openflamingo_import.json``
    (report, token ids, dtype, architecture, sha256 of the frozen parts), so later loads
    (:func:`load_converted`) never read the original file again."""
    tokens = _tokens(tokenizer)
    report = import_checkpoint(checkpoint_path, model, tokens, max_base_row_drift=max_base_row_drift)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.cpu().contiguous() for k, v in trainable_state_dict(model).items()}
    save_file(state, str(out_dir / TRAINABLE_FILE), metadata={"format": FORMAT})
    metadata = {"format": FORMAT, "report": report.as_dict(), "tokens": tokens.as_dict(),
                "dtype": sorted({str(v.dtype).removeprefix("torch.") for v in state.values()}),
                "architecture": architecture(model), "frozen_sha256": frozen_fingerprint(model),
                "trainable_sha256": tensors_sha256(sorted(state.items()))}
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")  # written last: marks completion
    return report


def load_converted(directory: str | Path, model: Flamingo, tokenizer: PreTrainedTokenizerFast | OpenFlamingoTokens,
                   *, verify_frozen: bool = False) -> dict[str, Any]:
    """Load a :func:`convert_checkpoint` directory into ``model`` (strict on the trainable set) after checking
    that tokenizer and architecture are the ones it was converted for; returns its metadata.
    ``verify_frozen`` also re-hashes the frozen encoder and LM body (seconds for the 3B model)."""
    directory = Path(directory)
    try:
        metadata = json.loads((directory / METADATA_FILE).read_text())
    except (OSError, ValueError) as e:
        raise VbbError(f"no complete converted OpenFlamingo checkpoint in {directory} ({e})",
                       "run convert_checkpoint on the original checkpoint.pt again") from e
    tokens = _tokens(tokenizer)
    mismatched = [name for name, saved, now in (
        ("tokens", metadata.get("tokens"), tokens.as_dict()),
        ("architecture", metadata.get("architecture"), json.loads(json.dumps(architecture(model)))))
        if saved != now]
    if verify_frozen and metadata.get("frozen_sha256") != frozen_fingerprint(model):
        mismatched.append("frozen weights")
    if mismatched:
        raise VbbError(f"the checkpoint converted in {directory} was made for another {', '.join(mismatched)}",
                       "build the model from the same CLIP, LM and tokenizer directories, or convert again")
    set_openflamingo_trainable(model)
    load_trainable_state_dict(model, load_file(str(directory / TRAINABLE_FILE)))
    return metadata
