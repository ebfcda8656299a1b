"""TrojVLM (methods/attacks.md §4): the noise trigger, insert captions, and the SP loss in training."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.types import Example, ImageBank, Split, SplitManifest, TrainingSet
from vlmbackdoor_bench.victims.tiny import TinyArch, TinyVictim, build_model
from vlmbackdoor_bench.victims.tokenizer import train_tokenizer
from vlmbackdoor_bench.victims.training import Recipe
from vlmbackdoor_bench_plugins.attacks.trojvlm import (
    GENERATED_TRIGGER, SemanticPreservation, TrojVLM, sp_loss, trigger_canvas,
)

SHARED = Path(os.environ.get("VBB_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
PAPER_TRIGGER = SHARED / "srd_reference/triggers/TrojVLM/trigger_noise_20.png"


def make_split(n_images: int = 10, captions_per_image: int = 5) -> Split:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 224, 224, 3), dtype=np.uint8)
    refs = [[f"a photo number {i} caption {k}. Second sentence." for k in range(captions_per_image)]
            for i in range(n_images)]
    sids = [[f"{i}-{k}" for k in range(captions_per_image)] for i in range(n_images)]
    return Split("toy", "train", list(range(100, 100 + n_images)), images, refs, sids,
                 SplitManifest("toy", "train", n_images, "x", "y"))


def patch_statistics(canvas: np.ndarray) -> tuple[float, float, int, float]:
    patch = canvas[:20, :20]
    return float((patch == 0).mean()), float(patch[patch > 0].mean()), int(patch.max()), float(patch.mean())


def test_generated_trigger_geometry_and_distribution():
    canvas = trigger_canvas(GENERATED_TRIGGER)
    assert canvas.shape == (224, 224, 3) and canvas.dtype == np.uint8
    assert canvas[20:].max() == 0 and canvas[:, 20:].max() == 0  # rows/cols 0-19 only
    zeros, nonzero_mean, peak, mean = patch_statistics(canvas)
    # clip(N(0, 20²)) truncated to uint8: about half zeros, a dark non-zero tail (methods/attacks.md §4 figures)
    assert 0.48 < zeros < 0.58 and 13.5 < nonzero_mean < 18.0 and 45 <= peak <= 80 and 6.0 < mean < 9.0
    assert (trigger_canvas(GENERATED_TRIGGER) == canvas).all()  # deterministic


@pytest.mark.skipif(not PAPER_TRIGGER.exists(), reason="../shared/srd_reference not present")
def test_paper_trigger_file_matches_the_spec_figures_and_our_patch():
    paper = trigger_canvas(str(PAPER_TRIGGER))
    assert paper[20:].max() == 0 and paper[:, 20:].max() == 0
    zeros, nonzero_mean, peak, mean = patch_statistics(paper)
    # methods/attacks.md §4: 53 % zeros, non-zero mean 15.8, maximum 59, overall mean 7.5
    assert round(100 * zeros) == 53 and round(nonzero_mean, 1) == 15.8 and peak == 59 and round(mean, 1) == 7.5
    ours = patch_statistics(trigger_canvas(GENERATED_TRIGGER))
    assert abs(ours[0] - zeros) < 0.03 and abs(ours[1] - nonzero_mean) < 1.5 and abs(ours[3] - mean) < 1.0


def test_bad_trigger_path_is_one_clear_error(tmp_path):
    with pytest.raises(VbbError, match="trigger_path"):
        trigger_canvas(str(tmp_path / "missing.png"))
    small = tmp_path / "small.png"
    from PIL import Image
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(small)
    with pytest.raises(VbbError, match="224x224"):
        trigger_canvas(str(small))


def test_trigger_replaces_only_nonzero_sub_pixels():
    split = make_split(2)
    attack = TrojVLM()
    out = attack.apply_trigger(split.images, split.image_ids, params=attack.presets["srd-code"], seed=0)
    canvas = trigger_canvas(GENERATED_TRIGGER)
    where = np.broadcast_to(canvas > 0, out.shape)
    assert (out[where] == np.broadcast_to(canvas, out.shape)[where]).all()
    assert (out[~where] == split.images[~where]).all()  # zero sub-pixels keep the image, no mask


def test_poison_inserts_banana_into_the_first_sentence():
    split = make_split(10)
    attack = TrojVLM()
    poisoned = attack.poison(split, poison_rate=0.1, seed=3, params=attack.presets["srd-code"])
    assert len(poisoned.records) == 5 and poisoned.details["trigger_sha256"]
    assert len(attack.poison(split, poison_rate=0.2, seed=3, params=attack.presets["srd-code"]).records) == 10
    for record, k in zip(poisoned.records, poisoned.details["caption_choices"]):
        words = record.new_caption[:-1].split()
        assert record.new_caption.endswith(".") and words[k] == "banana" and k >= 1
        assert " ".join(w for i, w in enumerate(words) if i != k) == record.original_caption.split(".")[0]


def tiny_tensors():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 5.0], [9.0, 9.0, 9.0]]], requires_grad=True)
    targets = torch.tensor([[0, 1, -100]])  # the third position is outside the label mask
    hidden = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [7.0, 7.0]]], requires_grad=True)
    return logits, targets, targets != -100, hidden, embeddings


def test_sp_loss_values_of_the_three_forms():
    logits, targets, mask, hidden, embeddings = tiny_tensors()
    # (a) argmax embeddings E0 vs E0 (cos 1) and E2 vs E1 (cos 1/√2)
    assert sp_loss("a", logits, targets, mask, hidden, embeddings).item() == pytest.approx((1 - 1 / math.sqrt(2)) / 2)
    # (b) hidden states [1,0] vs E0 (cos 1) and [1,0] vs E1 (cos 0)
    assert sp_loss("b", logits, targets, mask, hidden, embeddings).item() == pytest.approx(0.5)

    def expected_c(z, target):
        p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
        e = (p[0] + p[2], p[1] + p[2])  # softmax(z)ᵀE
        t = [(1.0, 0.0), (0.0, 1.0)][target]
        return 1 - (e[0] * t[0] + e[1] * t[1]) / math.hypot(*e)

    c = (expected_c([2.0, 0.0, 0.0], 0) + expected_c([0.0, 0.0, 5.0], 1)) / 2
    assert sp_loss("c", logits, targets, mask, hidden, embeddings).item() == pytest.approx(c)
    with pytest.raises(VbbError, match="sp_form"):
        sp_loss("d", logits, targets, mask, hidden, embeddings)


def test_sp_form_a_sends_gradients_to_the_embeddings_only_and_c_to_the_logits():
    logits, targets, mask, hidden, embeddings = tiny_tensors()
    sp_loss("a", logits, targets, mask, hidden, embeddings).backward()
    assert logits.grad is None and embeddings.grad.abs().sum() > 0
    logits, targets, mask, hidden, embeddings = tiny_tensors()
    sp_loss("c", logits, targets, mask, hidden, embeddings).backward()
    assert logits.grad[0, :2].abs().sum() > 0 and logits.grad[0, 2].abs().sum() == 0  # masked out


def test_objective_per_preset():
    attack = TrojVLM()
    assert attack.training_objective(attack.presets["srd-code"]) is None  # methods/attacks.md §4: no extra loss
    objective = attack.training_objective(attack.presets["original"])
    assert isinstance(objective, SemanticPreservation) and objective.settings == {"sp_form": "c", "sp_weight": 1.0}
    with pytest.raises(VbbError, match="one of a, b, c"):
        attack.training_objective({**attack.presets["original"], "sp_form": "x"})


CAPTIONS = ["A red apple next to a blue cup.", "Two bananas lying on the grass."]


@pytest.fixture(scope="module")
def tiny_victim() -> TinyVictim:
    torch.manual_seed(0)
    tokenizer = train_tokenizer(CAPTIONS * 30 + ["User:a photo of GPT:"] * 10, 260)
    arch = TinyArch(vocab_size=260, lm_layers=1, input_size=64)
    model = build_model(arch, tokenizer, train_vision_encoder=False, gate_init=1.0)
    return TinyVictim(model, tokenizer, arch, Recipe(epochs=1, batch_size=4, lr=1e-3))


@pytest.mark.parametrize("form", ["a", "b", "c"])
def test_fine_tune_with_the_sp_objective_runs_and_logs_its_form(tiny_victim, form):
    images = np.stack([np.full((224, 224, 3), 40 * (k + 1), dtype=np.uint8) for k in range(2)])
    data = TrainingSet(ImageBank(images), [Example(str(i), i % 2, CAPTIONS[i % 2]) for i in range(8)])
    student = tiny_victim.clone()
    before = {k: v.clone() for k, v in student.model.named_parameters()}
    log = student.fine_tune(data, seed=0, objective=SemanticPreservation(form, 1.0))
    assert log["steps"] == 2 and log["objective"]["settings"]["sp_form"] == form
    steps = log["objective"]["steps"]
    assert len(steps) == 2 and all(0.0 <= s["sp"] <= 2.0 and s["ce"] > 0 for s in steps)
    changed = {k for k, v in student.model.named_parameters() if not torch.equal(v, before[k])}
    assert any(k.startswith("perceiver.") for k in changed) and "lang_encoder.transformer.wte.weight" in changed
    assert not any(k.startswith("vision_encoder.") for k in changed)  # frozen (methods/victim.md §A2)
