"""RobustIT (plugins/defenses/robustit, methods/defenses.md): each IDR perturbation changes what it
should and only that; AAR's sharpness statistic, momentum and top-γ selection on hand-built
activations; masked channels carry no gradient; the victim's objective hooks; the defense on a
small tiny victim with its measured cost ratio."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import DefenseContext, StageContext
from vlmbackdoor_bench.types import Example, ImageBank, TrainingSet
from vlmbackdoor_bench.victims.flamingo import trainable_state_dict
from vlmbackdoor_bench.victims.training import Recipe
from vlmbackdoor_bench_plugins.defenses.robustit import RobustInstructionTuning
from vlmbackdoor_bench_plugins.defenses.robustit.aar import ChannelMasks, channel_statistic, position_rows, \
    top_fraction
from vlmbackdoor_bench_plugins.defenses.robustit.idr import InputDiversity, color_jitter, jitter_draws, \
    perturb_text, random_resized_box, resized_crop, shift_hue
from vlmbackdoor_bench_plugins.defenses.robustit.objective import RobustObjective
from vlmbackdoor_bench_plugins.defenses.robustit.settings import PAPER, PRESETS, resolve

from attack_helpers import one_thread, scenes, tiny_victim  # noqa: F401  (one_thread is a fixture)

CAPTIONS = ["a red apple.", "a red apple on a table next to a red apple on a table.", "a table.",
            "an apple on a red table."]
ONLY = {"idr_crop_p": 0.0, "idr_flip_p": 0.0, "idr_color_p": 0.0, "idr_text_p": 0.0}


@pytest.fixture(scope="module")
def base():
    return tiny_victim()


def caption_set(n: int = 8) -> TrainingSet:
    return TrainingSet(ImageBank(scenes(4)), [Example(str(i), i % 4, CAPTIONS[i % 4]) for i in range(n)])


# ----------------------------------------------------------------------------- IDR: spatial
def test_a_full_frame_crop_is_the_identity_and_a_partial_one_moves_a_corner_trigger():
    image = scenes(1)[0].copy()
    image[-20:, -20:] = 255  # a BadNet-like white corner patch
    picture = Image.fromarray(image)
    assert np.array_equal(np.asarray(resized_crop(picture, (0, 0, 224, 224))), image)
    cropped = np.asarray(resized_crop(picture, (0, 0, 150, 150)))  # the top-left 150 px: patch cut away
    assert cropped.shape == image.shape and int(cropped[-30:, -30:].min()) < 240
    zoomed = np.asarray(resized_crop(picture, (74, 74, 150, 150)))  # keeps it, enlarged 224/150 times
    white = (zoomed > 250).all(-1)
    assert 25 <= int(white.sum(0).max()) <= 32  # 20 px -> ~30 px on a side
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_box(rng, 224, (0.6, 1.0), (0.75, 4 / 3))
        assert 0 <= top <= 224 - h and 0 <= left <= 224 - w
        assert 0.6 * 224 * 224 * 0.97 <= h * w <= 224 * 224 and 0.74 <= w / h <= 1.35


def test_paper_spatial_idr_cuts_a_corner_trigger_out_of_about_half_the_poisons():
    """The measured cause of RobustIT's clean-caption loss on the tiny profile (methods/defenses.md
    §R2.1): the paper preset's crop removes BadNet's 21 px corner patch entirely from about
    half of the images and keeps it in place in few, so about half of the poisons train "an image
    without a trigger -> the target caption". A change of the spatial defaults shows up here."""
    image = np.zeros((224, 224, 3), np.uint8)
    image[203:, 203:] = 255  # BadNet's patch cell (plugins/attacks/badnet.py: rows/cols 203-223)
    idr = InputDiversity({**PAPER, "idr_color_p": 0.0, "idr_text_p": 0.0}, seed=0)
    outs = idr.images(np.stack([image] * 400))
    bright = outs[..., 0] > 128
    gone = float((~bright.any((1, 2))).mean())
    in_place = float(np.mean([max(b[203:, 203:].mean(), b[203:, :21].mean()) > 0.9 for b in bright]))
    assert 0.4 < gone < 0.6 and in_place < 0.15, (gone, in_place)
    plain = InputDiversity({**PAPER, **ONLY}, seed=0).images(np.stack([image] * 4))
    assert np.array_equal(plain, np.stack([image] * 4))  # without IDR every poison keeps its trigger


