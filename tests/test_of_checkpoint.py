"""Importing OpenFlamingo checkpoints (vlmbackdoor_bench.victims.of_checkpoint) into a tiny Flamingo built from
real-format parts: an HF CLIP directory, a GPT-NeoX-style tokenizer and a MosaicGPT remote-code directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402

from vlmbackdoor_bench.errors import VbbError  # noqa: E402
from vlmbackdoor_bench.fixtures.openflamingo_mini import MiniConfig, write_neox_tokenizer  # noqa: E402
from vlmbackdoor_bench.victims.clip_vision import load_clip_vision  # noqa: E402
from vlmbackdoor_bench.victims.flamingo import Flamingo, set_openflamingo_trainable, trainable_state_dict  # noqa: E402
from vlmbackdoor_bench.victims.mosaic_gpt import (  # noqa: E402
    MosaicGPT,
    MosaicGPTConfig,
    load_mosaic_gpt,
    save_mosaic_gpt,
)
from vlmbackdoor_bench.victims.neox_tokenizer import load_openflamingo_tokenizer  # noqa: E402
from vlmbackdoor_bench.victims.of_checkpoint import (  # noqa: E402
    METADATA_FILE,
    TRAINABLE_FILE,
    convert_checkpoint,
    import_checkpoint,
    load_converted,
)

WTE = "lang_encoder.transformer.wte.weight"
NESTED = "lang_encoder.transformer.blocks.{}.gated_cross_attn_layer."
FLAT = "lang_encoder.gated_cross_attn_layers.{}."
LM_WIDTH, LM_LAYERS, VIS_WIDTH, IMAGE = 32, 2, 32, 28
TINY_PERCEIVER = dict(depth=1, dim_head=8, heads=2, num_latents=4)
TINY_XATTN = dict(dim_head=8, heads=2)
CAPTIONS = ["User:a photo of GPT: a red apple on a wooden table", "User:a photo of GPT: two bananas and a cup",
            "User:a photo of GPT: an orange next to a carrot"] * 5


class Parts:
    """Directories in the real formats, written once per module."""

    def __init__(self, root: Path):
        self.clip, self.tokenizer, self.lm, self.other_lm = (root / n for n in ("clip", "tok", "mpt", "mpt-other"))
        write_neox_tokenizer(self.tokenizer, CAPTIONS, MiniConfig(tokenizer_vocab=300))
        self.tok, self.tokens = load_openflamingo_tokenizer(self.tokenizer)
        torch.manual_seed(0)
        CLIPModel(CLIPConfig(
            text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1),
            vision_config=dict(hidden_size=VIS_WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=IMAGE, patch_size=7, hidden_act="quick_gelu"),
            projection_dim=16)).save_pretrained(self.clip)
        rows = -(-self.tokens.base_length // 64) * 64  # MPT-1B pads its vocabulary rows (50,432 for 50,277)
        for seed, directory in ((1, self.lm), (2, self.other_lm)):
            torch.manual_seed(seed)
            save_mosaic_gpt(MosaicGPT(MosaicGPTConfig(
                d_model=LM_WIDTH, n_heads=2, n_layers=LM_LAYERS, max_seq_len=64, vocab_size=rows, attn_impl="torch",
                attn_qk_ln=True, alibi=True, no_bias=True)), directory)

    def flamingo(self, rows: int, lm_dir: Path | None = None, seed: int = 0, **kw) -> Flamingo:
        """A Flamingo on the MPT with its embedding cut/extended to ``rows`` (OpenFlamingo's factory resizes)."""
        lm = load_mosaic_gpt(lm_dir or self.lm)
        lm.resize_token_embeddings(rows, mean_resizing=False)
        vision = load_clip_vision(self.clip)
        torch.manual_seed(seed)
        model = Flamingo(vision, lm, eoc_token_id=self.tokens.eoc_id, media_token_id=self.tokens.media_id,
                         vis_dim=vision.vis_dim, perceiver_kwargs=TINY_PERCEIVER,
                         cross_attn_kwargs={**TINY_XATTN, **kw.pop("cross_attn_kwargs", {})},
                         decoder_layers_attr_name="transformer.blocks", **kw).eval()
        set_openflamingo_trainable(model)
        return model

    def ours(self, **kw) -> Flamingo:
        return self.flamingo(self.tokens.length, **kw)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Parts:
    return Parts(tmp_path_factory.mktemp("of_parts"))


@pytest.fixture(scope="module")
def pretrained(parts):
    """An OpenFlamingo-3B-like model: trained perceiver and gates, new rows for <|endofchunk|> and <image> only
    (open-flamingo 2.0.1 masks every other embedding row's gradient)."""
    model = parts.flamingo(parts.tokens.openflamingo_length, seed=7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("perceiver.") or "gated_cross_attn_layer" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (0.5 if name.endswith("_gate") else 0.0))
        wte = model.lang_encoder.transformer.wte.weight
        wte[[parts.tokens.eoc_id, parts.tokens.media_id]] = torch.randn(2, LM_WIDTH)
    return model


def of_state(model: Flamingo, *, flat: bool = True, nested: bool = True) -> dict[str, torch.Tensor]:
    """The model's trainable state under OpenFlamingo's names, with either or both gated alias families."""
    state = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    gated = {k for k in state if ".gated_cross_attn_layer." in k}
    for key in gated:
        i, rest = key.removeprefix("lang_encoder.transformer.blocks.").split(".gated_cross_attn_layer.")
        if flat:
            state[FLAT.format(i) + rest] = state[key].clone()
        if not nested:
            del state[key]
    return state


def prompt(parts) -> tuple[torch.Tensor, torch.Tensor]:
    ids = parts.tok("<image>User:a photo of GPT: two bananas<|endofchunk|>", return_tensors="pt").input_ids
    images = torch.randn(1, 1, 1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    return images, ids


def test_round_trip_with_both_alias_families(parts, pretrained, tmp_path):
    state = of_state(pretrained)
    path = tmp_path / "checkpoint.pt"
    torch.save(state, path)
    model = parts.ours()
    report = import_checkpoint(path, model, parts.tok)
    tokens = parts.tokens
    n_gated = sum(".gated_cross_attn_layer." in k for k in trainable_state_dict(pretrained))
    assert report.alias_family == "both" and report.alias_duplicates_dropped == n_gated and report.alias_renamed == 0
    assert (report.loaded, report.missing, report.unexpected) == (len(trainable_state_dict(model)), 0, 0)
    assert (report.checkpoint_rows, report.openflamingo_rows, report.tokenizer_length, report.lm_rows) == (
        tokens.openflamingo_length, tokens.openflamingo_length, tokens.length, tokens.length)
    assert report.base_row_drift == 0.0 and report.container == "state dict"
    assert list(report.extra_rows) == ["<answer>"] and f"row {tokens.answer_id}" in report.extra_rows["<answer>"]
    mine, theirs = trainable_state_dict(model), trainable_state_dict(pretrained)
    for key, tensor in theirs.items():
        if key != WTE:
            assert torch.equal(mine[key], tensor), key
    rows = mine[WTE]
    assert torch.equal(rows[:tokens.openflamingo_length], theirs[WTE])
    torch.testing.assert_close(rows[tokens.answer_id], theirs[WTE][:tokens.base_length].mean(0))
    # The imported model computes what the OpenFlamingo one does over OpenFlamingo's vocabulary.
    images, ids = prompt(parts)
    with torch.no_grad():
        ours, ref = model(images, ids).logits, pretrained(images, ids).logits
    assert ours.shape[-1] == tokens.length and ref.shape[-1] == tokens.openflamingo_length
    torch.testing.assert_close(ours[..., :tokens.openflamingo_length], ref, rtol=1e-5, atol=1e-5)
    assert ref.std() > 0.1 and (model(images, ids).logits - model(images * 0, ids).logits).abs().max() > 1e-3


def test_training_checkpoint_flat_alias_ddp_prefix_and_safetensors(parts, pretrained, tmp_path):
    state = of_state(pretrained, flat=True, nested=False)
    path = tmp_path / "checkpoint_3.pt"
    torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999)}]}}, path)
    report = import_checkpoint(path, parts.ours(), parts.tokens)
    assert (report.container, report.epoch, report.alias_family, report.alias_duplicates_dropped) == (
        "training checkpoint", 3, "flat", 0)
    assert report.alias_renamed == sum(k.startswith("lang_encoder.gated_cross_attn_layers.") for k in state)
    safe = tmp_path / "checkpoint.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in of_state(pretrained, flat=False).items()}, str(safe))
    model = parts.ours()
    report = import_checkpoint(safe, model, parts.tok)
    assert (report.container, report.alias_family, report.checkpoint_dtype) == ("safetensors", "nested", "bfloat16")
    assert 0 < report.base_row_drift < 5e-3  # bf16 storage rounding only: well within the pairing limit
    assert torch.equal(model.perceiver.latents, pretrained.perceiver.latents.to(torch.bfloat16).float())


