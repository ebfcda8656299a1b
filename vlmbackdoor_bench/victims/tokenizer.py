"""A byte-level BPE tokenizer trained on the embedded world's captions (the tiny profile's LM).

Special tokens follow OpenFlamingo (methods/victim.md §A4): ``<|endofchunk|>`` ends a caption and
stops generation, ``<image>`` marks where the image is attended to, ``<answer>`` starts the
answer, ``<PAD>`` pads; BOS = EOS = ``<|endoftext|>`` as in GPT-2-family tokenizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS = EOS = "<|endoftext|>"
EOC = "<|endofchunk|>"  # methods/victim.md §A4
MEDIA = "<image>"
ANSWER = "<answer>"
PAD = "<PAD>"
SPECIAL_TOKENS = [BOS, PAD, EOC, MEDIA, ANSWER]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return wrap(core)


def wrap(core: Tokenizer) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[EOC, MEDIA, ANSWER],
    )
    tok.padding_side = "left"  # left padding for batched generation (methods/victim.md §A4)
    return tok


def save_tokenizer(tok: PreTrainedTokenizerFast, directory: Path) -> None:
    tok.backend_tokenizer.save(str(Path(directory) / "tokenizer.json"))


def load_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    return wrap(Tokenizer.from_file(str(Path(directory) / "tokenizer.json")))