def test_flip_only_mirrors_and_keeps_every_pixel_value():
    image = scenes(1)[0]
    idr = InputDiversity({**PAPER, **ONLY, "idr_flip_p": 1.0}, seed=0)
    out = idr.images(image[None])[0]
    assert np.array_equal(out, image[:, ::-1]) and idr.counts == {"flip": 1}


def test_colour_jitter_changes_colours_and_never_geometry():
    image = np.zeros((64, 64, 3), np.uint8)  # the perturbations work at any square size
    image[:, :32] = (200, 40, 40)
    image[:, 32:] = (30, 90, 160)
    idr = InputDiversity({**PAPER, **ONLY, "idr_color_p": 1.0}, seed=3)
    for out in idr.images(np.stack([image] * 5)):
        left, right = out[:, :32].reshape(-1, 3), out[:, 32:].reshape(-1, 3)
        assert (left == left[0]).all() and (right == right[0]).all()  # no spatial mixing
        assert not np.array_equal(out, image)
    assert idr.counts == {"color": 5}


def test_hue_keeps_value_and_greys_and_rotates_primaries():
    pixels = np.array([[[255, 0, 0], [102, 102, 102]]], np.uint8)  # a red and a grey pixel
    out = np.asarray(shift_hue(Image.fromarray(pixels), 1 / 3)).astype(int)
    assert np.abs(out[0, 0] - [0, 255, 0]).max() <= 2  # red -> green
    assert np.array_equal(out[0, 1], [102, 102, 102])
    image = Image.fromarray(scenes(1)[0])
    turned = np.asarray(shift_hue(image, 0.25)).astype(int)
    assert np.abs(turned.max(-1) - np.asarray(image).astype(int).max(-1)).max() <= 1  # HSV value kept
    assert np.abs(np.asarray(shift_hue(image, 0.0)).astype(int) - np.asarray(image)).max() <= 2


def test_colour_jitter_with_neutral_factors_changes_nothing_and_each_factor_its_own_property():
    image = Image.fromarray(scenes(1)[0])
    x = np.asarray(image).astype(int)
    zero = {"idr_brightness": 0.0, "idr_contrast": 0.0, "idr_saturation": 0.0, "idr_hue": 0.0}
    factors, order = jitter_draws(np.random.default_rng(0), zero)
    assert factors.tolist() == [1.0, 1.0, 1.0, 0.0] and sorted(order) == [0, 1, 2, 3]
    assert np.array_equal(np.asarray(color_jitter(image, factors, [0, 1, 2])), x)
    darker = np.asarray(color_jitter(image, np.array([0.5, 1.0, 1.0, 0.0]), [0])).astype(int)
    assert np.abs(darker - x * 0.5).max() <= 1  # brightness alone scales every value
    grey = np.asarray(color_jitter(image, np.array([1.0, 1.0, 0.0, 0.0]), [2])).astype(int)
    assert np.abs(grey - grey[..., :1]).max() <= 1  # saturation 0: every pixel grey


# ----------------------------------------------------------------------------- IDR: text
def test_each_text_operation_touches_the_instruction_as_specified():
    seen = {}
    for seed in range(60):
        text, op = perturb_text("a photo of a dog", np.random.default_rng(seed), {"idr_word_drop_p": 0.5})
        seen.setdefault(op, set()).add(text)
    words = "a photo of a dog".split()
    for text in seen["drop"]:  # a non-empty subsequence, in order
        kept, it = text.split(), iter(words)
        assert kept and all(w in it for w in kept)
    for text in seen["swap"]:  # exactly one adjacent pair swapped
        got = text.split()
        diff = [i for i, (a, b) in enumerate(zip(got, words)) if a != b]
        assert len(got) == 5 and sorted(got) == sorted(words)
        assert diff == [] or (len(diff) == 2 and diff[1] == diff[0] + 1)
    assert seen["phrase"] == {"an image of a dog", "a picture of a dog", "a photograph of a dog"}
    text, op = perturb_text("zbw a photo of", np.random.default_rng(0), {"idr_word_drop_p": 0.1})
    assert op != "phrase" or text == "zbw a photo of"  # no known prefix: unchanged
    dropped = perturb_text("one", np.random.default_rng(1), {"idr_word_drop_p": 1.0})
    assert dropped[0] == "one" or dropped[1] != "drop"  # at least one word always kept