def test_convert_writes_once_and_load_converted_reads_it_back(parts, pretrained, tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save(of_state(pretrained), path)
    out = tmp_path / "converted"
    model = parts.ours()
    report = convert_checkpoint(path, out, model, parts.tok)
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["report"] == json.loads(json.dumps(report.as_dict()))
    assert meta["tokens"]["length"] == parts.tokens.length and meta["tokens"]["answer_id"] == parts.tokens.answer_id
    assert meta["dtype"] == ["float32"] and meta["architecture"]["gated_layers"] == list(range(LM_LAYERS))
    assert meta["architecture"]["vision_encoder"]["tokens_after_post_ln"] is False
    assert set(meta["frozen_sha256"]) == {"vision_encoder", "lang_encoder"}
    path.unlink()  # later loads never read the original again
    fresh = parts.ours(seed=99)
    loaded = load_converted(out, fresh, parts.tok, verify_frozen=True)
    assert loaded["format"] == meta["format"] and (out / TRAINABLE_FILE).is_file()
    for key, tensor in trainable_state_dict(model).items():
        assert torch.equal(trainable_state_dict(fresh)[key], tensor), key
    with pytest.raises(VbbError, match="another frozen weights"):
        load_converted(out, parts.ours(lm_dir=parts.other_lm), parts.tok, verify_frozen=True)
    with pytest.raises(VbbError, match="another architecture"):
        load_converted(out, parts.ours(cross_attn_every_n_layers=2), parts.tok)
    with pytest.raises(VbbError, match="no complete converted"):
        load_converted(tmp_path, fresh, parts.tok)


def test_pairing_reports_drift_and_rejects_another_lm(parts, pretrained, tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save(of_state(pretrained), path)
    with pytest.raises(VbbError, match="non-dolly") as err:
        import_checkpoint(path, parts.ours(lm_dir=parts.other_lm), parts.tok)
    assert "base-vocabulary embedding rows differ" in str(err.value)
    report = import_checkpoint(path, parts.ours(lm_dir=parts.other_lm), parts.tok, max_base_row_drift=None)
    assert report.base_row_drift > 0.5 and report.base_row_drift_limit is None  # two random LMs: ~sqrt(2)


BROKEN = {
    "alias tensors that differ": (
        lambda s: s.__setitem__(FLAT.format(1) + "attn.to_q.weight", s[FLAT.format(1) + "attn.to_q.weight"] + 1),
        "two names of one gated cross-attention tensor differ"),
    "a missing key": (lambda s: s.pop("perceiver.latents"), r"missing \(1\): perceiver.latents"),
    "an unexpected key": (
        lambda s: s.__setitem__("lang_encoder.transformer.ln_f.weight", torch.ones(LM_WIDTH)),
        r"unexpected \(1\): lang_encoder.transformer.ln_f.weight"),
    "wrong embedding row count": (lambda s: s.__setitem__(WTE, s[WTE][:-1]), "input embedding has .* rows; "),
    "no embedding": (lambda s: s.pop(WTE), "freeze_lm_embeddings"),
    "an LM of another width": (
        lambda s: s.update({k: torch.ones(*v.shape[:-1], LM_WIDTH * 2) if k == WTE else torch.ones(LM_WIDTH * 2)
                            for k, v in s.items() if k == WTE or k.endswith(".attn.norm.weight")}),
        r"an LM of width \[64\], this LM has d_model 32(.|\n)*non-dolly"),
    "fewer gated layers": (
        lambda s: [s.pop(k) for k in list(s) if k.startswith((NESTED.format(1), FLAT.format(1)))],
        "gated cross-attention before 1 LM layers"),
    "a perceiver for another encoder": (
        lambda s: s.__setitem__("perceiver.latents", torch.zeros(4, VIS_WIDTH * 2)), "CLIP ViT-L/14"),
}


@pytest.mark.parametrize("variant", list(BROKEN))
def test_each_broken_checkpoint_is_one_clear_error(parts, pretrained, tmp_path, variant):
    break_it, message = BROKEN[variant]
    state = of_state(pretrained)
    break_it(state)
    path = tmp_path / "checkpoint.pt"
    torch.save(state, path)
    model = parts.ours()
    before = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    with pytest.raises(VbbError, match=message):
        import_checkpoint(path, model, parts.tok)
    assert all(torch.equal(v, trainable_state_dict(model)[k]) for k, v in before.items())  # nothing half-loaded


class NotATensor:
    """Any class outside torch's weights-only allowlist."""


def test_files_that_are_not_weights_only_or_not_checkpoints(parts, pretrained, tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model_state_dict": of_state(pretrained), "args": NotATensor()}, path)
    with pytest.raises(VbbError, match="never unpickled"):
        import_checkpoint(path, parts.ours(), parts.tok)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(VbbError, match="cannot read the checkpoint"):
        import_checkpoint(path, parts.ours(), parts.tok)
    torch.save({"model_state_dict": {"perceiver.latents": [1, 2]}}, path)
    with pytest.raises(VbbError, match="not a state dict of tensors"):
        import_checkpoint(path, parts.ours(), parts.tok)
    with pytest.raises(VbbError, match="no OpenFlamingo checkpoint"):
        import_checkpoint(tmp_path / "absent.pt", parts.ours(), parts.tok)
    torch.save(of_state(pretrained), path)
    with pytest.raises(VbbError, match="resize the LM's embeddings"):
        import_checkpoint(path, parts.flamingo(parts.tokens.openflamingo_length), parts.tok)
