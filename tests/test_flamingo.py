"""Our Flamingo (vlmbackdoor_bench.victims.flamingo) against open-flamingo 2.0.1, and its own behaviour.

The reference package is installed with ``--no-deps`` into a throwaway directory (it pins torch 2.0.1 and its
``__init__`` imports open_clip, methods/victim.md §B1), so only ``open_flamingo.src.*`` is imported, via stub packages.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import re
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from vlmbackdoor_bench.errors import VbbError  # noqa: E402
from vlmbackdoor_bench.victims.flamingo import (  # noqa: E402
    Flamingo,
    load_trainable_state_dict,
    set_openflamingo_trainable,
    trainable_state_dict,
)

VOCAB, PAD, BOS, MEDIA, EOC = 100, 96, 97, 98, 99
VIS_DIM, IMG = 32, 16
TINY_PERCEIVER = dict(depth=2, dim_head=16, heads=2, num_latents=4)
TINY_XATTN = dict(dim_head=16, heads=2)


class TinyVisual(nn.Module):
    """Patchify + norm; returns (pooled, tokens[B, N, VIS_DIM]) like open_clip's visual with output_tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, VIS_DIM, kernel_size=8, stride=8)
        self.ln = nn.LayerNorm(VIS_DIM)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.ln(self.proj(pixels).flatten(2).transpose(1, 2))
        return tokens.mean(1), tokens


class TinyClip(nn.Module):
    """OpenFlamingo's Flamingo takes a CLIP model and keeps ``.visual``."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                     bos_token_id=BOS, eos_token_id=BOS, pad_token_id=PAD)
    return GPT2LMHeadModel(cfg).eval()


def open_gates(model: nn.Module, value: float | None = None) -> None:
    """Gates start at 0 (a no-op); open them so the image actually changes the text."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                p.uniform_(0.3, 1.0) if value is None else p.fill_(value)


def ours(seed: int = 0, lm: nn.Module | None = None, **kw) -> Flamingo:
    torch.manual_seed(seed)
    vis = TinyVisual()
    kw.setdefault("perceiver_kwargs", TINY_PERCEIVER)
    kw.setdefault("cross_attn_kwargs", TINY_XATTN)
    return Flamingo(vis, lm if lm is not None else tiny_gpt2(seed), EOC, MEDIA, VIS_DIM, **kw).eval()


def images(b: int, t: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, 1, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def prompt(b: int = 2) -> torch.Tensor:
    return torch.tensor([[BOS, MEDIA, 3 + i, 4, 5] for i in range(b)])


# ---------------------------------------------------------------- reference package


@pytest.fixture(scope="session")
def of(tmp_path_factory):
    """open_flamingo.src.{flamingo,flamingo_lm,utils} from a throwaway --no-deps install, shimmed for transformers 5."""
    target = tmp_path_factory.mktemp("open_flamingo_ref")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
           "--retries", "1", "--timeout", "20", "--target", str(target),
           "open-flamingo==2.0.1", "einops", "einops-exts"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"reference open-flamingo==2.0.1 could not be installed with pip ({e})")
    if r.returncode != 0:
        pytest.skip(f"reference open-flamingo==2.0.1 could not be installed with pip: {r.stderr.strip()[-300:]}")

    before = set(sys.modules)
    sys.path.append(str(target))
    # Stub packages with the right __path__, so open_flamingo/__init__.py (imports open_clip) never runs.
    for name, sub in (("open_flamingo", ""), ("open_flamingo.src", "src")):
        stub = types.ModuleType(name)
        stub.__path__ = [str(target / "open_flamingo" / sub)]
        sys.modules[name] = stub
    ns = types.SimpleNamespace(
        flamingo=importlib.import_module("open_flamingo.src.flamingo"),
        lm=importlib.import_module("open_flamingo.src.flamingo_lm"),
        utils=importlib.import_module("open_flamingo.src.utils"),
    )
    # The two transformers-5 behaviours of methods/victim.md §B1, patched on this throwaway copy only:
    # 1. GPT-2 passes positional args to its blocks: name them after the decoder layer's signature.
    layer_forward = ns.lm.FlamingoLayer.forward

    def shim_layer_forward(self, lang_x, *args, **kwargs):
        names = list(inspect.signature(self.decoder_layer.forward).parameters)[1:]
        kwargs.update(zip(names, args))
        return layer_forward(self, lang_x, **kwargs)

    # 2. generate() omits an all-ones attention_mask: default it to None.
    mixin_forward = ns.lm.FlamingoLMMixin.forward

    def shim_mixin_forward(self, input_ids, attention_mask=None, **kwargs):
        return mixin_forward(self, input_ids, attention_mask, **kwargs)

    ns.lm.FlamingoLayer.forward = shim_layer_forward
    ns.lm.FlamingoLMMixin.forward = shim_mixin_forward
    yield ns
    sys.path.remove(str(target))
    for name in set(sys.modules) - before:
        del sys.modules[name]


