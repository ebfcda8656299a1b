"""Our plain-torch MosaicGPT (vlmbackdoor_bench.victims.mosaic_gpt): against transformers' MptForCausalLM with QK-LN
off, against a hand-written QK-LN + ALiBi layer, its remote-code directory format, and inside our Flamingo and
open-flamingo 2.0.1's (methods/victim.md §A1, §B1 "Caveat")."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_flamingo import (  # noqa: E402, F401  (of: the open-flamingo fixture, reused, not duplicated)
    BOS, EOC, MEDIA, PAD, VIS_DIM, VOCAB, TinyClip, TinyVisual, images, of, open_gates, ours)
from transformers import MptConfig, MptForCausalLM  # noqa: E402

from vlmbackdoor_bench.errors import VbbError  # noqa: E402
from vlmbackdoor_bench.victims.flamingo import Flamingo, set_openflamingo_trainable  # noqa: E402
from vlmbackdoor_bench.victims.mosaic_gpt import (  # noqa: E402
    MosaicGPT, MosaicGPTConfig, alibi_slopes, load_mosaic_gpt, save_mosaic_gpt)

D, HEADS, LAYERS, CONTEXT = 32, 4, 2, 64
BLOCKS = "transformer.blocks"
# Ours -> MptForCausalLM parameter names (methods/victim.md §B1 "Caveat": the five-name key map).
TO_HF = (("ln_1.", "norm_1."), ("ln_2.", "norm_2."), ("mlp.mlp_up.", "ffn.up_proj."),
         ("mlp.mlp_down.", "ffn.down_proj."), ("transformer.ln_f.", "transformer.norm_f."))


def tiny_config(**kw) -> MosaicGPTConfig:
    """MPT-1B's switches (alibi, QK-LN, no biases) at toy size."""
    fields = dict(d_model=D, n_heads=HEADS, n_layers=LAYERS, mlp_ratio=4, max_seq_len=CONTEXT, vocab_size=VOCAB,
                  alibi=True, attn_qk_ln=True, no_bias=True, attn_impl="torch", init_std=0.3, bos_token_id=BOS,
                  eos_token_id=BOS, pad_token_id=PAD)
    return MosaicGPTConfig(**{**fields, **kw})