def test_a_batch_gets_fresh_draws_per_sample_and_only_text_idr_leaves_images_alone():
    examples = caption_set(4).examples
    images = np.stack([scenes(1)[0]] * 4)
    idr = InputDiversity({**PAPER, **ONLY, "idr_text_p": 1.0}, seed=0)
    out, instructions = idr.batch(examples, images)
    assert np.array_equal(out, images) and len(instructions) == 4
    idr = InputDiversity(PAPER, seed=0)
    out, _ = idr.batch(examples, images)  # the same image four times: four different draws
    assert len({o.tobytes() for o in out}) == 4 and idr.counts["samples"] == 4


# ----------------------------------------------------------------------------- AAR
def hand_built() -> tuple[torch.Tensor, torch.Tensor]:
    """(B=2, T=3, C=4) activations; position (1, 2) is padding. Channel 2 has one spike at a real
    position, channel 0 one at the padding position only, channels 1 and 3 are flat-ish."""
    h = torch.ones(2, 3, 4)
    h[..., 1] = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    h[0, 1, 2] = 10.0
    h[1, 2, 0] = 50.0
    h[..., 3] = -2.0  # |h| is used: a constant negative channel is flat
    positions = torch.tensor([[True, True, True], [True, True, False]])
    return h, positions


def test_sharpness_is_the_peak_to_mean_of_real_positions():
    h, positions = hand_built()
    rows = position_rows(h, positions)
    assert rows.shape == (5, 4)
    s = channel_statistic(rows.amax(0), rows.sum(0), rows.shape[0], "peak-to-mean")
    expected = torch.tensor([1.0, 3.0 / (9.0 / 5.0), 10.0 / (14.0 / 5.0), 1.0]) / (1 + 1e-6 * torch.tensor(
        [1.0, 5.0 / 9.0, 5.0 / 14.0, 0.5]))
    assert torch.allclose(s, expected, rtol=1e-5)
    assert top_fraction(s, 0.25).tolist() == [True, True, False, True]  # ⌈0.25·4⌉ = 1: channel 2
    assert top_fraction(s, 0.5).tolist() == [True, False, False, True]  # then channel 1
    everything = position_rows(h, None)  # without positions the padding spike counts
    s_all = channel_statistic(everything.amax(0), everything.sum(0), 6, "peak-to-mean")
    assert int(torch.argmax(s_all)) == 0
    z = channel_statistic(rows.amax(0), rows.sum(0), 5, "max-zscore")
    assert int(torch.argmax(z)) == 2 and abs(float(z.mean())) < 1e-6


def test_momentum_and_per_step_reselection():
    h, positions = hand_built()
    later = h.clone()
    later[0, 0, 2], later[0, 1, 2] = 1.0, 1.0  # step 2: channel 2 flat, channel 1 the sharpest
    for beta, second_masked in ((0.9, 2), (0.0, 1)):
        masks = ChannelMasks({**PAPER, "aar_gamma": 0.25, "aar_beta": beta}, steps_per_epoch=10)
        layer = torch.nn.Identity()
        assert torch.equal(masks.apply("l", layer, h, positions), h)  # step 0 is unmasked
        masks.end_step()
        first = masks.sharpness["l"].clone()
        assert masks.keep["l"].tolist() == [True, True, False, True]
        masked = masks.apply("l", layer, later, positions)
        assert torch.equal(masked[..., 2], torch.zeros(2, 3)) and torch.equal(masked[..., :2], later[..., :2])
        masks.end_step()
        rows = position_rows(later, positions)
        s2 = channel_statistic(rows.amax(0), rows.sum(0), 5, "peak-to-mean")
        assert torch.allclose(masks.sharpness["l"], beta * first + (1 - beta) * s2)
        assert int((~masks.keep["l"]).nonzero()) == second_masked