def reference(of, vis: nn.Module, lm: nn.Module, every: int = 1) -> nn.Module:
    """Build OpenFlamingo's model the way its factory.py does (extend_instance + set_decoder_layers_attr_name)."""
    of.utils.extend_instance(lm, of.lm.FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("transformer.h")
    return of.flamingo.Flamingo(TinyClip(vis), lm, EOC, MEDIA, vis_dim=VIS_DIM,
                                cross_attn_every_n_layers=every).eval()


def twins(of, every: int = 1) -> tuple[nn.Module, Flamingo]:
    """The reference with open gates, and ours (OpenFlamingo's default perceiver) holding its exact weights."""
    vis, lm = TinyVisual(), tiny_gpt2()
    mine = Flamingo(copy.deepcopy(vis), copy.deepcopy(lm), EOC, MEDIA, VIS_DIM, cross_attn_every_n_layers=every).eval()
    torch.manual_seed(3)
    ref = reference(of, vis, lm, every)
    open_gates(ref)
    return ref, mine


@pytest.mark.parametrize("every", [1, 2])
def test_state_dict_keys_identical_to_open_flamingo(of, every):
    ref, mine = twins(of, every)
    assert list(mine.state_dict()) == list(ref.state_dict())  # same keys, same order
    mine.load_state_dict(ref.state_dict(), strict=True)
    keys = set(mine.state_dict())
    for family in ("perceiver.latents", "lang_encoder.transformer.h.1.gated_cross_attn_layer.attn.to_q.weight",
                   "lang_encoder.transformer.h.0.decoder_layer.attn.c_attn.weight",
                   "lang_encoder.gated_cross_attn_layers.1.ff_gate",
                   "lang_encoder.old_decoder_blocks.0.ln_1.weight", "vision_encoder.proj.weight"):
        assert family in keys
    assert ("lang_encoder.transformer.h.0.gated_cross_attn_layer.attn_gate" in keys) == (every == 1)


def test_logits_and_loss_equal_open_flamingo(of):
    ref, mine = twins(of)
    mine.load_state_dict(ref.state_dict(), strict=True)
    # Two images; <image> tokens at non-zero positions; text before, between and after them.
    lang_x = torch.tensor([[BOS, 5, MEDIA, 10, 11, 12, MEDIA, 13, 14, 15, EOC, 16],
                           [BOS, 20, 21, 22, MEDIA, 23, 24, 25, 26, 27, 28, EOC]])
    vision_x = images(2, t=2)
    with torch.no_grad():
        want = ref(vision_x, lang_x, labels=lang_x)
        got = mine(vision_x, lang_x, labels=lang_x)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)


def test_beam_search_equals_open_flamingo(of):
    ref, mine = twins(of)
    mine.load_state_dict(ref.state_dict(), strict=True)
    kw = dict(num_beams=3, max_new_tokens=8, attention_mask=torch.ones(2, 5, dtype=torch.long), pad_token_id=PAD)
    want = ref.generate(images(2), prompt(), **kw)
    got = mine.generate(images(2), prompt(), **kw)
    assert got.shape[1] > prompt().shape[1]
    assert torch.equal(got, want)


# ---------------------------------------------------------------- our own behaviour


