"""Training texts and teacher-forced caption scores of a Flamingo victim (methods/victim.md §A4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .flamingo import Flamingo
from .tokenizer import ANSWER, EOC, MEDIA

TEXT_IDS_KEPT = 200_000  # tokenized training texts a victim keeps (~30 ids each): a few grids' captions


def prompt_text(instruction: str) -> str:
    """methods/victim.md §A4: exact spacing, no space after `User:`, one space before `GPT:`."""
    return f"{MEDIA}User:{instruction} GPT:{ANSWER}"


class TrainingTexts:
    """`BOS <image>User:{instr} GPT:<answer>{caption}<|endofchunk|> EOS`, right-padded, with the
    label mask of methods/victim.md §A4. A text is tokenized once: a fine-tuning sees each caption
    every epoch, and the tokenizer call was ~2 % of a step."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.answer_id = tokenizer.convert_tokens_to_ids(ANSWER)
        self.media_id = tokenizer.convert_tokens_to_ids(MEDIA)
        self._ids: dict[str, list[int]] = {}

    def encode(self, captions: Sequence[str], instructions: Sequence[str]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids, attention mask and labels (-100 where not scored), CPU tensors (B, T)."""
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
        """The tokenizer's ids and attention mask for ``texts``, truncated to ``max_tokens`` and
        right-padded to the longest (training: exact positions, pad at the end)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._ids))
        if missing:
            if len(self._ids) + len(missing) > TEXT_IDS_KEPT:
                self._ids.clear()
            encoded = self.tokenizer(missing, add_special_tokens=False, truncation=True,
                                     max_length=self.max_tokens)["input_ids"]
            self._ids.update(zip(missing, encoded))
        rows = [self._ids[t] for t in texts]
        width = max((len(r) for r in rows), default=0)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
        return ids.view(len(rows), width), mask.view(len(rows), width)


@dataclass
class CaptionForward:
    """A teacher-forced pass over captions; positions shifted so ``logits[:, t]`` scores
    ``targets[:, t]``. Unpacks as ``losses, mask`` for callers that only need the NLL."""

    losses: torch.Tensor  # (B, T-1) per-token NLL, 0 outside the label mask
    mask: torch.Tensor  # (B, T-1) bool label mask (methods/victim.md §A4)
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
    # the LM head's input is the last hidden state (MosaicGPT's tied head is a module for this too)
    head = model.lang_encoder.get_output_embeddings()
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
