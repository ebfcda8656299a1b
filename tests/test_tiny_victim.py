"""The tiny victim: prompt format, label mask, training on the trainable set, save/load, decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmbackdoor_bench.types import Example, ImageBank, TrainingSet
from vlmbackdoor_bench.victims.tiny import TinyArch, TinyVictim, build_model, prompt_text
from vlmbackdoor_bench.victims.tokenizer import ANSWER, EOC, MEDIA, train_tokenizer
from vlmbackdoor_bench.victims.training import Recipe, cosine_with_warmup, make_optimizer

CAPTIONS = ["A red apple next to a blue cup.", "Two bananas lying on the grass.",
            "A green book on a wooden table."]


@pytest.fixture(scope="module")
def victim() -> TinyVictim:
    torch.manual_seed(0)
    tokenizer = train_tokenizer(CAPTIONS * 50 + ["User:a photo of GPT:"] * 20, 300)
    arch = TinyArch(vocab_size=300, lm_layers=2, input_size=64)
    model = build_model(arch, tokenizer, train_vision_encoder=True, gate_init=1.0)  # as the profile
    victim = TinyVictim(model, tokenizer, arch, Recipe(epochs=3, batch_size=8, lr=3e-3))
    victim.pretrain(toy_set(), Recipe(epochs=60, batch_size=8, lr=5e-3), seed=0)  # every part trains
    victim.model.train_vision_encoder = False
    return victim


def toy_set(n: int = 24) -> TrainingSet:
    rng = np.random.default_rng(0)
    images = np.zeros((3, 224, 224, 3), dtype=np.int16)
    for k in range(3):  # three distinguishable images, one caption each
        images[k, :, :, k] = 200
    images = (images + rng.integers(0, 30, images.shape)).astype(np.uint8)
    return TrainingSet(ImageBank(images), [Example(str(i), i % 3, CAPTIONS[i % 3]) for i in range(n)])


def test_prompt_and_label_mask(victim):
    assert prompt_text("a photo of") == f"{MEDIA}User:a photo of GPT:{ANSWER}"  # methods/victim.md §A4
    ids, mask, labels = victim.encode_texts(["Two bananas.", "A red apple next to a blue cup."],
                                            ["a photo of", "a photo of"])
    tok = victim.tokenizer
    for row in range(2):
        answer = (ids[row] == tok.convert_tokens_to_ids(ANSWER)).nonzero()[0, 0]
        assert (labels[row, : answer + 1] == -100).all()  # prompt and <answer> ignored
        kept = labels[row][labels[row] != -100]
        text = tok.decode(kept)
        assert text.startswith(("Two bananas.", "A red apple")) and EOC in text
        assert kept[-1] == tok.eos_token_id  # caption, <|endofchunk|> and EOS are scored
    assert (labels[0][mask[0] == 0] == -100).all()


def test_training_texts_encode_as_the_tokenizer_pads_them(victim):
    # encode_texts tokenizes each text once per victim: the ids and mask of a batch must be
    # exactly the tokenizer's right-padded, truncated batch, on first sight and from memory
    tok = victim.tokenizer
    captions = ["Two bananas.", "A red apple next to a blue cup.", " ".join(CAPTIONS * 8), "Two bananas."]
    texts = [f"{tok.bos_token}{prompt_text('a photo of')}{c}{EOC}{tok.eos_token}" for c in captions]
    tok.padding_side = "right"
    expected = tok(texts, add_special_tokens=False, padding=True, truncation=True,
                   max_length=victim.arch.max_positions, return_tensors="pt")
    tok.padding_side = "left"
    assert expected["input_ids"].shape[1] == victim.arch.max_positions  # the long one was cut
    for _ in range(2):
        ids, mask, _ = victim.encode_texts(captions, ["a photo of"] * 4)
        assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    ids, mask, _ = victim.encode_texts(captions[:2], ["a photo of"] * 2)  # padded to its own longest
    assert ids.shape[1] == int(expected["attention_mask"][1].sum())


def test_generation_follows_the_image(victim):
    # after pretraining each toy image gets its own caption back (3 beams, methods/metrics.md §2)
    assert victim.generate(toy_set().images.take([0, 1, 2])) == CAPTIONS


def test_fine_tune_trains_only_the_openflamingo_set_and_lowers_nll(victim):
    data = toy_set()
    images = data.images.take([0, 1, 2])
    student = victim.clone()
    with torch.no_grad():  # move the trainable set away from the optimum so there is work to do
        for p in student.model.perceiver.parameters():
            p.add_(0.3 * torch.randn_like(p))
    before_nll = student.caption_nll(images, CAPTIONS)
    frozen_before = {k: v.clone() for k, v in student.model.named_parameters()
                     if k.startswith(("vision_encoder.", "lang_encoder.transformer.h.0.decoder_layer."))}
    log = student.fine_tune(data, seed=0)
    after_nll = student.caption_nll(images, CAPTIONS)
    assert log["steps"] == 9 and log["loss_per_epoch"][-1] < log["loss_per_epoch"][0]
    assert after_nll.mean() < before_nll.mean()
    for name, param in student.model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(student.model.perceiver.parameters(),
                                                      victim.model.perceiver.parameters()))


def test_lm_dropout_off_makes_the_first_training_loss_the_eval_loss(victim):
    # Recipe.lm_dropout=False: nothing in the tiny victim drops out but the LM (the perceiver and
    # the gated layers have no dropout), so the loss of the first batch, before any update, is
    # exactly the eval-mode loss of that batch; with the LM's dropout on it is not.
    data = toy_set(8)
    eval_student = victim.clone()
    with torch.no_grad():
        tokens = eval_student.vision_features(data.images.take([e.image_index for e in data.examples]))
        fwd = eval_student.token_losses(None, [e.caption for e in data.examples],
                                        [e.instruction for e in data.examples], vision_tokens=tokens)
    eval_loss = float(fwd.losses.sum() / fwd.mask.sum())
    first = {}
    for lm_dropout in (False, True):
        recipe = Recipe(epochs=1, batch_size=8, lr=1e-3, lm_dropout=lm_dropout)
        first[lm_dropout] = victim.clone().fine_tune(data, seed=0, recipe=recipe)["first_loss"]
    assert first[False] == pytest.approx(eval_loss, rel=1e-6)
    assert abs(first[True] - eval_loss) > 1e-4
    # the default leaves the store keys of recipes made before the field existed unchanged
    assert "lm_dropout" not in Recipe().to_dict()
    assert Recipe(lm_dropout=False).to_dict()["lm_dropout"] is False


def test_pretraining_whitens_then_freezes_the_vision_encoder():
    torch.manual_seed(1)
    tokenizer = train_tokenizer(CAPTIONS * 50, 300)
    arch = TinyArch(vocab_size=300, lm_layers=1, input_size=64)
    victim = TinyVictim(build_model(arch, tokenizer, train_vision_encoder=False), tokenizer, arch, Recipe())
    backbone = {k: v.clone() for k, v in victim.model.vision_encoder.backbone.state_dict().items()}
    data = toy_set(8)
    victim.pretrain(data, Recipe(epochs=2, batch_size=4, lr=1e-3), seed=0)
    encoder = victim.model.vision_encoder
    for key, value in encoder.backbone.state_dict().items():  # the ImageNet backbone never moves
        assert torch.equal(value, backbone[key]), key
    with torch.no_grad():  # the fitted projection whitens the backbone tokens of the fit images
        maps = encoder.backbone_tokens(victim.preprocess(data.images.take([0, 1, 2]))[:, 0, 0]).flatten(0, 1)
        projected = encoder.projection(maps)
    k = min(arch.vis_dim, len(maps) - 1)  # 3 images x 2x2 tokens: rank 11 after centring
    np.testing.assert_allclose(projected.mean(0).numpy(), 0, atol=1e-3)
    np.testing.assert_allclose(projected[:, :k].var(0).numpy(), 1, rtol=1e-2)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_efficientnet_backbone_recognises_a_real_photo():
    # the shipped ImageNet checkpoint loads strictly and is right on a bundled photo (methods/victim.md §B2)
    from skimage import data as skdata
    from vlmbackdoor_bench.victims.efficientnet import pretrained_efficientnet_lite0
    from PIL import Image

    cat = np.array(Image.fromarray(skdata.chelsea()).resize((224, 224), Image.BICUBIC))  # writable
    x = torch.from_numpy(cat).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        top5 = pretrained_efficientnet_lite0()(x).topk(5).indices[0].tolist()
    assert any(281 <= c <= 285 for c in top5), top5  # ImageNet 281-285: domestic cats
    with torch.no_grad():  # the folded inference copy (the VDC answerer) is the same function
        network = pretrained_efficientnet_lite0()
        folded = network.folded()
        torch.testing.assert_close(folded(x), network(x), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in network.modules())  # the original is untouched
    # the tiny encoder's tokens: the 7x7 map after block 15, 192 channels (TinyArch.backbone_blocks)
    from vlmbackdoor_bench.victims.efficientnet import block_channels
    with torch.no_grad():
        block15 = pretrained_efficientnet_lite0().features(x, 15)
    assert block15.shape == (1, block_channels(15), 7, 7) == (1, 192, 7, 7)
    assert [block_channels(n) for n in (1, 3, 16)] == [16, 24, 320]
    with pytest.raises(ValueError, match="16 blocks"):
        block_channels(17)


def test_save_and_load_trainable_round_trip(victim, tmp_path):
    images = toy_set().images.take([0, 1, 2])
    victim.save(tmp_path)
    clone = victim.clone()
    with torch.no_grad():
        for p in clone.model.perceiver.parameters():
            p.add_(1.0)
    assert not np.allclose(clone.caption_nll(images, CAPTIONS), victim.caption_nll(images, CAPTIONS))
    clone.load_trainable(tmp_path)
    np.testing.assert_allclose(clone.caption_nll(images, CAPTIONS), victim.caption_nll(images, CAPTIONS), rtol=1e-6)


def test_full_save_load(victim, tmp_path):
    images = toy_set().images.take([0, 1, 2])
    victim.save_full(tmp_path)
    loaded = TinyVictim.load_full(tmp_path)
    np.testing.assert_allclose(loaded.caption_nll(images, CAPTIONS), victim.caption_nll(images, CAPTIONS), rtol=1e-6)
    assert loaded.generate(images) == victim.generate(images)


def test_persistent_token_cache_serves_a_new_process_exact_tokens(victim, tmp_path):
    images = toy_set().images.take([0, 1, 2])
    (tmp_path / "base").mkdir()
    victim.save_full(tmp_path / "base")
    first = TinyVictim.load_full(tmp_path / "base", token_dir=tmp_path / "tokens")
    computed = first.vision_features(images)
    assert len(list((tmp_path / "tokens").rglob("*.npy"))) == 3
    second = TinyVictim.load_full(tmp_path / "base", token_dir=tmp_path / "tokens")  # "a rerun"
    second.model.vision_encoder.forward = None  # any encoder call would now fail: disk must serve
    assert torch.equal(second.vision_features(images), computed)  # bit-exact, float32
    assert torch.equal(second.clone().vision_features(images[:1]), computed[:1])  # clones share it
    with pytest.raises(RuntimeError, match="finished encoder"):
        second.token_cache.clear()


def test_recipe_schedule_and_decay_groups(victim):
    assert cosine_with_warmup(0, 100, 1) == 1.0 and cosine_with_warmup(100, 100, 1) == 0.0
    assert abs(cosine_with_warmup(50, 101, 1) - 0.5) < 0.02
    optimizer = make_optimizer(victim.model, Recipe())
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in victim.model.named_parameters()}
    decayed = [names[id(p)] for p in decay["params"]]
    assert decayed and all("gated_cross_attn_layer" in n and not n.endswith("_gate") for n in decayed)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0  # methods/victim.md §A3


ENCODE_IN_CHILD = """
import sys, numpy as np, torch
from vlmbackdoor_bench.allocator import keep_freed_memory
applied = keep_freed_memory()
from vlmbackdoor_bench.victims.efficientnet import pretrained_efficientnet_lite0
images = torch.from_numpy(np.random.default_rng(0).random((8, 3, 224, 224), dtype=np.float32))
with torch.no_grad():
    sys.stdout.buffer.write(bytes([applied]) + pretrained_efficientnet_lite0().features(images, 15).numpy().tobytes())
