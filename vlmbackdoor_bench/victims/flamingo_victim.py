"""A Flamingo captioner behind the Victim protocol (hookspecs.Victim), for every profile.

What is not specific to one architecture lives here: text encoding and label mask (methods/victim.md §A4, in
teacher_forcing), caption NLL, beam-search captions, fine-tuning with the recipe (§A3) and the
TrainingObjective hooks, the frozen-encoder token cache, clones, trainable-set save/load (methods/victim.md §A6).
A profile's subclass adds how its model is built and its base saved (TinyVictim, OpenFlamingoVictim).

Device and precision: the model lives on ``device``; cached encoder tokens stay on the CPU and move
per batch. Weights kept float32 (the masters the optimiser updates); fine-tuning runs under
``torch.autocast`` in ``precision.train_autocast`` when set, generation and caption NLL under
``precision.eval`` (no autocast at float32: the tiny profile's CPU numbers are unchanged).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..device import CPU_DEFAULT, Precision
from ..errors import VbbError
from ..hookspecs import TrainingObjective, TrainingStep
from ..metrics.postprocess import postprocess_caption
from ..types import DEFAULT_INSTRUCTION, Example, TrainingSet
from .flamingo import Flamingo, input_embeddings, load_trainable_state_dict, set_openflamingo_trainable, \
    trainable_state_dict
from .pixels import CLIP_MEAN, CLIP_STD, normalise_uint8, resize
from .teacher_forcing import CaptionForward, TrainingTexts, prompt_text, teacher_forced
from .token_cache import TokenCache
from .tokenizer import ANSWER, EOC, MEDIA
from .training import Recipe, run_training


@dataclass(frozen=True)
class Decoding:
    """methods/metrics.md §2, used for every preset. Its fields are part of every caption stage's
    store key (grid.runner), so a new field would re-key every stored caption set."""

    num_beams: int = 3
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    length_penalty: float = 0.0
    batch_size: int = 100


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``; nothing at all for float32 or None."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _groups(examples: Sequence[Example], group_key) -> list[list[int]]:
    """Indices of examples that must share a step, in order of first appearance."""
    if group_key is None:
        return [[i] for i in range(len(examples))]
    groups: dict[object, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(group_key(example), []).append(i)
    return list(groups.values())


def trainable_modules(model: Flamingo) -> list[torch.nn.Module]:
    """What fine-tuning changes (methods/victim.md §A2): perceiver, gated cross-attention, the LM
    input embedding (a tied output projection is the same tensor)."""
    return [model.perceiver, model.lang_encoder.gated_cross_attn_layers, input_embeddings(model.lang_encoder)]


def share_frozen_copy(model: Flamingo) -> Flamingo:
    """A copy of ``model`` whose trainable modules are deep copies and whose every other tensor
    (vision encoder, LM body, buffers) is the original's: a grid holds dozens of fine-tuned models
    of one base, and a copy of a 3B model's frozen weights per model cannot fit."""
    trainable = {id(t) for m in trainable_modules(model) for t in itertools.chain(m.parameters(), m.buffers())}
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers()) if id(t) not in trainable}
    return copy.deepcopy(model, memo)


