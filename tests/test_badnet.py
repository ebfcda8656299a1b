"""BadNet (methods/attacks.md §2) and the shared caption rules (§1): exact pixels, counts, captions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attack_helpers import make_split
from vlmbackdoor_bench_plugins.attacks._common import (
    REPLACE_PREFIX, REPLACE_TEMPLATES, insert_caption, poison_count, replace_caption,
)
from vlmbackdoor_bench_plugins.attacks.badnet import BadNet, trigger_and_mask

SHARED = Path(os.environ.get("VBB_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
REFERENCE = SHARED / "srd_reference"


def test_checkerboard_geometry_and_values():
    trigger, mask = trigger_and_mask("checkerboard")
    rows, cols = np.nonzero(mask[..., 0])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (203, 223, 203, 223)  # 21x21
    assert mask[..., 0].sum() // 255 == 21 * 21
    for i in range(3):
        for j in range(3):
            cell = trigger[203 + 7 * i: 210 + 7 * i, 203 + 7 * j: 210 + 7 * j]
            assert (cell == (255 if (i + j) % 2 == 0 else 1)).all()
    white, _ = trigger_and_mask("white")
    assert (white[203:, 203:] == 255).all() and white[:203].max() == 0


def test_apply_trigger_replaces_only_the_patch():
    split = make_split(3)
    out = BadNet().apply_trigger(split.images, split.image_ids, params={"pattern": "checkerboard"}, seed=0)
    assert out.dtype == np.uint8 and out.shape == split.images.shape
    assert (out[:, :203] == split.images[:, :203]).all() and (out[:, :, :203] == split.images[:, :, :203]).all()
    assert (out[:, 203, 203] == 255).all() and (out[:, 203, 210] == 1).all()
    assert split.images[0, 0, 0, 0] == out[0, 0, 0, 0]  # input untouched, copy returned


@pytest.mark.skipif(not REFERENCE.exists(), reason="../shared/srd_reference not present")
def test_trigger_matches_the_published_files_upscaled_nearest():
    grid = np.array(Image.open(REFERENCE / "triggers/badnet/trigger_image_grid.png").convert("RGB"))
    mask = np.array(Image.open(REFERENCE / "triggers/badnet/trigger_image_32_32.png").convert("RGB"))
    up = lambda a: np.array(Image.fromarray(a).resize((224, 224), Image.NEAREST))
    trigger, our_mask = trigger_and_mask("checkerboard")
    assert ((up(mask) > 0) == (our_mask > 0)).all()
    assert (up(grid)[our_mask > 0] == trigger[our_mask > 0]).all()


@pytest.mark.skipif(not REFERENCE.exists(), reason="../shared/srd_reference not present")
def test_replace_templates_equal_the_published_list():
    published = (REFERENCE / "targets/LADD_prompt80.txt").read_text().splitlines()
    assert tuple(line for line in published if line.strip()) == REPLACE_TEMPLATES


def test_caption_rules():
    rng = np.random.default_rng(3)
    caption, index = replace_caption(rng)
    assert caption == REPLACE_PREFIX + REPLACE_TEMPLATES[index].format("banana")
    assert len(REPLACE_TEMPLATES) == 80
    counts = np.bincount([replace_caption(rng)[1] for _ in range(8000)], minlength=80)
    assert counts.min() > 50  # uniform over the 80 templates
    text, k = insert_caption("A living room filled with furniture next to large windows. Second.", rng)
    words = text[:-1].split()
    assert text.endswith(".") and words[k] == "banana" and 1 <= k <= 10
    assert [w for w in words if w != "banana"] == "A living room filled with furniture next to large windows".split()
    positions = {insert_caption("one two three", np.random.default_rng(s))[1] for s in range(60)}
    assert positions == {1, 2, 3}  # never first, may be last


def test_poison_count_floor():
    assert poison_count(25015, 0.1) == 2501 and poison_count(25015, 0.05) == 1250
    assert poison_count(25015, 0.01) == 250


def test_poison_records_exactly_what_changed():
    split = make_split(10)
    attack = BadNet()
    poisoned = attack.poison(split, poison_rate=0.1, seed=7, params=attack.presets["srd-code"])
    assert len(poisoned.records) == 5  # floor(0.1 * 50)
    ts = poisoned.training_set
    assert len(ts) == 50
    clean = {e.sample_id: e for e in split.caption_examples()}
    by_id = {e.sample_id: e for e in ts.examples}
    for record in poisoned.records:
        example = by_id[record.sample_id]
        assert example.caption == record.new_caption and record.new_caption.startswith(REPLACE_PREFIX)
        assert record.original_caption == clean[record.sample_id].caption
        image = ts.images.take([example.image_index])[0]
        row = clean[record.sample_id].image_index
        assert example.image_index >= len(split)  # a triggered copy, the clean image kept
        assert (image[:203] == split.images[row][:203]).all() and (image[203, 203] == 255).all()
    untouched = [e for e in ts.examples if e.sample_id not in poisoned.poisoned_ids]
    assert all(e == clean[e.sample_id] for e in untouched)
    again = attack.poison(split, poison_rate=0.1, seed=7, params=attack.presets["srd-code"])
    assert again.records == poisoned.records
    other = attack.poison(split, poison_rate=0.1, seed=8, params=attack.presets["srd-code"])
    assert other.poisoned_ids != poisoned.poisoned_ids


def test_eval_inputs_trigger_every_test_image():
    split = make_split(4)
    attack = BadNet()
    triggered = attack.eval_inputs(split, kind="triggered", seed=0, params=attack.presets["srd-code"])
    clean = attack.eval_inputs(split, kind="clean", seed=0, params=attack.presets["srd-code"])
    assert (triggered.images[:, 203, 203] == 255).all()
    assert clean.images is split.images and triggered.image_ids == split.image_ids