def test_static_masks_freeze_after_the_first_epoch():
    h, positions = hand_built()
    later = h.clone()
    later[0, 0, 2], later[0, 1, 2] = 1.0, 1.0
    masks = ChannelMasks({**PAPER, "aar_gamma": 0.25, "aar_beta": 0.0, "aar_dynamic": False}, steps_per_epoch=1)
    masks.apply("l", torch.nn.Identity(), h, positions)
    masks.end_step()
    masks.apply("l", torch.nn.Identity(), later, positions)
    masks.end_step()  # β = 0 would move the mask to channel 1, but it is frozen on channel 2
    assert masks.keep["l"].tolist() == [True, True, False, True]


def test_masked_channels_carry_no_gradient_and_the_final_mask_is_written_into_the_weights():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 8)
    masks = ChannelMasks({**PAPER, "aar_gamma": 0.25}, steps_per_epoch=10)
    x = torch.randn(3, 5, 6)
    x[0, 0] *= 30.0  # one sharp position
    masks.apply("l", layer, layer(x), None)
    masks.end_step()
    dropped = ~masks.keep["l"]
    assert int(dropped.sum()) == 2
    out = masks.apply("l", layer, layer(x), None)
    out.pow(2).sum().backward()
    assert torch.all(layer.weight.grad[dropped] == 0) and torch.all(layer.bias.grad[dropped] == 0)
    assert torch.all(layer.weight.grad[~dropped].abs().sum(1) > 0)
    assert float(masks.penalty().detach()) == pytest.approx(float(layer.weight[dropped].abs().sum().detach()))
    assert masks.write_into_weights() == {"l": 2}
    assert torch.all(layer(x)[..., dropped] == 0)


# ----------------------------------------------------------------------------- the victim's hooks
def fine_tune(base, data, objective, epochs: int = 1):
    victim = base.clone()
    recipe = Recipe(epochs=epochs, batch_size=len(data.examples), lr=1e-3, lm_dropout=False)
    return victim, victim.fine_tune(data, seed=0, recipe=recipe, objective=objective)


class Recorder:
    """The plain loss through the objective; records what the victim's hooks were given."""

    name, settings = "recorder", {}

    def __init__(self, identity_inputs: bool = False):
        self.calls: list[tuple] = []
        if identity_inputs:
            self.batch_inputs = lambda examples, images: (images, [e.instruction for e in examples])

    def adapter_output(self, name, module, output, positions):
        self.calls.append((name, tuple(output.shape), None if positions is None else positions.clone()))
        return output

    def loss(self, step):
        return step.caption_loss


def test_the_victims_adapter_hooks_see_every_adapter_linear_with_text_positions(base, one_thread):
    data = caption_set(4)
    recorder = Recorder()
    fine_tune(base, data, recorder)
    names = {name for name, _, _ in recorder.calls}
    linears = {n for n, m in base.adapter_linears().items()}
    assert names == linears and any(n.startswith("perceiver.") for n in names)
    for name, shape, positions in recorder.calls:
        over_text = name.startswith("lang_encoder.") and not name.endswith("attn.to_kv")
        assert (positions is not None) == over_text
        if over_text:
            assert positions.shape == shape[:2] and not positions.all()  # right padding excluded
    hooked = [h for m in base.model.modules() for h in m._forward_hooks.values()]
    assert not hooked  # removed after the fine-tuning (the base's modules never had any)


def test_identity_batch_inputs_train_like_the_token_bank(base, one_thread):
    data = caption_set(4)
    plain, plain_log = fine_tune(base, data, None)
    fresh, fresh_log = fine_tune(base, data, Recorder(identity_inputs=True))
    assert "input_seconds" in fresh_log and "input_seconds" not in plain_log
    for key, value in trainable_state_dict(plain.model).items():
        torch.testing.assert_close(trainable_state_dict(fresh.model)[key], value, rtol=1e-4, atol=1e-5)


def test_aar_through_the_victim_leaves_the_masked_rows_without_gradient(base, one_thread):
    data = caption_set(4)
    objective = RobustObjective({**PAPER, "idr": False, "aar_gamma": 0.25}, seed=0, steps_per_epoch=1)
    used: dict = {}
    end_step = objective.masks.end_step

    def remember_then_end():  # the mask of the step that just ran
        used.update({k: v.clone() for k, v in objective.masks.keep.items()})
        return end_step()

    objective.masks.end_step = remember_then_end
    victim, log = fine_tune(base, data, objective, epochs=2)
    modules = victim.adapter_linears()
    assert set(used) == set(modules)
    for name, keep in used.items():
        grad = modules[name].weight.grad
        assert torch.all(grad[~keep] == 0), name
        assert int((~keep).sum()) == math.ceil(0.25 * keep.numel())
    assert len(log["objective"]["steps"]) == 2