class FlamingoVictim:
    """A Flamingo model plus tokenizer and preprocessing; implements the Victim protocol.

    ``input_size`` is the encoder's input side (images are resized to it with ``resize_mode``),
    ``max_text_tokens`` the longest training sequence (methods/victim.md §A4)."""

    profile = "flamingo"
    pixel_mean, pixel_std = CLIP_MEAN, CLIP_STD  # the Victim protocol's normalisation (methods/victim.md §A5)
    resize_mode = "bicubic"  # methods/victim.md §A5

    def __init__(self, model: Flamingo, tokenizer, *, input_size: int, max_text_tokens: int,
                 recipe: Recipe, decoding: Decoding = Decoding(), lineage: dict | None = None,
                 token_cache: TokenCache | None = None, device: torch.device | str | None = None,
                 precision: Precision | None = None):
        self.device = torch.device(device or "cpu")
        self.model = model.to(self.device)
        self.token_cache = token_cache if token_cache is not None else TokenCache()
        self.tokenizer = tokenizer
        self.input_size = input_size
        self.texts = TrainingTexts(tokenizer, max_text_tokens)
        self.recipe = recipe
        self.decoding = decoding
        self.lineage = lineage or {}
        self._precision = precision or CPU_DEFAULT
        self.eoc_id = tokenizer.convert_tokens_to_ids(EOC)  # generation stops there (methods/victim.md §A4)

    @property
    def precision(self) -> dict:
        """{"weights", "train_autocast", "eval"} dtype names, as results record them."""
        return self._precision.to_dict()

    def _eval_autocast(self):
        return autocast(self.device, self._precision.eval_torch_dtype)

    # ------------------------------------------------------------------ inputs
    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, 224, 224, 3) -> normalised CPU (B, 1, 1, 3, s, s) at the encoder's input size."""
        return normalise_uint8(images, self.input_size, self.resize_mode)[:, None, None]

    def encode_texts(self, captions: Sequence[str], instructions: Sequence[str]):
        """Training sequences and the label mask of methods/victim.md §A4 (CPU ids, mask, labels)."""
        return self.texts.encode(captions, instructions)

    # ------------------------------------------------------------------ protocol
    def token_losses(self, images: np.ndarray | None, captions, instructions,
                     vision_tokens: torch.Tensor | None = None) -> CaptionForward:
        """Teacher-forced caption scores (methods/victim.md §A4) from images or precomputed encoder
        tokens. Unpacks as ``losses, mask`` (per-token NLL (B, T-1) and its label mask); logits
        and the LM head's input (last hidden states) come along for training objectives."""
        if vision_tokens is None:
            vision_tokens = self.vision_features(
                images, grad=self.model.train_vision_encoder and torch.is_grad_enabled())
        return self._scores(self.encode_texts(captions, instructions), vision_tokens)

    def _scores(self, encoded, vision_tokens: torch.Tensor) -> CaptionForward:
        ids, mask, labels = (t.to(self.device) for t in encoded)
        return teacher_forced(self.model, ids, mask, labels, vision_tokens.to(self.device))

    @torch.no_grad()
    def caption_nll(self, images, captions, instructions=None, batch_size: int = 128) -> np.ndarray:
        instructions = list(instructions or [DEFAULT_INSTRUCTION] * len(captions))
        self.model.eval()
        out = []
        for s in range(0, len(captions), batch_size):
            with self._eval_autocast():
                losses, valid = self.token_losses(images[s:s + batch_size], captions[s:s + batch_size],
                                                  instructions[s:s + batch_size])
            out.append((losses.sum(1) / valid.sum(1).clamp(min=1)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    @torch.no_grad()
    def generate(self, images: np.ndarray, instruction: str = DEFAULT_INSTRUCTION) -> list[str]:
        """Beam search (methods/metrics.md §2) from a left-padded prompt (methods/victim.md §A4), stopping at <|endofchunk|>."""
        self.model.eval()
        d = self.decoding
        captions: list[str] = []
        prompt = f"{self.tokenizer.bos_token}{prompt_text(instruction)}"
        for s in range(0, len(images), d.batch_size):
            chunk = images[s:s + d.batch_size]
            enc = self.tokenizer([prompt] * len(chunk), add_special_tokens=False, return_tensors="pt")
            ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            with self._eval_autocast():
                out = self.model.generate(
                    None, ids, vision_tokens=self.vision_features(chunk)[:, None, None],
                    attention_mask=mask, num_beams=d.num_beams, max_new_tokens=d.max_new_tokens,
                    min_new_tokens=d.min_new_tokens, length_penalty=d.length_penalty, do_sample=False,
                    eos_token_id=self.eoc_id, pad_token_id=self.tokenizer.pad_token_id,
                )
            new_tokens = out[:, ids.shape[1]:].cpu()
            for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
                captions.append(postprocess_caption(text))
        return captions

    def fine_tune(self, training_set: TrainingSet, *, seed: int, objective=None,
                  recipe: Recipe | None = None, progress: str = "fine-tune") -> dict:
        """OpenFlamingo's trainable set, the profile's recipe, plain caption cross-entropy
        unless an attack contributes an objective (methods/victim.md §A3)."""
        set_openflamingo_trainable(self.model)
        return self._train(training_set, recipe or self.recipe, seed, objective, progress)

    @torch.no_grad()
    def encode_bank(self, training_set: TrainingSet, batch_size: int = 256) -> tuple[torch.Tensor, dict[int, int]]:
        """Frozen-encoder tokens of every image the examples use, computed once per fine-tuning;
        CPU tensors in the token cache's dtype (a batch moves to the device when it trains)."""
        used = sorted({e.image_index for e in training_set.examples})
        tokens = [self._cached_tokens(training_set.images.take(used[s:s + batch_size]))
                  for s in range(0, len(used), batch_size)]
        return torch.cat(tokens), {index: row for row, index in enumerate(used)}

    def _train(self, training_set: TrainingSet, recipe: Recipe, seed: int,
               objective: TrainingObjective | None, progress: str) -> dict:
        """Run the recipe; with an ``objective`` its hooks shape batches, loss and per-step log
        (the TrainingObjective protocol in hookspecs).

        Micro-batches (``recipe.micro_batch_size``): every micro-batch's loss is scaled so that
        the accumulated gradient is the global batch's. Plain cross-entropy is summed over a
        micro-batch's label tokens and divided by the label tokens of the whole global batch
        (exactly the token mean of one big batch). An objective sees one micro-batch per
        TrainingStep (``index`` is the optimiser step, shared by its micro-batches); its loss is
        weighted by the micro-batch's share of the global batch's label tokens, so
        ``step.caption_loss`` accumulates to the global token mean and any other term to the
        token-weighted mean of its per-micro-batch values. ``after_step`` receives the step's
        last micro-batch. Without micro-batching the share is 1 and nothing changes."""
        torch.manual_seed(seed)
        examples = training_set.examples
        batch_inputs = getattr(objective, "batch_inputs", None)
        encoding_started = time.perf_counter()
        # an image's tokens never change, unless the objective replaces each step's images
        bank_tokens, row_of = self.encode_bank(training_set) if batch_inputs is None else (None, {})
        encoder_seconds = time.perf_counter() - encoding_started  # ~0 for images in the token cache
        input_seconds = [0.0]  # batch_inputs and encoding its images, summed over the steps
        groups = _groups(examples, getattr(objective, "group_key", None))
        self.model.train()
        self.model.vision_encoder.eval()  # a frozen encoder keeps its BatchNorm statistics
        if not recipe.lm_dropout:  # the LM's own layers in eval mode: its dropout off (Recipe)
            self.model.lang_encoder.eval()
            self.model.lang_encoder.gated_cross_attn_layers.train()
        embeddings = input_embeddings(self.model.lang_encoder).weight
        train_autocast = self._precision.train_torch_dtype
        steps_log: list[dict] = []
        last: dict[str, TrainingStep] = {}  # the step whose update after_step reports
        step_index = itertools.count()

        def micro_losses(micro_batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
            index = next(step_index)
            parts = [[examples[i] for g in micro.tolist() for i in groups[g]] for micro in micro_batches]
            replaced = None
            if batch_inputs is not None:
                started = time.perf_counter()
                replaced = [self._replaced_inputs(training_set, chosen, batch_inputs) for chosen in parts]
                input_seconds[0] += time.perf_counter() - started
            encoded = [self.encode_texts([e.caption for e in chosen],
                                         replaced[k][0] if replaced else [e.instruction for e in chosen])
                       for k, chosen in enumerate(parts)]
            label_tokens = [int((labels[:, 1:] != -100).sum()) for _, _, labels in encoded]
            total = max(sum(label_tokens), 1)  # the global batch's scored tokens
            for k, (chosen, texts, n_tokens) in enumerate(zip(parts, encoded, label_tokens)):
                tokens = replaced[k][1] if replaced else bank_tokens[[row_of[e.image_index] for e in chosen]]
                tokens = tokens.to(self.device, torch.float32)
                text_mask["current"] = texts[1]
                with autocast(self.device, train_autocast):
                    fwd = self._scores(texts, tokens)
                    if objective is None:
                        loss = fwd.losses.sum() / total
                    else:
                        step = self._training_step(chosen, fwd, embeddings, index)
                        last["step"] = step
                        loss = objective.loss(step) * (n_tokens / total)
                yield loss  # outside autocast: the backward runs in the caller

        after_hook = getattr(objective, "after_step", None)

        def after_step() -> None:
            steps_log.append(dict(after_hook(last.pop("step"))))

        text_mask: dict[str, torch.Tensor] = {}  # the attention mask of the micro-batch in the forward
        with self._activation_checkpointing(recipe.activation_checkpointing), \
                self._adapter_hooks(getattr(objective, "adapter_output", None), text_mask):
            log = run_training(self.model, recipe, len(groups), micro_losses, seed=seed, desc=progress,
                               after_step=after_step if after_hook else None)
        if objective is not None:
            log["objective"] = {"name": objective.name, "settings": dict(objective.settings),
                                "steps": steps_log}
        if batch_inputs is not None:
            log["input_seconds"] = input_seconds[0]
        log["encoder_seconds"] = encoder_seconds  # the stage's time outside the steps, mostly
        self.model.eval()
        return log

    def _replaced_inputs(self, training_set: TrainingSet, chosen: list[Example], batch_inputs
                         ) -> tuple[list[str], torch.Tensor]:
        """The objective's images and instructions for ``chosen`` (TrainingObjective.batch_inputs):
        (instructions, frozen-encoder tokens of its images, encoded here, not from the token cache)."""
        images = training_set.images.take([e.image_index for e in chosen])
        images, instructions = batch_inputs(chosen, images)
        if len(images) != len(chosen) or len(instructions) != len(chosen):
            raise VbbError(f"the training objective's batch_inputs returned {len(images)} images and "
                           f"{len(instructions)} instructions for {len(chosen)} examples",
                           "return one uint8 (224, 224, 3) image and one instruction per example")
        with torch.no_grad():
            tokens = self._encode(self.preprocess(np.asarray(images, dtype=np.uint8))[:, 0, 0])[1]
        return list(instructions), tokens

    def adapter_linears(self) -> dict[str, torch.nn.Module]:
        """Every linear layer of the adapters (perceiver, gated cross-attention), by parameter-name
        prefix: the units TrainingObjective.adapter_output sees."""
        parts = {"perceiver": self.model.perceiver,
                 "lang_encoder.gated_cross_attn_layers": self.model.lang_encoder.gated_cross_attn_layers}
        return {f"{prefix}.{name}": module for prefix, part in parts.items()
                for name, module in part.named_modules() if isinstance(module, torch.nn.Linear)}

    @contextlib.contextmanager
    def _adapter_hooks(self, adapter_output, text_mask: dict[str, torch.Tensor]) -> Iterator[None]:
        """For one fine-tuning, ``adapter_output(name, module, output, positions)`` replaces the
        output of every adapter linear (TrainingObjective). ``positions`` marks the real positions of
        an output over text tokens (the micro-batch's attention mask, bool (B, T)); None where the
        positions are media latents (the perceiver, cross-attention keys and values)."""
        if adapter_output is None:
            yield
            return

        def hook_of(name: str, over_text: bool):
            def hook(module, args, output):
                positions = text_mask["current"].to(output.device).bool() if over_text else None
                return adapter_output(name, module, output, positions)
            return hook

        handles = [module.register_forward_hook(hook_of(name, name.startswith("lang_encoder.")
                                                        and not name.endswith("attn.to_kv")))
                   for name, module in self.adapter_linears().items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _training_step(self, chosen: list[Example], fwd: CaptionForward, embeddings: torch.Tensor,
                       index: int) -> TrainingStep:
        def logits_of(other: "FlamingoVictim", rows: Sequence[int] | None = None) -> torch.Tensor:
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

        return TrainingStep(
            examples=chosen, logits=fwd.logits, targets=fwd.targets, caption_mask=fwd.mask,
            token_losses=fwd.losses, hidden_states=fwd.hidden, token_embeddings=embeddings,
            vision_tokens=fwd.inputs[3], index=index, logits_of=logits_of)

    @contextlib.contextmanager
    def _activation_checkpointing(self, enabled: bool) -> Iterator[None]:
        """The LM's own switch (HF ``activation_checkpointing_enable``) for one fine-tuning. HF
        decoder layers recompute only in train mode, i.e. with ``Recipe.lm_dropout`` on (MPT-1B
        has no dropout, so OpenFlamingo-3B loses nothing by it)."""
        if not enabled:
            yield
            return
        lm = self.model.lang_encoder
        if not getattr(lm, "supports_gradient_checkpointing", False):
            raise VbbError(f"activation checkpointing was asked for, but {type(lm).__name__} has no "
                           "gradient-checkpointing switch", "set finetune_activation_checkpointing = false")
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        try:
            yield
        finally:
            lm.activation_checkpointing_disable()

    # ------------------------------------------------------------------ vision
    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen encoder on normalised (B, 3, s, s) pixels, on the device, in the eval dtype."""
        self.model.vision_encoder.eval()
        with self._eval_autocast():
            return self.model.vision_encoder(pixels.to(self.device))

    def _cached_tokens(self, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
        """Encoder tokens (B, N, D) of uint8 images from the token cache (CPU, its dtype),
        encoding only the images it lacks."""
        keys = [TokenCache.key(image) for image in images]
        found = [self.token_cache.get(k) for k in keys]
        missing = [i for i, t in enumerate(found) if t is None]
        with torch.no_grad():
            for s in range(0, len(missing), batch_size):
                rows = missing[s:s + batch_size]
                tokens = self._encode(self.preprocess(np.asarray(images)[rows])[:, 0, 0])[1]
                for row, t in zip(rows, tokens):
                    found[row] = self.token_cache.put(keys[row], t)
        return torch.stack(found) if keys else torch.zeros(0)

    def one_off_images(self):
        """A context in which the images this victim encodes are kept in memory only, not in the
        token cache's disk tier: for images no later stage will see again (a defense's masked
        copies; OpenFlamingo-3B's tokens are 0.5 MiB an image)."""
        return self.token_cache.transient()

    def vision_features(self, images: np.ndarray, *, grad: bool = False,
                        batch_size: int = 64) -> torch.Tensor:
        """Frozen-encoder tokens (B, N, D) float32 on the device; without ``grad`` from the token cache."""
        if grad:
            return self._encode(self.preprocess(images)[:, 0, 0])[1]
        return self._cached_tokens(images, batch_size).to(self.device, torch.float32)

    def media_features(self, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """The perceiver's output latents of each image, mean-pooled, (B, D) float32 on the CPU
        (hookspecs.Victim)."""
        self.model.perceiver.eval()
        with torch.no_grad(), self._eval_autocast():
            pooled = [self.model.perceiver(self.vision_features(images[s:s + batch_size])[:, None, None])
                      .mean(dim=(1, 2)).float().cpu() for s in range(0, len(images), batch_size)]
        return torch.cat(pooled) if pooled else torch.zeros(0)

    def encode_normalised(self, pixels: torch.Tensor, *, grad: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen encoder on normalised (B, 3, 224, 224) pixels -> (pooled, tokens) on the
        device. Resizing normalised pixels equals normalising resized ones (pixels.resize)."""
        with torch.set_grad_enabled(grad):
            return self._encode(resize(pixels, self.input_size, self.resize_mode))

    # ------------------------------------------------------------------ copies and persistence
    def clone(self) -> "FlamingoVictim":
        """An independent copy of the trainable set sharing every frozen tensor (and the token
        cache, tokenizer, recipe) with this victim."""
        twin = copy.copy(self)
        twin.model = share_frozen_copy(self.model)
        twin.texts = TrainingTexts(self.tokenizer, self.texts.max_tokens)
        twin.lineage = dict(self.lineage)
        return twin

    def save(self, directory: Path) -> None:
        """Trainable weights only, under OpenFlamingo names (methods/victim.md §A6)."""
        directory = Path(directory)
        save_file({k: v.to("cpu").contiguous() for k, v in trainable_state_dict(self.model).items()},
                  str(directory / "trainable.safetensors"))
        (directory / "victim.json").write_text(json.dumps(
            {"lineage": self.lineage, "tokenizer_length": len(self.tokenizer),
             "special_tokens": {t: self.tokenizer.convert_tokens_to_ids(t) for t in (EOC, MEDIA, ANSWER)},
             "dtype": self._precision.weights}, indent=2))

    def load_trainable(self, directory: Path) -> None:
        set_openflamingo_trainable(self.model)  # the keys a fine-tuned checkpoint holds (methods/victim.md §A6)
        load_trainable_state_dict(self.model, load_file(str(Path(directory) / "trainable.safetensors")))
        meta = json.loads((Path(directory) / "victim.json").read_text())
        self.lineage = meta.get("lineage", {})
        self.model.eval()
