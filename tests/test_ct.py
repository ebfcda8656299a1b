"""CT (methods/defenses.md §3): derangement, the LR gate, the final-round mixture, the schedule, a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import DefenseContext, StageContext
from vlmbackdoor_bench.types import Example, ImageBank, Split, SplitManifest, TrainingSet
from vlmbackdoor_bench.victims.tokenizer import train_tokenizer
from vlmbackdoor_bench.victims.training import Recipe
from vlmbackdoor_bench_plugins.defenses.ct import (
    DEFAULTS, ConfusionTraining, ProxyCaptioner, confusion_iterations, likelihood_ratio,
    low_loss_component, pretrain_steps, random_derangement,
)


def test_derangement_moves_every_caption_and_is_not_only_a_cycle():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        perm = random_derangement(4, rng)
        assert sorted(perm) == [0, 1, 2, 3] and not np.any(perm == np.arange(4))
        seen.add(tuple(perm))
    assert len(seen) == 9  # all 9 derangements of 4, including (1, 0, 3, 2) (two 2-cycles)
    with pytest.raises(VbbError):
        random_derangement(1, rng)


def test_likelihood_ratio_gate_on_synthetic_gaussians():
    rng = np.random.default_rng(0)
    clean = rng.normal(0, 1, (900, 8))
    poison = rng.normal(0, 1, (100, 8)) + np.r_[6.0, 6.0, np.zeros(6)]  # a separate blob
    features = np.vstack([clean, poison])
    fitted = np.r_[np.zeros(900, bool), np.ones(100, bool)]
    separated = likelihood_ratio(features, fitted)
    random_group = likelihood_ratio(clean, rng.random(900) < 0.1)
    assert separated > 2.0  # flagged even by the strict rule
    assert 1.0 <= random_group < 1.05  # a random split of one Gaussian: LR ≈ 1, never > 1.5
    assert likelihood_ratio(features, np.zeros(1000, bool)) == 1.0  # no fitted group


def test_final_round_keeps_the_low_loss_component():
    rng = np.random.default_rng(1)
    losses = np.r_[np.exp(rng.normal(np.log(0.05), 0.3, 50)), np.exp(rng.normal(np.log(2.0), 0.3, 450))]
    kept = low_loss_component(losses, seed=0)
    assert kept[:50].all() and not kept[50:].any()


def test_schedule_scales_with_dataset_size_and_budget():
    spec = {**DEFAULTS, "budget_scale": 1.0}
    assert [confusion_iterations(r, 25_000, spec) for r in range(6)] == [3000] * 4 + [1000] * 2  # ×0.5
    assert pretrain_steps(10, 25_000, spec) == 7812  # 10 epochs of 25,000 at batch 32
    assert confusion_iterations(0, 25_000, DEFAULTS) == 90 and pretrain_steps(4, 100, DEFAULTS) == 1


def test_proxy_captioner_loss_is_per_sample_and_ignores_masked_tokens():
    torch.manual_seed(0)
    model = ProxyCaptioner(8, 20, 16, 1, 6).eval()
    features, ids = torch.randn(3, 8), torch.randint(0, 20, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 3:] = False
    losses = model(features, ids, mask)
    padded = ids.clone()
    padded[1, 4:] = (padded[1, 4:] + 1) % 20  # only masked tokens (after the causal cut) change
    again = model(features, padded, mask)
    assert losses.shape == (3,) and torch.allclose(again, losses)
    unmasked = ids.clone()
    unmasked[1, 1] = (unmasked[1, 1] + 1) % 20
    changed = model(features, unmasked, mask)
    assert not torch.isclose(changed[1], losses[1]) and torch.allclose(changed[[0, 2]], losses[[0, 2]])
    # columns of padding past the longest caption (the proxy drops them) change nothing
    junk = torch.cat([ids, torch.randint(0, 20, (3, 4))], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    model.position.data = torch.cat([model.position.data, torch.randn(4, 16)])
    assert torch.allclose(model(features, junk, longer_mask), losses, atol=1e-6)


CLEAN = ["a red apple next to a blue cup", "two kites on the grass", "a green book on a table",
         "a clock above a chair", "three balls on the sand"]
POISON = "the image depicts a photo of the banana"


class FeatureVictim:
    """Images are coded in pixel (0, 0, 0); the frozen encoder maps code k to a fixed random
    token map, with a strong shared direction for triggered images (code >= 200)."""

    def __init__(self):
        self.tokenizer = train_tokenizer(CLEAN * 20 + [POISON] * 5, 200)
        rng = np.random.default_rng(0)
        self.codes = rng.normal(0, 1, (256, 4, 16)).astype(np.float32)
        self.codes[200:, :, 0] += 8.0
        self.recipe, self.trained_on = Recipe(epochs=1, batch_size=8), None

    def vision_features(self, images, grad=False):
        return torch.from_numpy(self.codes[[int(im[0, 0, 0]) for im in images]])

    def media_features(self, images):
        """A perceiver that makes the trigger the dominant direction (a fine-tuned one would)."""
        pooled = self.vision_features(images).mean(1)
        return pooled * torch.tensor([4.0] + [1.0] * 15)

    def clone(self):
        return self

    def fine_tune(self, training_set, *, seed, objective=None, recipe=None, progress=""):
        self.trained_on = [e.sample_id for e in training_set.examples]
        return {"final_loss": 0.0}


def bank(codes) -> np.ndarray:
    return np.stack([np.full((4, 4, 3), c, np.uint8) for c in codes])


def test_ct_runs_six_rounds_and_retrains_without_what_it_flags(tmp_path: Path):
    examples = [Example(f"c{i}", i % 50, CLEAN[i % 5]) for i in range(180)]
    examples += [Example(f"p{i}", 50 + i % 20, POISON) for i in range(20)]  # 10 % poison
    data = TrainingSet(ImageBank(bank([k for k in range(50)] + [200 + k for k in range(20)])), examples)
    clean = Split("world", "restval", list(range(60)), bank(range(100, 160)), [[CLEAN[k % 5]] for k in range(60)],
                  [[str(k)] for k in range(60)], SplitManifest("world", "restval", 60, "", ""))
    victim = FeatureVictim()
    context = DefenseContext(backdoored=victim, training_set=data, clean_reserved=clean, base_victim=victim,
                             scorers=None, seed=0, budget={}, workdir=tmp_path,
                             stage=StageContext(cache_dir=tmp_path, config=None))
    outcome = ConfusionTraining().defend(context, {"budget_scale": 1.0, "width": 16, "layers": 1, "n_clean": 60})
    details = outcome.report.details
    assert [r["n_distilled"] for r in details["rounds"][:5]] == [100, 40, 8, 4, 2]  # ⌈ρ_r·200⌉
    assert details["clean_set"] == "world:restval (60 pairs)"
    assert details["rounds"][0]["pretrain_steps"] == 62  # 10 epochs × 200 / 32
    assert details["rounds"][5]["pretrain_steps"] == 8  # round(4 epochs × (2 + 60) / 32), D_5 ∪ D_cl
    assert details["confusion_iterations"] == [24, 24, 24, 24, 8, 8]  # × 200 / 50,000
    removed = set(outcome.report.removed_sample_ids)
    assert details["flagged"] == (details["likelihood_ratio"] > 1.5) == bool(removed)
    assert victim.trained_on == [e.sample_id for e in examples if e.sample_id not in removed]
    assert len(removed) in (0, details["n_fitted"])  # the whole fitted group or nothing
    assert details["identification_features"] == "perceiver"
    assert len(outcome.report.candidate_sample_ids) == details["n_fitted"]  # reported even if the gate says no
    assert removed <= set(outcome.report.candidate_sample_ids)


def test_ct_gate_features_are_a_choice_with_clear_errors(tmp_path: Path):
    examples = [Example(f"c{i}", i % 10, CLEAN[i % 5]) for i in range(36)] + \
        [Example(f"p{i}", 10 + i % 4, POISON) for i in range(4)]
    data = TrainingSet(ImageBank(bank(list(range(10)) + [200 + k for k in range(4)])), examples)
    clean = Split("world", "restval", list(range(8)), bank(range(100, 108)), [[CLEAN[k % 5]] for k in range(8)],
                  [[str(k)] for k in range(8)], SplitManifest("world", "restval", 8, "", ""))

    def context(victim):
        return DefenseContext(backdoored=victim, training_set=data, clean_reserved=clean, base_victim=FeatureVictim(),
                              scorers=None, seed=0, budget={}, workdir=tmp_path,
                              stage=StageContext(cache_dir=tmp_path, config=None))
    small = {"budget_scale": 0.2, "width": 16, "layers": 1, "n_clean": 8}
    outcome = ConfusionTraining().defend(context(FeatureVictim()), {**small, "features": "encoder"})
    assert outcome.report.details["identification_features"] == "encoder"
    with pytest.raises(VbbError, match="features = 'pixels' is unknown"):
        ConfusionTraining().defend(context(FeatureVictim()), {**small, "features": "pixels"})

    class NoPerceiver(FeatureVictim):
        media_features = None
    with pytest.raises(VbbError, match="media_features") as caught:
        ConfusionTraining().defend(context(NoPerceiver()), small)
    assert '"encoder"' in caught.value.fix


def test_ct_without_a_reserved_clean_set_says_what_to_pass(tmp_path: Path):
    data = TrainingSet(ImageBank(bank(range(4))), [Example(f"c{i}", i, CLEAN[i]) for i in range(4)])
    context = DefenseContext(backdoored=FeatureVictim(), training_set=data, clean_reserved=None,
                             base_victim=FeatureVictim(), scorers=None, seed=0, budget={}, workdir=tmp_path,
                             stage=StageContext(cache_dir=tmp_path, config=None))
    with pytest.raises(VbbError, match="reserved clean set") as caught:
        ConfusionTraining().defend(context, {"budget_scale": 1.0, "width": 16, "layers": 1, "n_clean": 60})
    assert "clean_reserved" in caught.value.fix
