"""Encoder-gradient helpers of VL-Trojan and Shadowcast (methods/attacks.md §6, §7) on a tiny victim:
the Victim protocol's encode_normalised, the torch RandomResizedCrop, Shadowcast's PGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench_plugins.attacks._feature_ops import (
    PixelSpace, crop_box, feature_collision, random_resized_crop, require_encoder, unit_pixels,
)

from attack_helpers import one_thread, scenes, tiny_victim  # noqa: F401 (one_thread: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def victim():
    return tiny_victim()


def test_encode_normalised_matches_vision_features_and_has_gradients(victim):
    images = scenes(3)
    pixels = PixelSpace(victim).normalise(unit_pixels(images)).requires_grad_(True)
    pooled, tokens = victim.encode_normalised(pixels, grad=True)
    # resizing normalised 224 px pixels inside equals preprocess's resize-then-normalise
    torch.testing.assert_close(tokens.detach(), victim.vision_features(images), atol=1e-4, rtol=1e-4)
    assert pooled.shape == (3, tokens.shape[-1])
    grad, = torch.autograd.grad(tokens.square().sum(), [pixels])
    assert grad.abs().sum() > 0
    assert not victim.encode_normalised(pixels.detach())[1].requires_grad  # grad off by default


def test_pixel_space_round_trip(victim):
    space = PixelSpace(victim)
    unit = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(space.denormalise(space.normalise(unit)), unit)
    assert space.normalise(torch.zeros(1, 3, 1, 1)).flatten().tolist() == pytest.approx(
        [-m / s for m, s in zip(victim.pixel_mean, victim.pixel_std)])


def test_random_resized_crop_shape_and_box_bounds():
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 224)
    images = (ramp[None, None, :, None] * ramp[None, None, None, :]).repeat(40, 3, 1, 1)
    crops, boxes = random_resized_crop(images, generator)
    assert crops.shape == (40, 3, 224, 224)
    assert len(set(boxes)) > 30  # a fresh box per image
    for (top, left, h, w), crop in zip(boxes, crops):
        assert 0 <= top and top + h <= 224 and 0 <= left and left + w <= 224
        assert 0.8 - 2 / 224 <= h * w / 224 ** 2 <= 1.0  # scale [0.8, 1], up to rounding
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02  # ratio [3/4, 4/3], up to rounding
        # the crop shows its box: its mean is the box's mean (resizing keeps averages)
        assert float(crop.mean()) == pytest.approx(float(images[0, :, top:top + h, left:left + w].mean()), abs=5e-3)


def test_crop_falls_back_to_the_central_box():
    generator = torch.Generator().manual_seed(0)
    # an impossible area (twice the image) fails all 10 tries -> the whole square image
    assert crop_box(224, 224, generator, scale=(2.0, 3.0)) == (0, 0, 224, 224)
    # a wide image whose ratio exceeds 4/3 -> the widest central box of ratio 4/3
    assert crop_box(100, 300, generator, scale=(2.0, 3.0)) == (0, 83, 100, 133)


def test_feature_collision_stays_in_the_ball_and_moves_features_closer(victim):
    bases, targets = scenes(3, seed=1), scenes(3, seed=2)
    result = feature_collision(victim, bases, targets, epsilon=8 / 255, step=0.2 / 255,
                               iterations=16, batch_size=2, generator=torch.Generator().manual_seed(0))
    assert result.poisons.dtype == np.uint8 and result.poisons.shape == bases.shape
    change = np.abs(result.poisons.astype(int) - bases.astype(int))
    assert change.max() <= 8  # ||x_p - x_b||_inf <= 8/255 after uint8 rounding
    assert change.max() >= 7  # the random start alone reaches the edge of the ball
    assert (result.poison_distance < result.base_distance).all()
    summary = result.summary()
    assert summary["n_images"] == 3 and summary["relative_reduction_mean"] > 0


def test_require_encoder_names_the_fix():
    with pytest.raises(VbbError, match="no victim"):
        require_encoder(None, "Shadowcast", "use image_mode = 'clean'")
    with pytest.raises(VbbError, match="encode_normalised") as error:
        require_encoder(object(), "Shadowcast", "use image_mode = 'clean'")
    assert "image_mode" in str(error.value)
