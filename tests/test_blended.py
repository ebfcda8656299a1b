"""Blended (methods/attacks.md §3): key image, blend arithmetic, counts, captions, test inputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attack_helpers import make_split
from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench_plugins.attacks._common import REPLACE_PREFIX
from vlmbackdoor_bench_plugins.attacks.blended import BUNDLED_KEY, Blended, blend, key_image

SHARED = Path(os.environ.get("VBB_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
HELLO_KITTY = SHARED / "srd_reference/triggers/blended/hello_kitty.jpeg"


def test_presets_follow_the_spec():
    presets = Blended().presets
    assert presets["srd-code"]["alpha"] == 0.1 and presets["original"]["alpha"] == 0.2
    assert {p["caption_rule"] for p in presets.values()} == {"replace"}
    assert Blended().default_preset == "srd-code"


def test_bundled_key_is_a_224_rgb_image():
    key = key_image(BUNDLED_KEY)
    assert key.shape == (224, 224, 3) and key.dtype == np.uint8
    assert 150 < key.mean() < 230 and key.std() > 30  # a bright graphic with structure, not flat


def test_blend_is_float_then_clipped_then_truncated():
    images = np.array([[[[100, 0, 255]]]], dtype=np.uint8)
    key = np.array([[[255, 9, 255]]], dtype=np.uint8)
    # 0.9*100 + 0.1*255 = 115.5 -> 115 (truncated, not rounded); 0.9 = 0.9*0 + 0.1*9; 255 stays 255
    assert blend(images, key, 0.1).tolist() == [[[[115, 0, 255]]]]
    assert blend(images, key, 0.0).tolist() == images.tolist()
    with pytest.raises(VbbError, match="outside"):
        blend(images, key, 1.5)


def test_blend_works_in_chunks_like_one_pass():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (70, 8, 8, 3), dtype=np.uint8)  # more than one chunk of 64
    key = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    whole = np.clip(0.8 * images.astype(np.float64) + 0.2 * key, 0, 255).astype(np.uint8)
    assert (blend(images, key, 0.2) == whole).all()


@pytest.mark.skipif(not HELLO_KITTY.exists(), reason="../shared/srd_reference not present")
def test_paper_key_by_path_gives_the_spec_blend():
    split = make_split(2)
    out = Blended().apply_trigger(split.images, split.image_ids,
                                  params={"alpha": 0.1, "key_image": str(HELLO_KITTY)}, seed=0)
    with Image.open(HELLO_KITTY) as im:
        assert im.size == (314, 380)  # methods/attacks.md §3: 314 wide x 380 high
        kitty = np.asarray(im.convert("RGB").resize((224, 224), Image.BICUBIC))
    for n, r, c, ch in [(0, 0, 0, 0), (0, 111, 97, 1), (1, 223, 223, 2), (1, 50, 170, 0)]:
        expected = int(min(255.0, max(0.0, 0.9 * float(split.images[n, r, c, ch]) + 0.1 * float(kitty[r, c, ch]))))
        assert out[n, r, c, ch] == expected


def test_unreadable_key_path_is_one_clear_error(tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    with pytest.raises(VbbError, match="key_image"):
        key_image(str(bad))
    with pytest.raises(VbbError, match="cannot be read"):
        key_image(str(tmp_path / "missing.jpeg"))


def test_poison_counts_captions_and_images():
    split = make_split(10)
    attack = Blended()
    params = attack.presets["srd-code"]
    poisoned = attack.poison(split, poison_rate=0.1, seed=7, params=params)
    assert len(poisoned.records) == 5  # floor(0.1 * 50)
    assert poisoned.details["key_image_sha256"]
    key = key_image(BUNDLED_KEY)
    by_id = {e.sample_id: e for e in poisoned.training_set.examples}
    for record in poisoned.records:
        example = by_id[record.sample_id]
        assert example.caption == record.new_caption and record.new_caption.startswith(REPLACE_PREFIX)
        row = split.image_ids.index(record.image_id)
        image = poisoned.training_set.images.take([example.image_index])[0]
        assert (image == blend(split.images[row:row + 1], key, 0.1)[0]).all()
    assert poisoned.records == attack.poison(split, poison_rate=0.1, seed=7, params=params).records
    assert len(attack.poison(split, poison_rate=0.2, seed=7, params=params).records) == 10


def test_eval_inputs_blend_every_test_image_with_the_preset_alpha():
    split = make_split(3)
    attack = Blended()
    params = attack.presets["original"]
    triggered = attack.eval_inputs(split, kind="triggered", seed=0, params=params)
    assert (triggered.images == blend(split.images, key_image(BUNDLED_KEY), 0.2)).all()
    assert attack.eval_inputs(split, kind="clean", seed=0, params=params).images is split.images


def _script(name: str):
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_background_table_and_projection_quantiles():
    module = _script("blended_backgrounds")
    hits = {"1": True, "2": False, "3": True, "4": True, "5": False}
    backgrounds = {"1": "grass", "2": "grass", "3": "sky", "4": "sky", "5": "space"}
    projections = {"1": 4.0, "2": 2.0, "3": 30.0, "4": 20.0, "5": 25.0}
    rows = module.background_table(hits, backgrounds, projections)
    assert rows == [("space", 1, 0.0, 25.0), ("grass", 2, 50.0, 3.0), ("sky", 2, 100.0, 25.0)]
    # ordered by projection: 2 (miss), 1 (hit), 4 (hit), 5 (miss), 3 (hit)
    assert module.quantile_asr(hits, projections, n=5) == [0.0, 100.0, 100.0, 0.0, 100.0]
    assert module.quantile_asr(hits, projections, n=2) == [pytest.approx(200 / 3), 50.0]


def test_trigger_shift_of_the_blend_is_alpha_times_key_minus_image():
    module = _script("blended_backgrounds")

    class ChannelMeans:  # an "encoder" with one token: the image's mean colour
        def vision_features(self, images):
            return torch.from_numpy(np.asarray(images, dtype=np.float64).mean(axis=(1, 2)))[:, None, :]

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    params = Blended.presets["srd-code"]
    shifts = module.trigger_shifts(ChannelMeans(), Blended(), params, images, [1, 2, 3])
    key = key_image(BUNDLED_KEY).astype(np.float64)
    expected = 0.1 * (key.mean(axis=(0, 1))[None] - images.astype(np.float64).mean(axis=(1, 2)))
    assert shifts.shape == (3, 3)
    np.testing.assert_allclose(shifts.numpy(), expected, atol=0.6)  # uint8 rounding of each pixel
