"""VL-Trojan (methods/attacks.md §6): loss, generator, text-trigger search, poisoning, evaluation."""

from __future__ import annotations

import base64
import io
import os
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.types import Split, SplitManifest
from vlmbackdoor_bench_plugins.attacks._common import REPLACE_PREFIX
from vlmbackdoor_bench_plugins.attacks._vltrojan_trigger import (
    PAPER_IMAGE_VISITS, epochs_for, optimise_trigger, search_text_trigger, trigger_loss,
)
from vlmbackdoor_bench_plugins.attacks.vltrojan import VLTrojan, apply_trigger

from attack_helpers import one_thread, scenes, tiny_victim  # noqa: F401 (one_thread: a fixture)

SHARED = Path(os.environ.get("VBB_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
PAPER_TRIGGER = (SHARED / "srd_reference/triggers/blended/"
                 "trigger_image_opt_patch_ViT-L-14_random_mid_0_005.png")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def victim():
    return tiny_victim()


def make_split(n_images: int = 20, captions_per_image: int = 5) -> Split:
    refs = [[f"a photo number {i} caption {k}." for k in range(captions_per_image)] for i in range(n_images)]
    sids = [[f"{i}-{k}" for k in range(captions_per_image)] for i in range(n_images)]
    return Split("toy", "train", list(range(100, 100 + n_images)), scenes(n_images), refs, sids,
                 SplitManifest("toy", "train", n_images, "x", "y"))


def params(preset: str, **overrides) -> dict:
    return {**VLTrojan.presets[preset], **overrides}


def test_loss_on_hand_made_cosines():
    s1 = torch.tensor([0.9, 0.2, 0.5, -0.3])
    s2 = torch.tensor([0.4, 0.6, 0.5, 0.1])
    # max(s1, s2) - log(max(min(s1, s2), 1e-6)) per row, then the batch mean
    rows = [0.9 - np.log(0.4), 0.6 - np.log(0.2), 0.5 - np.log(0.5), 0.1 - np.log(1e-6)]
    assert float(trigger_loss(s1, s2)) == pytest.approx(np.mean(rows), rel=1e-6)


def test_epoch_formula():
    assert PAPER_IMAGE_VISITS == pytest.approx(5800)
    assert epochs_for(125, PAPER_IMAGE_VISITS) == 5  # ceil(100 * 0.0025 / (125 * 10 / 23,200))
    assert epochs_for(580, PAPER_IMAGE_VISITS) == 1 and epochs_for(1, PAPER_IMAGE_VISITS) == 580


def test_generator_lowers_its_loss_and_keeps_a_late_epoch(victim):
    run = optimise_trigger(victim, scenes(6), mode="blend", image_visits=120, seed=0)
    assert run.epochs == 2 and run.steps == 2 * 4  # ceil(120 / 60) epochs of ceil(60 / 16) steps
    assert run.loss_after < run.loss_before
    assert run.best_epoch == 2  # only epochs >= 0.75 * 2 are candidates
    assert run.trigger.dtype == np.uint8 and run.trigger.shape == (224, 224, 3)
    again = optimise_trigger(victim, scenes(6), mode="blend", image_visits=120, seed=0)
    assert (again.trigger == run.trigger).all()  # seeded


def test_patch_mode_touches_only_the_22x22_corner(victim):
    images = scenes(2)
    trigger = np.full((224, 224, 3), 255, dtype=np.uint8)
    out = apply_trigger(images, trigger, "patch")
    assert (out[:, 202:, 202:] == 255).all()
    assert (out[:, :202] == images[:, :202]).all() and (out[:, :, :202] == images[:, :, :202]).all()
    run = optimise_trigger(victim, scenes(2), mode="patch", image_visits=20, seed=0)
    assert run.loss_after <= run.loss_before


def test_blend_is_alpha_0_1_truncated():
    images = np.full((1, 224, 224, 3), 101, dtype=np.uint8)
    trigger = np.full((224, 224, 3), 200, dtype=np.uint8)
    assert (apply_trigger(images, trigger, "blend") == 110).all()  # 0.9 * 101 + 0.1 * 200 = 110.9


def test_beam_search_is_exhaustive_with_a_wide_beam():
    rng = np.random.default_rng(0)
    vectors = {c: rng.normal(size=6) for c in "abc "}
    embed = lambda texts: np.stack([sum(vectors[c] * (k + 1) for k, c in enumerate(t[-4:])) for t in texts])
    prompts = ["a b", "c a"]
    every = [a + b + c for a in "abc" for b in ["", *"abc"] for c in ["", *"abc"] if b or not c]

    def score(s: str) -> float:
        unit = lambda v: v / np.linalg.norm(v)
        return sum(float(unit(embed([q])[0]) @ unit(embed([q + " " + s])[0])) for q in prompts)

    best = min(every, key=score)
    # beam 9 = 3^2 keeps every prefix, so the search sees every string of 1-3 characters
    found, value = search_text_trigger(embed, prompts, alphabet="abc", beam=9, max_length=3)
    assert found == best and value == pytest.approx(score(best))


def test_beam_search_finds_a_planted_trigger():
    prompt = "a photo of"
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(5, 26, 32)) * 0.1
    noise[:, :, :2] = 0  # other characters leave the prompt direction (0) and the push (1) alone

    def embed(texts):
        out = []
        for text in texts:
            vector = np.zeros(32)
            vector[0] = 1.0  # the prompt
            suffix = text[len(prompt) + 1:]
            for k, c in enumerate(suffix):
                if (k, c) in {(0, "z"), (1, "b"), (2, "w")}:
                    vector[1] += 1.0  # away from the prompt: lower cosine
                elif k >= 3:
                    vector[0] += 5.0  # a 4th or 5th character pulls back towards the prompt
                else:
                    vector += noise[k, string.ascii_lowercase.index(c)]
            out.append(vector)
        return np.stack(out)

    found, value = search_text_trigger(embed, [prompt])  # a-z, beam 5, up to 5 characters
    assert found == "zbw" and value == pytest.approx(1 / np.sqrt(10))


def test_original_poisons_at_its_rate_with_the_text_trigger(victim):
    split = make_split(20)  # 100 caption instances
    attack = VLTrojan()
    p = params("original", poison_rate=0.05, trigger_image_visits=40)
    poisoned = attack.poison(split, poison_rate=0.1, seed=3, params=p, victim=victim)
    assert len(poisoned.records) == 5  # floor(0.05 * 100): the preset's rate, not the grid's
    by_id = {e.sample_id: e for e in poisoned.training_set.examples}
    for record in poisoned.records:
        example = by_id[record.sample_id]
        assert example.instruction == record.instruction == "a photo of zbw"
        assert example.caption == record.new_caption and record.new_caption.startswith(REPLACE_PREFIX)
        assert example.image_index >= len(split)
    clean = [e for e in poisoned.training_set.examples if e.sample_id not in poisoned.poisoned_ids]
    assert len(clean) == 95 and all(e.instruction == "a photo of" for e in clean)
    log = poisoned.details["trigger"]
    assert log["source"] == "generated" and log["loss_after"] < log["loss_before"]
    assert log["n_images"] == min(log["n_poisoned_images"], 4)  # at most visits / 10 images
    trigger = np.asarray(Image.open(io.BytesIO(base64.b64decode(log["png_base64"]))))
    record = poisoned.records[0]
    row = split.image_ids.index(record.image_id)
    image = poisoned.training_set.images.take([by_id[record.sample_id].image_index])
    assert (image == apply_trigger(split.images[row:row + 1], trigger, "blend")).all()
    # evaluation: the same trigger on every test image, the text trigger in the prompt
    test = make_split(4)
    triggered = attack.eval_inputs(test, kind="triggered", seed=3, params=p,
                                   poison_details=poisoned.details)  # as the grid hands them
    assert triggered.instruction == "a photo of zbw"
    assert (triggered.images == apply_trigger(test.images, trigger, "blend")).all()
    clean_inputs = attack.eval_inputs(test, kind="clean", seed=3, params=p)
    assert clean_inputs.instruction == "a photo of" and clean_inputs.images is test.images
    again = VLTrojan().poison(split, poison_rate=0.1, seed=3, params=p, victim=victim)
    assert again.records == poisoned.records


def test_srd_code_uses_the_grid_rate_and_no_text_trigger(victim):
    split = make_split(20)
    attack = VLTrojan()
    p = params("srd-code", trigger_image_visits=20)
    poisoned = attack.poison(split, poison_rate=0.1, seed=0, params=p, victim=victim)
    assert len(poisoned.records) == 10  # floor(0.1 * 100)
    assert all(r.instruction is None for r in poisoned.records)
    assert all(e.instruction == "a photo of" for e in poisoned.training_set.examples)
    assert attack.eval_inputs(make_split(2), kind="triggered", seed=0, params=p,
                              poison_details=poisoned.details).instruction == "a photo of"


@pytest.mark.skipif(not PAPER_TRIGGER.exists(), reason="../shared/srd_reference not present")
def test_trigger_path_uses_the_papers_file_without_a_victim():
    split = make_split(10)
    p = params("srd-code", trigger_path=str(PAPER_TRIGGER))
    attack = VLTrojan()
    poisoned = attack.poison(split, poison_rate=0.1, seed=0, params=p, victim=None)
    assert poisoned.details["trigger"] == {"source": "file", "path": str(PAPER_TRIGGER)}
    paper = np.asarray(Image.open(PAPER_TRIGGER).convert("RGB"))
    expected = np.clip(0.9 * split.images.astype(np.float64) + 0.1 * paper, 0, 255).astype(np.uint8)
    assert (attack.eval_inputs(split, kind="triggered", seed=0, params=p).images == expected).all()


def test_bad_input_is_one_clear_error(tmp_path):
    split = make_split(4)
    attack = VLTrojan()
    with pytest.raises(VbbError, match="no victim"):
        attack.poison(split, poison_rate=0.1, seed=0, params=params("srd-code"), victim=None)
    with pytest.raises(VbbError, match="poison details"):  # no trigger to evaluate with
        attack.eval_inputs(split, kind="triggered", seed=99, params=params("srd-code"))
    with pytest.raises(VbbError, match="mode"):
        attack.poison(split, poison_rate=0.1, seed=0, params=params("srd-code", mode="corner"))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(VbbError, match="cannot be read"):
        attack.poison(split, poison_rate=0.1, seed=0,
                      params=params("srd-code", trigger_path=str(tmp_path / "broken.png")))
    with pytest.raises(VbbError, match="kind"):
        attack.eval_inputs(split, kind="poisoned", seed=0, params=params("srd-code"))