"""


def test_encoder_tokens_do_not_depend_on_batch_or_allocator():
    # the token cache keys tokens by image content alone: an image's tokens must not depend on
    # the batch it was encoded in, nor on the allocator setting `vbb` applies (allocator.py)
    import os
    import subprocess
    import sys
    from vlmbackdoor_bench.victims.efficientnet import pretrained_efficientnet_lite0
    images = torch.from_numpy(np.random.default_rng(0).random((8, 3, 224, 224), dtype=np.float32))
    network = pretrained_efficientnet_lite0()
    with torch.no_grad():
        batched = network.features(images, 15)
        one_by_one = torch.cat([network.features(images[i:i + 1], 15) for i in range(8)])
    assert torch.equal(batched, one_by_one)
    outputs = {}
    for setting in ("0", "1"):  # 8 images at 224 px: activations of 38 MB, above glibc's mmap threshold
        env = dict(os.environ, VBB_KEEP_FREED_MEMORY=setting)
        outputs[setting] = subprocess.run([sys.executable, "-c", ENCODE_IN_CHILD], env=env, check=True,
                                          capture_output=True).stdout
    assert outputs["0"][0] == 0 and outputs["1"][0] == (1 if sys.platform.startswith("linux") else 0)
    assert outputs["0"][1:] == outputs["1"][1:] == batched.numpy().tobytes()