def test_closed_gates_leave_the_lm_unchanged():
    lm = tiny_gpt2()
    plain = copy.deepcopy(lm)
    model = ours(lm=lm)
    lang_x = torch.tensor([[BOS, 5, MEDIA, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(images(1), lang_x).logits, plain(input_ids=lang_x).logits, atol=1e-6, rtol=0)


def test_closed_gates_generate_like_the_plain_lm_with_left_padding():
    lm = tiny_gpt2()
    plain = copy.deepcopy(lm)
    model = ours(lm=lm)
    lang_x = torch.tensor([[BOS, MEDIA, 3, 4, 5], [PAD, PAD, BOS, MEDIA, 6]])
    kw = dict(num_beams=3, max_new_tokens=6, attention_mask=(lang_x != PAD).long(), pad_token_id=PAD,
              eos_token_id=EOC)
    # Equal only if generate builds position ids from the mask for us too (our forward exposes the LM's signature).
    assert torch.equal(model.generate(images(2), lang_x, **kw), plain.generate(lang_x, **kw))


def test_text_before_first_image_ignores_the_image():
    model = ours()
    open_gates(model, 1.0)
    lang_x = torch.tensor([[BOS, 5, 6, MEDIA, 7, 8, 9]])
    with torch.no_grad():
        a = model(images(1, seed=1), lang_x).logits
        b = model(images(1, seed=2), lang_x).logits
    torch.testing.assert_close(a[:, :3], b[:, :3], atol=0, rtol=0)
    assert not torch.allclose(a[:, 3:], b[:, 3:], atol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_generate_equals_uncached(num_beams):
    model = ours()
    open_gates(model, 1.0)
    # Row 1 is left-padded: checks the position ids generate builds through our forward's signature.
    lang_x = torch.tensor([[BOS, MEDIA, 3, 4, 5], [PAD, PAD, BOS, MEDIA, 6]])
    mask = (lang_x != PAD).long()
    kw = dict(num_beams=num_beams, max_new_tokens=6, min_new_tokens=6, attention_mask=mask, pad_token_id=PAD)
    cached = model.generate(images(2), lang_x, use_cache=True, **kw)
    uncached = model.generate(images(2), lang_x, use_cache=False, **kw)
    assert cached.shape == (2, 11)
    assert torch.equal(cached, uncached)
    assert not model.lang_encoder.is_conditioned()  # media state cleared afterwards


def test_generate_stops_at_end_of_chunk_by_default():
    from transformers import LogitsProcessor, LogitsProcessorList

    class EocAfterOne(LogitsProcessor):
        """Force <|endofchunk|> as the second new token; generate must then stop (eos defaults to it)."""

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == prompt().shape[1] + 1:
                scores = torch.full_like(scores, -float("inf"))
                scores[:, EOC] = 0.0
            return scores

    out = ours().generate(images(2), prompt(), max_new_tokens=6, pad_token_id=PAD,
                          logits_processor=LogitsProcessorList([EocAfterOne()]))
    assert out.shape == (2, prompt().shape[1] + 2)
    assert (out[:, -1] == EOC).all()


def _families(keys) -> set[str]:
    """perceiver.* -> perceiver; gated layers -> their layer path with <i>; anything else stays whole."""
    fam = set()
    for k in keys:
        k = re.sub(r"\.\d+\.", ".<i>.", k)
        if k.startswith("perceiver."):
            fam.add("perceiver")
        elif ".gated_cross_attn_layer." in k:
            fam.add(k.split(".gated_cross_attn_layer.")[0] + ".gated_cross_attn_layer")
        else:
            fam.add(k)
    return fam


def test_set_openflamingo_trainable_and_gradients():
    model = ours()
    set_openflamingo_trainable(model)
    lm = model.lang_encoder
    assert lm.lm_head.weight is lm.transformer.wte.weight and lm.lm_head.weight.requires_grad  # tied: trains too
    for name, p in model.named_parameters(remove_duplicate=False):
        should = (name.startswith(("perceiver.", "lang_encoder.gated_cross_attn_layers."))
                  or ".gated_cross_attn_layer." in name
                  or name in ("lang_encoder.transformer.wte.weight", "lang_encoder.lm_head.weight"))
        assert p.requires_grad == should, name
    lang_x = torch.tensor([[BOS, MEDIA, 5, 6, 7, EOC]])
    model(images(1), lang_x, labels=lang_x).loss.backward()
    assert all(p.grad is None for p in model.vision_encoder.parameters())
    assert all(p.grad is None for p in lm.old_decoder_blocks.parameters())
    assert model.perceiver.latents.grad is not None and lm.transformer.wte.weight.grad is not None


def test_train_vision_encoder_lets_gradients_reach_the_encoder():
    model = ours(train_vision_encoder=True)
    open_gates(model, 1.0)
    lang_x = torch.tensor([[BOS, MEDIA, 5, 6, 7, EOC]])
    model(images(1), lang_x, labels=lang_x).loss.backward()
    assert model.vision_encoder.proj.weight.grad is not None


def test_trainable_state_dict_has_one_alias_and_only_trainable_families():
    model = ours()
    set_openflamingo_trainable(model)
    state = trainable_state_dict(model)
    assert _families(state) == {"perceiver", "lang_encoder.transformer.h.<i>.gated_cross_attn_layer",
                                "lang_encoder.transformer.wte.weight"}
    assert not any(k.startswith(("lang_encoder.gated_cross_attn_layers.", "lang_encoder.old_decoder_blocks."))
                   for k in state)
    assert "lang_encoder.lm_head.weight" not in state  # tied to wte: saved once
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # parameters() dedups
    assert sum(t.numel() for t in state.values()) == n_trainable


def test_load_trainable_state_dict_round_trip_and_strictness():
    lm = tiny_gpt2()
    src, dst = ours(seed=1, lm=copy.deepcopy(lm)), ours(seed=2, lm=copy.deepcopy(lm))
    for m in (src, dst):
        open_gates(m)
        set_openflamingo_trainable(m)
    dst.vision_encoder.load_state_dict(src.vision_encoder.state_dict())  # frozen parts equal, as in a real load
    state = {k: v.clone() for k, v in trainable_state_dict(src).items()}
    load_trainable_state_dict(dst, state)
    for k, v in trainable_state_dict(dst).items():
        assert torch.equal(v, state[k]), k
    lang_x = torch.tensor([[BOS, 5, MEDIA, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(dst(images(1), lang_x).logits, src(images(1), lang_x).logits, atol=1e-6, rtol=0)

    missing = dict(state)
    del missing["perceiver.latents"]
    with pytest.raises(VbbError, match=r"missing \(1\): perceiver\.latents"):
        load_trainable_state_dict(dst, missing)
    alias = {**state, "lang_encoder.gated_cross_attn_layers.0.attn_gate": torch.zeros(1)}
    with pytest.raises(VbbError, match=r"unexpected \(1\): lang_encoder\.gated_cross_attn_layers\.0\.attn_gate"):
        load_trainable_state_dict(dst, alias)
    wrong = {**state, "lang_encoder.transformer.wte.weight": torch.zeros(VOCAB + 3, 64)}
    with pytest.raises(VbbError, match=r"wrong shape \(1\): lang_encoder\.transformer\.wte\.weight"):
        load_trainable_state_dict(dst, wrong)


def _tiny_lm(kind: str) -> tuple[nn.Module, str]:
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=BOS, pad_token_id=PAD)
    if kind == "llama":
        cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, **common)
        return tf.LlamaForCausalLM(cfg), "model.layers"
    if kind == "opt":
        cfg = tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=64, **common)
        return tf.OPTForCausalLM(cfg), "model.decoder.layers"
    if kind == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               **common)
        return tf.GPTNeoXForCausalLM(cfg), "gpt_neox.layers"
    cfg = tf.MptConfig(d_model=64, n_layers=2, n_heads=4, expansion_ratio=2, max_seq_len=64, **common)
    return tf.MptForCausalLM(cfg), "transformer.blocks"


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt_neox", "mpt"])
def test_other_lm_families(kind):
    lm, path = _tiny_lm(kind)
    model = ours(lm=lm.eval())
    open_gates(model, 1.0)
    set_openflamingo_trainable(model)
    assert model.lang_encoder.decoder_layers_attr_name == path
    assert f"lang_encoder.{path}.1.gated_cross_attn_layer.attn_gate" in trainable_state_dict(model)
    lang_x = torch.tensor([[BOS, MEDIA, 5, 6, 7, EOC]])
    model(images(1), lang_x, labels=lang_x).loss.backward()
    kw = dict(max_new_tokens=4, min_new_tokens=4, pad_token_id=PAD)
    cached = model.generate(images(2), prompt(), **kw)
    assert torch.equal(cached, model.generate(images(2), prompt(), use_cache=False, **kw))
