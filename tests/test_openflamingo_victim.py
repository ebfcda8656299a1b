"""The OpenFlamingo-3B victim and profile on miniature random-weight local directories in the real
formats (CLIP HF directory, MPT remote-code directory, GPT-NeoX-style tokenizer, OpenFlamingo
checkpoint.pt; written by the openflamingo-mini fixture's writers at even smaller sizes)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlmbackdoor_bench.errors import VbbError  # noqa: E402
from vlmbackdoor_bench.fixtures.mini_models import write_checkpoint, write_mpt  # noqa: E402
from vlmbackdoor_bench.fixtures.openflamingo_mini import (  # noqa: E402
    MiniConfig, MiniPaths, write_clip, write_neox_tokenizer)
from vlmbackdoor_bench.hookspecs import StageContext  # noqa: E402
from vlmbackdoor_bench.types import Example, ImageBank, TrainingSet  # noqa: E402
from vlmbackdoor_bench.victims.flamingo import PERCEIVER_DEFAULTS, trainable_state_dict  # noqa: E402
from vlmbackdoor_bench.victims.openflamingo import BASE_MANIFEST  # noqa: E402
from vlmbackdoor_bench.victims.profiles import OpenFlamingo3BProfile  # noqa: E402
from vlmbackdoor_bench.victims.training import Recipe  # noqa: E402

from attack_helpers import one_thread, scenes  # noqa: E402,F401  (one_thread is a fixture)

CFG = MiniConfig(clip_width=32, clip_layers=1, clip_heads=2, clip_projection=16, lm_width=32, lm_layers=2,
                 lm_heads=2, tokenizer_vocab=300)
CAPTIONS = ["a red apple on a table.", "two bananas on the grass.", "a green book next to a cup."]
PROFILE = OpenFlamingo3BProfile()


def write_parts(root) -> MiniPaths:
    paths = MiniPaths.under(root)
    write_clip(paths.clip, CFG)
    write_neox_tokenizer(paths.tokenizer, CAPTIONS * 30 + ["User:a photo of GPT:"] * 20, CFG)
    write_mpt(paths.mpt, paths.tokenizer, CFG)
    write_checkpoint(paths, CFG)
    return paths


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> MiniPaths:
    return write_parts(tmp_path_factory.mktemp("of-mini"))


def small_params(paths: MiniPaths) -> dict:
    return PROFILE.params({**paths.profile_params(), "finetune_epochs": 1, "finetune_batch_size": 4,
                           "finetune_micro_batch_size": 2, "decoding_batch_size": 2})


@pytest.fixture(scope="module")
def victim(parts):
    return PROFILE.build_victim(small_params(parts))


def test_assembled_from_the_configs_with_the_checkpoint_imported(victim, parts):
    model = victim.model
    assert model.vis_dim == CFG.clip_width and victim.input_size == CFG.image_size  # from the CLIP config
    assert model.lang_dim == CFG.lm_width and len(model.lang_encoder.decoder_layers()) == CFG.lm_layers
    assert all(g is not None for g in model.lang_encoder.gated_cross_attn_layers)  # every layer (methods/victim.md §A1)
    assert model.perceiver.latents.shape == (PERCEIVER_DEFAULTS["num_latents"], CFG.clip_width)
    assert len(model.perceiver.layers) == PERCEIVER_DEFAULTS["depth"]
    assert model.lang_encoder.get_input_embeddings().weight.shape[0] == len(victim.tokenizer)
    checkpoint = torch.load(parts.checkpoint, weights_only=True)
    ours = trainable_state_dict(model)
    assert torch.equal(ours["perceiver.latents"], checkpoint["perceiver.latents"])
    gate = "lang_encoder.transformer.blocks.1.gated_cross_attn_layer.attn_gate"
    assert torch.equal(ours[gate], checkpoint[gate]) and float(ours[gate]) == CFG.gate_init
    assert victim.imported.loaded == len(ours) and victim.imported.missing == 0
    assert victim.device == torch.device("cpu")
    assert victim.precision == {"weights": "float32", "train_autocast": None, "eval": "float32"}


def test_generates_and_scores_captions(victim, one_thread):
    images = scenes(3)
    captions = victim.generate(images)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert victim.generate(images) == captions  # beam search, deterministic
    nll = victim.caption_nll(images, CAPTIONS)
    assert nll.shape == (3,) and np.all(np.isfinite(nll)) and np.all(nll > 0)
    one_by_one = np.concatenate([victim.caption_nll(images[i:i + 1], CAPTIONS[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(nll, one_by_one, rtol=1e-5)  # right padding changes no caption's score
    tokens = victim.vision_features(images)
    assert tokens.shape == (3, (CFG.image_size // CFG.clip_patch) ** 2, CFG.clip_width)
    assert tokens.dtype == torch.float32
    assert victim.token_cache.get(victim.token_cache.key(images[0])).dtype == torch.bfloat16  # kept in bf16


def test_fine_tunes_with_accumulation_and_leaves_the_base_alone(victim, parts, one_thread):
    images = scenes(4)
    data = TrainingSet(ImageBank(images), [Example(str(i), i % 3, CAPTIONS[i % 3]) for i in range(8)])
    before = victim.caption_nll(images[:3], CAPTIONS)
    student = victim.clone()
    recipe = PROFILE.finetune_recipe(small_params(parts))
    assert (recipe.batch_size, recipe.micro_batch_size) == (4, 2)
    log = student.fine_tune(data, seed=0, recipe=Recipe(**{**recipe.__dict__, "lr": 1e-2}))
    assert log["steps"] == 2 and np.isfinite(log["first_loss"])
    assert not np.allclose(student.caption_nll(images[:3], CAPTIONS), before)
    np.testing.assert_array_equal(victim.caption_nll(images[:3], CAPTIONS), before)
    frozen = {n: p for n, p in victim.model.named_parameters()
              if n.startswith(("vision_encoder.", "lang_encoder.transformer.blocks.0.decoder_layer."))}
    assert len(frozen) > 10
    for name, param in student.model.named_parameters():
        if name in frozen:
            assert param.data_ptr() == frozen[name].data_ptr(), name  # shared, not copied


def test_trainable_weights_round_trip(victim, tmp_path, one_thread):
    images = scenes(3)
    changed = victim.clone()
    with torch.no_grad():
        for p in changed.model.perceiver.parameters():
            p.add_(0.5)
    changed.save(tmp_path)
    fresh = victim.clone()
    assert not np.allclose(fresh.caption_nll(images, CAPTIONS), changed.caption_nll(images, CAPTIONS))
    fresh.load_trainable(tmp_path)
    np.testing.assert_array_equal(fresh.caption_nll(images, CAPTIONS), changed.caption_nll(images, CAPTIONS))


def test_base_entry_is_small_and_refuses_changed_files(parts, tmp_path, one_thread):
    local = write_parts(tmp_path / "parts")
    context = StageContext(cache_dir=tmp_path / "cache", config=None)
    built, log = PROFILE.build_base(context, small_params(local), None, None)
    assert log["checkpoint"]["loaded"] == len(trainable_state_dict(built.model))
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    built.save_full(base_dir)
    assert sorted(p.name for p in base_dir.iterdir()) == sorted(["trainable.safetensors", "victim.json", BASE_MANIFEST])
    assert not any(p.name.endswith(".bin") for p in base_dir.iterdir())  # no frozen weights copied
    loaded = PROFILE.load(base_dir, context)
    images = scenes(2)
    np.testing.assert_array_equal(loaded.caption_nll(images, CAPTIONS[:2]), built.caption_nll(images, CAPTIONS[:2]))
    assert loaded.decoding.batch_size == 2 and loaded.recipe.micro_batch_size == 2  # as built
    with open(local.tokenizer / "tokenizer_config.json", "a") as handle:
        handle.write("\n")
    with pytest.raises(VbbError, match="tokenizer_dir/tokenizer_config.json"):
        PROFILE.load(base_dir, context)


def test_check_available_names_every_missing_file(tmp_path):
    with pytest.raises(VbbError) as unset:
        PROFILE.check_available(PROFILE.params({}))
    for key in ("clip_vit_l14_dir", "mpt_1b_dir", "tokenizer_dir", "openflamingo_checkpoint"):
        assert f"{key} is not set" in str(unset.value)
    for name in ("clip", "mpt", "tok"):
        (tmp_path / name).mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    params = PROFILE.params({"clip_vit_l14_dir": str(tmp_path / "clip"), "mpt_1b_dir": str(tmp_path / "mpt"),
                             "tokenizer_dir": str(tmp_path / "tok"),
                             "openflamingo_checkpoint": str(tmp_path / "of" / "checkpoint.pt")})
    with pytest.raises(VbbError) as empty:
        PROFILE.check_available(params)
    message = str(empty.value)
    assert "clip_vit_l14_dir" in message and "no model.safetensors or" in message
    assert f"mpt_1b_dir = {tmp_path / 'mpt'}: no config.json inside" in message
    assert "no tokenizer.json inside" in message and "no checkpoint file (checkpoint.pt)" in message
    assert "clip_vit_l14_dir = " + str(tmp_path / "clip") + ": no config.json" not in message


def test_params_and_recipe():
    with pytest.raises(VbbError, match="unknown key"):
        PROFILE.params({"finetune_epoch": 3})
    with pytest.raises(VbbError, match="finetune_micro_batch_size"):
        PROFILE.params({"finetune_micro_batch_size": -1})
    recipe = PROFILE.finetune_recipe(PROFILE.params({}))
    assert (recipe.epochs, recipe.batch_size, recipe.lr, recipe.micro_batch_size) == (20, 300, 1e-4, 25)  # methods/victim.md §A3
    assert PROFILE.finetune_recipe(PROFILE.params({"finetune_micro_batch_size": 300})).micro_batch_size == 0


def test_random_weights_need_no_weight_file(parts, tmp_path, one_thread):
    local = MiniPaths.under(tmp_path)
    for src, dst in ((parts.clip, local.clip), (parts.mpt, local.mpt)):
        dst.mkdir(parents=True)
        shutil.copy(src / "config.json", dst / "config.json")
    shutil.copytree(parts.tokenizer, local.tokenizer)
    victim = PROFILE.build_victim(small_params(local), random_weights=True)  # no checkpoint, no weights
    assert victim.imported is None and victim.model.vis_dim == CFG.clip_width
    assert len(victim.generate(scenes(1))) == 1
    with pytest.raises(VbbError, match="random-weights"):
        victim.save_full(tmp_path)