def perturb_norms(model: torch.nn.Module, seed: int = 5) -> None:
    """LayerNorm weights start at 1; draw them so a norm that is skipped or misplaced changes the numbers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


def tiny_mpt(seed: int = 0, **kw) -> MosaicGPT:
    torch.manual_seed(seed)
    model = MosaicGPT(tiny_config(**kw)).eval()
    perturb_norms(model, seed + 5)
    return model


def hf_twin(model: MosaicGPT) -> MptForCausalLM:
    """transformers' MPT holding ``model``'s weights under its own names (QK-LN must be off)."""
    c = model.config
    hf = MptForCausalLM(MptConfig(d_model=c.d_model, n_heads=c.n_heads, n_layers=c.n_layers, expansion_ratio=4,
                                  max_seq_len=c.max_seq_len, vocab_size=c.vocab_size, no_bias=True,
                                  layer_norm_epsilon=1e-5, attn_config=dict(alibi=True, alibi_bias_max=8),
                                  bos_token_id=BOS, eos_token_id=BOS, pad_token_id=PAD)).eval()
    state = {}
    for key, value in model.state_dict().items():
        for ours_name, hf_name in TO_HF:
            key = key.replace(ours_name, hf_name)
        state[key] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # the tied head, filled by tie_weights
    hf.tie_weights()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    return hf


LEFT_PADDED = torch.tensor([[BOS, 5, 6, 7, 8, 9, 10], [PAD, PAD, PAD, BOS, 11, 12, 13]])
LEFT_MASK = (LEFT_PADDED != PAD).long()


# ---------------------------------------------------------------- against transformers' MptForCausalLM


def test_logits_equal_mpt_for_causal_lm_with_and_without_left_padding():
    ours_lm = tiny_mpt(attn_qk_ln=False)
    hf = hf_twin(ours_lm)
    ids = torch.tensor([[BOS, 5, 6, 7, 8, 9, 10], [BOS, 11, 12, 13, 14, 15, 16]])
    with torch.no_grad():
        got, want = ours_lm(ids, labels=ids), hf(input_ids=ids, labels=ids)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)
        got = ours_lm(LEFT_PADDED, attention_mask=LEFT_MASK).logits
        want = hf(input_ids=LEFT_PADDED, attention_mask=LEFT_MASK).logits
        real = LEFT_MASK.bool()
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
        # A left-padded row scores as the same row unpadded: ALiBi depends on key distances only.
        alone = ours_lm(LEFT_PADDED[1:, 3:]).logits
    torch.testing.assert_close(got[1, 3:], alone[0], atol=1e-5, rtol=0)


def test_cached_incremental_logits_equal_full_sequence():
    model = tiny_mpt()
    with torch.no_grad():
        full = model(LEFT_PADDED, attention_mask=LEFT_MASK).logits
        out = model(LEFT_PADDED[:, :4], attention_mask=LEFT_MASK[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, LEFT_PADDED.shape[1]):
            out = model(LEFT_PADDED[:, t:t + 1], attention_mask=LEFT_MASK[:, :t + 1],
                        past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert out.past_key_values.get_seq_length() == LEFT_PADDED.shape[1]
    with pytest.raises(VbbError, match="does not implement output_attentions"):
        model(LEFT_PADDED, output_attentions=True)
    real = LEFT_MASK.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_equals_mpt_for_causal_lm(num_beams):
    ours_lm = tiny_mpt(attn_qk_ln=False)
    hf = hf_twin(ours_lm)
    kw = dict(attention_mask=LEFT_MASK, num_beams=num_beams, max_new_tokens=8, min_new_tokens=8, pad_token_id=PAD)
    got = ours_lm.generate(LEFT_PADDED, **kw)
    assert got.shape == (2, LEFT_PADDED.shape[1] + 8)
    assert torch.equal(got, hf.generate(LEFT_PADDED, **kw))
    assert torch.equal(got, ours_lm.generate(LEFT_PADDED, use_cache=False, **kw))


# ---------------------------------------------------------------- QK LayerNorm and ALiBi by hand


def _layer_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight


def test_one_layer_with_qk_layer_norm_and_alibi_by_hand():
    model = tiny_mpt(n_layers=1)
    ids = torch.tensor([[BOS, 5, 6, 7, 8, 9]])
    S, hd = ids.shape[1], D // HEADS
    p = {k: v.detach() for k, v in model.state_dict().items()}
    b = "transformer.blocks.0."
    x = p["transformer.wte.weight"][ids[0]]
    q, k, v = (_layer_norm(x, p[b + "ln_1.weight"]) @ p[b + "attn.Wqkv.weight"].T).split(D, dim=-1)
    q = _layer_norm(q, p[b + "attn.q_ln.weight"])  # over all D features, before the heads are split
    k = _layer_norm(k, p[b + "attn.k_ln.weight"])
    slopes = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]  # 2^-(h * 8 / 4), h = 1..4
    heads = []
    for h in range(HEADS):
        cols = slice(h * hd, (h + 1) * hd)
        scores = q[:, cols] @ k[:, cols].T / hd ** 0.5
        scores = scores + slopes[h] * (torch.arange(S) - (S - 1))[None, :]  # by key position
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, cols])
    x = x + torch.cat(heads, dim=-1) @ p[b + "attn.out_proj.weight"].T
    up = _layer_norm(x, p[b + "ln_2.weight"]) @ p[b + "mlp.mlp_up.weight"].T
    x = x + F.gelu(up) @ p[b + "mlp.mlp_down.weight"].T
    want = _layer_norm(x, p["transformer.ln_f.weight"]) @ p["transformer.wte.weight"].T
    with torch.no_grad():
        got = model(ids).logits[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():  # the QK norms are really used
        model.transformer.blocks[0].attn.k_ln.weight.mul_(3.0)
        assert not torch.allclose(model(ids).logits[0], want, atol=1e-3)


def test_alibi_slopes_follow_the_remote_formula():
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    # MPT-1B's 16 heads: a power of two, where the remote formula and transformers' agree.
    hf = build_mpt_alibi_tensor(16, 2, alibi_bias_max=8)[:, 0, 0]  # bias of the key one step back
    torch.testing.assert_close(-alibi_slopes(16, 8).float(), hf)
    torch.testing.assert_close(alibi_slopes(6, 8), 2.0 ** -(torch.arange(1, 7, dtype=torch.float64) * 8 / 6))


def test_logit_scale_clip_qkv_and_parameter_names():
    model = tiny_mpt()
    assert list(model.state_dict()) == (
        ["transformer.wte.weight"]
        + [f"transformer.blocks.{i}.{n}.weight" for i in range(LAYERS)
           for n in ("ln_1", "attn.Wqkv", "attn.q_ln", "attn.k_ln", "attn.out_proj", "ln_2", "mlp.mlp_up",
                     "mlp.mlp_down")]
        + ["transformer.ln_f.weight"])
    ids = torch.tensor([[BOS, 5, 6, 7]])
    scaled = copy.deepcopy(model)
    scaled.lm_head.scale = 1 / D ** 0.5
    assert MosaicGPTConfig(**{**tiny_config().to_dict(), "logit_scale": "inv_sqrt_d_model"}).logit_multiplier() \
        == pytest.approx(1 / D ** 0.5)
    clipped = MosaicGPT(tiny_config(attn_clip_qkv=0.05)).eval()
    clipped.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(scaled(ids).logits, model(ids).logits / D ** 0.5)
        assert not torch.allclose(clipped(ids).logits, model(ids).logits, atol=1e-4)


def test_embedding_resize_keeps_the_tie_and_trainability():
    model = tiny_mpt()
    model.get_input_embeddings().weight.requires_grad_(False)
    old = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(VOCAB + 3)
    wte = model.get_input_embeddings().weight
    assert wte.shape == (VOCAB + 3, D) and not wte.requires_grad and model.config.vocab_size == VOCAB + 3
    assert torch.equal(wte[:VOCAB], old)
    hidden = {}
    model.get_output_embeddings().register_forward_pre_hook(lambda _, args: hidden.update(h=args[0]))
    with torch.no_grad():
        logits = model(torch.tensor([[BOS, VOCAB + 2]])).logits
    torch.testing.assert_close(logits, hidden["h"] @ wte.T)


# ---------------------------------------------------------------- the remote-code directory format


def test_save_load_round_trip_in_both_formats_and_sharded(tmp_path):
    model = tiny_mpt()
    ids = torch.tensor([[BOS, 5, 6, 7, 8]])
    with torch.no_grad():
        want = model(ids).logits
    for weights, file in (("bin", "pytorch_model.bin"), ("safetensors", "model.safetensors")):
        directory = save_mosaic_gpt(model, tmp_path / weights, weights=weights)
        assert sorted(p.name for p in directory.iterdir()) == ["config.json", file]
        config = json.loads((directory / "config.json").read_text())
        assert config["model_type"] == "mosaic_gpt" and config["architectures"] == ["MosaicGPT"]
        assert config["auto_map"]["AutoModelForCausalLM"] == "mosaic_gpt.MosaicGPT"
        assert config["attn_qk_ln"] is True and config["d_model"] == D
        loaded = load_mosaic_gpt(directory)
        assert not loaded.training
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want)
    half = load_mosaic_gpt(tmp_path / "bin", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():  # runs in bf16 (the GPU recipe's dtype, methods/victim.md §A7) and stays near the fp32 logits
        torch.testing.assert_close(half(ids).logits.float(), want, atol=0.15, rtol=0)  # measured 0.06

    # Sharded: two bin shards and their index, as large checkpoints come.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tmp_path / "bin" / "config.json").read_text())
    state = model.state_dict()
    keys = list(state)
    weight_map = {}
    for i, part in enumerate((keys[:5], keys[5:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in part}, sharded / name)
        weight_map.update({k: name for k in part})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with torch.no_grad():
        assert torch.equal(load_mosaic_gpt(sharded)(ids).logits, want)


def _edited_copy(tmp_path, name, state_edit=None, config_edit=None):
    directory = save_mosaic_gpt(tiny_mpt(), tmp_path / name)
    if state_edit:
        state = torch.load(directory / "pytorch_model.bin", weights_only=True)
        state_edit(state)
        torch.save(state, directory / "pytorch_model.bin")
    if config_edit:
        config = json.loads((directory / "config.json").read_text())
        config_edit(config)
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_broken_directories_give_one_named_error(tmp_path):
    cases = [
        (dict(state_edit=lambda s: s.pop("transformer.blocks.1.attn.k_ln.weight")),
         r"missing \(1\): transformer\.blocks\.1\.attn\.k_ln\.weight"),
        (dict(state_edit=lambda s: s.update({"transformer.blocks.0.attn.Wqkv.bias": torch.zeros(3 * D)})),
         r"unexpected \(1\): transformer\.blocks\.0\.attn\.Wqkv\.bias"),
        (dict(state_edit=lambda s: s.update({"transformer.wte.weight": torch.zeros(VOCAB + 4, D)})),
         r"wrong shape \(1\): transformer\.wte\.weight \(104, 32\) != \(100, 32\)"),
        (dict(config_edit=lambda c: c.update(mystery_knob=1)), r"unknown field\(s\): mystery_knob"),
        (dict(config_edit=lambda c: c.update(prefix_lm=True)), r"prefix_lm=True"),
        (dict(config_edit=lambda c: c.update(attn_uses_sequence_id=True)), r"attn_uses_sequence_id=True"),
        (dict(config_edit=lambda c: c.update(alibi=False)), r"alibi=False"),
        (dict(config_edit=lambda c: c.update(model_type="mpt")), r"model_type 'mpt', not 'mosaic_gpt'"),
    ]
    for i, (edit, message) in enumerate(cases):
        with pytest.raises(VbbError, match=message):
            load_mosaic_gpt(_edited_copy(tmp_path, f"case{i}", **edit))
    (tmp_path / "case0" / "pytorch_model.bin").unlink()
    with pytest.raises(VbbError, match="no MosaicGPT weights"):
        load_mosaic_gpt(tmp_path / "case0")
    with pytest.raises(VbbError, match="cannot read the MosaicGPT config"):
        load_mosaic_gpt(tmp_path / "absent")


# ---------------------------------------------------------------- inside our Flamingo


def flamingo_with_mpt(seed: int = 0, gates: float | None = 1.0) -> Flamingo:
    model = ours(seed, lm=tiny_mpt(seed), decoder_layers_attr_name=BLOCKS)
    if gates is not None:
        open_gates(model, gates)
    return model


TEXT = torch.tensor([[BOS, MEDIA, 5, 6, 7, 8, EOC], [BOS, MEDIA, 9, 10, 11, EOC, PAD]])
TEXT_MASK = (TEXT != PAD).long()


def test_flamingo_trains_perceiver_gated_layers_and_wte_only():
    model = flamingo_with_mpt()
    set_openflamingo_trainable(model)
    labels = TEXT.masked_fill(TEXT_MASK == 0, -100)
    model(images(2), TEXT, attention_mask=TEXT_MASK, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        should = name.startswith(("perceiver.", "lang_encoder.gated_cross_attn_layers.")) \
            or ".gated_cross_attn_layer." in name or name == "lang_encoder.transformer.wte.weight"
        assert p.requires_grad == should, name
        assert (p.grad is not None and bool(p.grad.abs().sum() > 0)) == should, name


@pytest.mark.parametrize("num_beams", [1, 3])
def test_flamingo_cached_generate_equals_uncached(num_beams):
    model = flamingo_with_mpt()
    prompt = torch.tensor([[BOS, MEDIA, 3, 4, 5], [PAD, PAD, BOS, MEDIA, 6]])
    kw = dict(attention_mask=(prompt != PAD).long(), num_beams=num_beams, max_new_tokens=6, min_new_tokens=6,
              pad_token_id=PAD)
    cached = model.generate(images(2), prompt, **kw)
    assert cached.shape == (2, 11)
    assert torch.equal(cached, model.generate(images(2), prompt, use_cache=False, **kw))


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    def loss_and_grads(checkpointing: bool):
        model = flamingo_with_mpt().train()
        set_openflamingo_trainable(model)
        calls = []
        model.lang_encoder.old_decoder_blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
        if checkpointing:
            model.lang_encoder.activation_checkpointing_enable()
        labels = TEXT.masked_fill(TEXT_MASK == 0, -100)
        loss = model(images(2), TEXT, attention_mask=TEXT_MASK, labels=labels).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, len(calls)

    loss, grads, calls = loss_and_grads(False)
    loss_ckpt, grads_ckpt, calls_ckpt = loss_and_grads(True)
    assert (calls, calls_ckpt) == (1, 2)  # the checkpointed block really ran again in backward
    torch.testing.assert_close(loss_ckpt, loss, atol=0, rtol=0)
    assert grads_ckpt.keys() == grads.keys() and any(".gated_cross_attn_layer." in n for n in grads)
    for name in grads:
        assert grads_ckpt[name] is not None, name
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=0)


# ---------------------------------------------------------------- against open-flamingo 2.0.1, our MPT as the LM


def test_open_flamingo_wrapping_our_mpt_has_our_keys_and_logits(of):
    vis, lm = TinyVisual(), tiny_mpt()
    mine = Flamingo(copy.deepcopy(vis), copy.deepcopy(lm), EOC, MEDIA, VIS_DIM,
                    decoder_layers_attr_name=BLOCKS).eval()
    of.utils.extend_instance(lm, of.lm.FlamingoLMMixin)
    lm.set_decoder_layers_attr_name(BLOCKS)
    torch.manual_seed(3)
    ref = of.flamingo.Flamingo(TinyClip(vis), lm, EOC, MEDIA, vis_dim=VIS_DIM, cross_attn_every_n_layers=1).eval()
    open_gates(ref)
    keys = list(ref.state_dict())
    assert list(mine.state_dict()) == keys
    assert "lang_encoder.transformer.blocks.1.decoder_layer.attn.q_ln.weight" in keys
    assert "lang_encoder.transformer.blocks.0.gated_cross_attn_layer.attn_gate" in keys
    mine.load_state_dict(ref.state_dict(), strict=True)
    lang_x = torch.tensor([[BOS, 5, MEDIA, 10, 11, 12, MEDIA, 13, 14, EOC],
                           [BOS, 20, 21, MEDIA, 23, 24, 25, 26, EOC, 27]])
    with torch.no_grad():
        want = ref(images(2, t=2), lang_x, labels=lang_x)
        got = mine(images(2, t=2), lang_x, labels=lang_x)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)
