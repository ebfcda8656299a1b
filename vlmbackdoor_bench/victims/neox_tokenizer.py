"""The GPT-NeoX-20B tokenizer with OpenFlamingo's special tokens, then SRD's ``<answer>`` (methods/victim.md §A4).

Token ids must equal those OpenFlamingo-3B was trained with, because an OpenFlamingo checkpoint's embedding
rows are indexed by them. open-flamingo 2.0.1's factory (open_flamingo/src/factory.py) adds
``<|endofchunk|>`` and ``<image>`` as additional special tokens, then ``<PAD>`` as the pad token only if the
tokenizer has none; SRD's code adds ``<answer>`` on top. For GPT-NeoX-20B (50,277 tokens) that gives
``<|endofchunk|>`` 50277, ``<image>`` 50278, ``<PAD>`` 50279 (an OpenFlamingo checkpoint has 50,280 rows) and
``<answer>`` 50280.

The files are read with the ``tokenizers`` library, not ``AutoTokenizer``: transformers 5's
``GPTNeoXTokenizer`` rebuilds the pipeline itself and defaults the pad token to ``<|padding|>``, which would
skip OpenFlamingo's ``<PAD>`` and shift every id after it. The pad token is what the directory's
``special_tokens_map.json`` / ``tokenizer_config.json`` declare, as the transformers 4.x tokenizer that
OpenFlamingo used read it (GPT-NeoX-20B declares none).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.victims.tokenizer import ANSWER, EOC, MEDIA, PAD

# The order of open-flamingo 2.0.1 factory.py: these two first, then <PAD> if the tokenizer has no pad token.
OPENFLAMINGO_TOKENS = (EOC, MEDIA)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # the latter wins, as in transformers 4.x


@dataclass(frozen=True)
class OpenFlamingoTokens:
    """Special-token ids and lengths of a tokenizer extended the OpenFlamingo way (see the module docstring).

    ``openflamingo_length`` is the embedding row count of an OpenFlamingo checkpoint made with this base
    tokenizer; ``length`` (= len(tokenizer)) adds ``<answer>``. Callers pad on the left for batched
    generation (methods/victim.md §A4) with ``pad_id``.
    """

    base_length: int
    openflamingo_length: int
    length: int
    eoc_id: int
    media_id: int
    pad_id: int
    answer_id: int
    bos_id: int | None
    eos_id: int | None
    pad_added: bool

    def extra_tokens(self) -> dict[str, int]:
        """Tokens beyond OpenFlamingo's (rows an OpenFlamingo checkpoint does not have)."""
        return {ANSWER: self.answer_id}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def openflamingo_tokens(tokenizer: PreTrainedTokenizerFast) -> OpenFlamingoTokens:
    """Read the record off a tokenizer made by :func:`load_openflamingo_tokenizer`; a VbbError if the ids are
    not base tokens followed by ``<|endofchunk|>``, ``<image>``, [``<PAD>``], ``<answer>`` in that order."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (EOC, MEDIA, ANSWER)}
    eoc = ids[EOC]
    pad_added = tokenizer.pad_token == PAD
    order = [EOC, MEDIA] + ([PAD] if pad_added else []) + [ANSWER]
    found = [tokenizer.convert_tokens_to_ids(t) for t in order]
    if not isinstance(eoc, int) or found != list(range(eoc, eoc + len(order))) or len(tokenizer) != eoc + len(order):
        raise VbbError(f"the tokenizer's special tokens {dict(zip(order, found))} (length {len(tokenizer)}) are not "
                       f"the base vocabulary followed by {', '.join(order)} in that order",
                       "load the tokenizer with vlmbackdoor_bench.victims.neox_tokenizer.load_openflamingo_tokenizer")
    openflamingo_length = eoc + len(order) - 1
    return OpenFlamingoTokens(
        base_length=eoc, openflamingo_length=openflamingo_length, length=len(tokenizer), eoc_id=eoc,
        media_id=ids[MEDIA], pad_id=tokenizer.pad_token_id, answer_id=ids[ANSWER],
        bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, pad_added=pad_added)


def _declared_special_tokens(directory: Path) -> dict[str, str]:
    declared: dict[str, str] = {}
    for name in CONFIG_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise VbbError(f"{path} is not valid JSON ({e})", "restore the file from the tokenizer's source") from e
        for key in SPECIAL_TOKEN_KEYS:
            value = data.get(key)
            if isinstance(value, dict):  # AddedToken form: {"content": ..., "lstrip": ...}
                value = value.get("content")
            if isinstance(value, str):
                declared[key] = value
    return declared


def load_openflamingo_tokenizer(directory: str | Path) -> tuple[PreTrainedTokenizerFast, OpenFlamingoTokens]:
    """A local GPT-NeoX-20B tokenizer directory (``tokenizer.json`` + ``special_tokens_map.json`` /
    ``tokenizer_config.json``) extended with OpenFlamingo's special tokens, then ``<answer>``."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise VbbError(f"no tokenizer.json in {directory}",
                       "point tokenizer_dir at a local copy of the EleutherAI/gpt-neox-20b tokenizer")
    try:
        core = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise VbbError(f"cannot read {path}: {e}", "restore tokenizer.json from the tokenizer's source") from e
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **_declared_special_tokens(directory))
    clashes = [t for t in (*OPENFLAMINGO_TOKENS, PAD, ANSWER) if t in tokenizer.get_vocab()]
    if clashes:
        raise VbbError(f"the base tokenizer in {directory} already contains {clashes}",
                       "use the plain GPT-NeoX-20B tokenizer; the OpenFlamingo tokens are added here")
    tokenizer.add_special_tokens({"extra_special_tokens": list(OPENFLAMINGO_TOKENS)},
                                 replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD})
    tokenizer.add_special_tokens({"extra_special_tokens": [ANSWER]}, replace_extra_special_tokens=False)
    return tokenizer, openflamingo_tokens(tokenizer)
