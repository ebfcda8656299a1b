"""load_openflamingo_tokenizer on a tiny GPT-NeoX-style tokenizer directory written in the real file layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.victims.neox_tokenizer import load_openflamingo_tokenizer, openflamingo_tokens

CAPTIONS = ["a photo of a red apple on a wooden table", "two bananas next to a blue cup",
            "User:a photo of GPT: an orange and a carrot"] * 4
WHITESPACE_RUNS = ["  ", "   ", "    "]  # GPT-NeoX-20B ends its vocabulary with added whitespace-run tokens


def write_neox_style(directory: Path, *, declare_pad: str | None = None) -> int:
    """tokenizer.json (byte-level BPE, NFC, <|endoftext|> id 0, <|padding|> id 1, whitespace runs added last)
    plus special_tokens_map.json / tokenizer_config.json as GPT-NeoX-20B ships them. Returns its length."""
    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(CAPTIONS, trainer=trainer)
    core.add_tokens([AddedToken(run, normalized=True) for run in WHITESPACE_RUNS])
    directory.mkdir(parents=True, exist_ok=True)
    core.save(str(directory / "tokenizer.json"))
    specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    if declare_pad:
        specials["pad_token"] = declare_pad
    (directory / "special_tokens_map.json").write_text(json.dumps(specials))
    config = {"add_prefix_space": False, "tokenizer_class": "GPTNeoXTokenizer",
              "name_or_path": "EleutherAI/gpt-neox-20b",
              **{k: {"content": v, "lstrip": False, "rstrip": False, "special": True} for k, v in specials.items()}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return core.get_vocab_size(with_added_tokens=True)


def test_special_tokens_in_openflamingo_order_then_answer(tmp_path):
    base = write_neox_style(tmp_path)
    tok, ids = load_openflamingo_tokenizer(tmp_path)
    # factory.py order: <|endofchunk|>, <image>, then <PAD> (GPT-NeoX has no pad token); SRD's <answer> last.
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endofchunk|>", "<image>", "<PAD>", "<answer>")] == [
        base, base + 1, base + 2, base + 3]
    assert (ids.base_length, ids.openflamingo_length, ids.length, len(tok)) == (base, base + 3, base + 4, base + 4)
    assert (ids.eoc_id, ids.media_id, ids.pad_id, ids.answer_id, ids.pad_added) == (
        base, base + 1, base + 2, base + 3, True)
    assert ids.bos_id == ids.eos_id == 0 and tok.pad_token_id == ids.pad_id
    assert ids.extra_tokens() == {"<answer>": base + 3}
    assert openflamingo_tokens(tok) == ids
    assert json.loads(json.dumps(ids.as_dict()))["openflamingo_length"] == base + 3


def test_text_ids_are_the_files_ids_and_special_tokens_stay_whole(tmp_path):
    write_neox_style(tmp_path)
    core = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok, ids = load_openflamingo_tokenizer(tmp_path)
    text = "a photo of  two bananas"  # includes a whitespace-run added token
    assert tok(text).input_ids == core.encode(text).ids  # no BOS/EOS added, nothing re-tokenised differently
    assert core.token_to_id("  ") in tok(text).input_ids
    prompt = tok("<image>User:a photo of GPT:<answer>").input_ids  # methods/victim.md §A4's evaluation prompt
    assert prompt[0] == ids.media_id and prompt[-1] == ids.answer_id
    assert prompt[1:-1] == core.encode("User:a photo of GPT:").ids
    caption = tok("two bananas<|endofchunk|>").input_ids
    assert caption[-1] == ids.eoc_id
    assert tok.decode(prompt) == "<image>User:a photo of GPT:<answer>"


def test_a_declared_pad_token_is_kept(tmp_path):
    """OpenFlamingo adds <PAD> only when the tokenizer has no pad token; then <answer> follows <image>."""
    base = write_neox_style(tmp_path, declare_pad="<|padding|>")
    tok, ids = load_openflamingo_tokenizer(tmp_path)
    assert tok.pad_token == "<|padding|>" and ids.pad_id == 1 and not ids.pad_added
    assert (ids.eoc_id, ids.media_id, ids.answer_id, ids.openflamingo_length, len(tok)) == (
        base, base + 1, base + 2, base + 2, base + 3)
    assert "<PAD>" not in tok.get_vocab()


def test_bad_directories_and_tokenizers_raise_one_clear_error(tmp_path):
    with pytest.raises(VbbError, match="no tokenizer.json"):
        load_openflamingo_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(VbbError, match="cannot read"):
        load_openflamingo_tokenizer(tmp_path)
    clash = tmp_path / "clash"
    write_neox_style(clash)
    core = Tokenizer.from_file(str(clash / "tokenizer.json"))
    core.add_special_tokens(["<image>"])
    core.save(str(clash / "tokenizer.json"))
    with pytest.raises(VbbError, match=r"already contains \['<image>'\]"):
        load_openflamingo_tokenizer(clash)
    good = tmp_path / "good"
    write_neox_style(good)
    tok, _ = load_openflamingo_tokenizer(good)
    tok.add_special_tokens({"extra_special_tokens": ["<extra>"]}, replace_extra_special_tokens=False)
    with pytest.raises(VbbError, match="not the base vocabulary followed by"):
        openflamingo_tokens(tok)