# ----------------------------------------------------------------------------- the defense
def context(base, tmp_path: Path) -> DefenseContext:
    recipe = Recipe(epochs=2, batch_size=4, lr=1e-3, lm_dropout=False)
    return DefenseContext(backdoored=base.clone(), training_set=caption_set(8), clean_reserved=None,
                          base_victim=base, scorers=None, seed=0, budget={}, workdir=tmp_path,
                          stage=StageContext(cache_dir=tmp_path, config=None), recipe=recipe)


def test_robustit_defends_with_a_measured_cost_ratio(base, tmp_path, one_thread):
    outcome = RobustInstructionTuning().defend(context(base, tmp_path), {**PAPER, "cost_reference_steps": 2})
    details = outcome.report.details
    cost = details["cost"]
    assert cost["plain"]["steps"] == 2 and cost["plain"]["seconds_per_step"] > 0
    assert cost["ratio"] == pytest.approx(cost["seconds_per_step"] / cost["plain"]["seconds_per_step"])
    assert 1.0 < cost["ratio"] < 50.0  # IDR perturbs and re-encodes every step's images
    assert cost["idr_seconds_per_step"] > 0 and cost["encoding_seconds_per_step"] > 0
    assert cost["ratio_uncached"] == pytest.approx(cost["seconds_per_step"] / (
        cost["plain"]["seconds_per_step"] + cost["encoding_seconds_per_step"]))
    assert cost["ratio_uncached"] < cost["ratio"]
    print(f"\nRobustIT cost ratio on the small tiny victim: {cost['ratio']:.2f} "
          f"({cost['ratio_uncached']:.2f} against a loop that encodes every step)")
    assert details["steps"] == 4 and details["idr_counts"]["samples"] == 16
    masked = details["aar"]["masked_channels"]
    delivered = outcome.victim.adapter_linears()
    assert set(masked) == set(delivered)
    for name, count in masked.items():
        rows = delivered[name].weight.abs().sum(1) == 0
        assert int(rows.sum()) == count == math.ceil(0.1 * len(rows))
    assert outcome.victim is not base and not outcome.report.removed_sample_ids


def test_presets_and_bad_parameters():
    assert not PRESETS["idr-only"]["aar"] and not PRESETS["aar-only"]["idr"] and PRESETS["beta-0"]["aar_beta"] == 0
    assert resolve({}) == PAPER
    for bad in ({"aar_gamma": 1.5}, {"idr_crop_scale": [0.9, 0.5]}, {"aar_statistic": "kurtosis"},
                {"idr": False, "aar": False}, {"lora": True}):
        with pytest.raises(VbbError):
            resolve(bad)
    objective = RobustObjective(PRESETS["idr-only"], seed=0, steps_per_epoch=1)
    assert hasattr(objective, "batch_inputs") and not hasattr(objective, "adapter_output")


def test_the_two_ablations_are_defenses_of_their_own_beside_robustit_in_table_2():
    """methods/defenses.md §R6: idr-only and aar-only as cells of one store (cells are keyed by
    defense name), columns after RobustIT's in Table 2, each with only its own preset."""
    from vlmbackdoor_bench.registry import load_registry
    registry = load_registry()
    main = registry.defense("robustit")
    idr, aar = registry.defense("robustit_idr"), registry.defense("robustit_aar")
    assert (idr.default_preset, aar.default_preset) == ("idr-only", "aar-only")
    assert list(idr.presets) == ["idr-only"] and list(aar.presets) == ["aar-only"]
    assert resolve(idr.presets["idr-only"])["aar"] is False and resolve(idr.presets["idr-only"])["idr"] is True
    assert resolve(aar.presets["aar-only"])["idr"] is False and resolve(aar.presets["aar-only"])["aar"] is True
    assert main.paper_tables[2] < idr.paper_tables[2] < aar.paper_tables[2]
    assert main.presets["paper"]["aar"] and main.presets["paper"]["idr"]  # RobustIT itself untouched
