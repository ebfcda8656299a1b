"""ABL (methods/defenses.md §2): flooding loss and its gradient, isolation, phases, stop rule, a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import DefenseContext, StageContext, TrainingStep
from vlmbackdoor_bench.metrics.captioning import java_available
from vlmbackdoor_bench.types import Example, ImageBank, TrainingSet
from vlmbackdoor_bench.victims.training import Recipe
from vlmbackdoor_bench_plugins.defenses.abl import (
    DEFAULTS, AntiBackdoorLearning, FloodingObjective, GradientAscentObjective, flooding,
    held_out_images, lowest_loss_positions, phase_epochs, should_stop,
)


def step_with(token_losses: torch.Tensor, mask: torch.Tensor) -> TrainingStep:
    return TrainingStep(examples=[], logits=None, targets=None, caption_mask=mask,
                        token_losses=token_losses * mask, hidden_states=None, token_embeddings=None,
                        vision_tokens=None, index=0, logits_of=lambda *a, **k: None)


def test_flooding_value_and_gradient_sign():
    loss = torch.tensor([0.2, 0.5, 1.3], requires_grad=True)
    value = flooding(loss, 0.5)
    assert torch.allclose(value, torch.tensor([0.8, 0.5, 1.3]))  # |ℓ − γ| + γ
    value.sum().backward()
    # below γ the gradient is flipped (ascent), above it is the plain loss gradient
    assert loss.grad[0].item() == -1.0 and loss.grad[2].item() == 1.0


def test_flooding_objective_floods_the_batch_mean_not_each_instance():
    losses = torch.tensor([[0.1, 0.1, 0.0], [1.0, 1.0, 1.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    batch_mean = FloodingObjective(0.5).loss(step_with(losses, mask))  # mean (0.2 + 3) / 5 = 0.64
    assert batch_mean.item() == pytest.approx(0.64)
    batch_mean.backward()
    assert (losses.grad[mask] > 0).all()  # batch mean above γ: every token descends
    losses.grad = None
    per_sample = FloodingObjective(0.5, per_sample=True).loss(step_with(losses, mask))
    assert per_sample.item() == pytest.approx(((0.5 - 0.1 + 0.5) + 1.0) / 2)
    per_sample.backward()
    assert (losses.grad[0, :2] < 0).all() and (losses.grad[1] > 0).all()  # the fitted one ascends


def test_gradient_ascent_objective_is_the_negative_caption_loss():
    losses = torch.tensor([[2.0, 4.0]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    value = GradientAscentObjective().loss(step_with(losses, mask))
    assert value.item() == -3.0
    value.backward()
    assert (losses.grad < 0).all()


def test_isolation_picks_the_lowest_losses():
    losses = np.array([3.0, 0.4, 2.2, 0.1, 5.0, 0.4, 1.0, 2.0, 0.9, 4.0])
    assert sorted(lowest_loss_positions(losses, 0.2)) == [1, 3]  # ⌈0.2·10⌉ = 2 lowest
    assert sorted(lowest_loss_positions(losses, 0.01)) == [3]  # at least one
    assert len(lowest_loss_positions(np.arange(25015.0), 0.01)) == 251  # ⌈250.15⌉ on COCO-5k
    with pytest.raises(VbbError):
        lowest_loss_positions(losses, 1.5)


def test_phases_split_the_schedule_20_80():
    assert phase_epochs(20, 0.2) == (4, 16)  # methods/defenses.md §2: 4 of 20 epochs
    assert phase_epochs(2, 0.2) == (1, 1) and phase_epochs(3, 0.2) == (1, 2)
    with pytest.raises(VbbError):
        phase_epochs(20, 0.0)


def test_stop_rule():
    assert should_stop(10.5, 80.0, 80.0, DEFAULTS).startswith("mean isolated NLL")
    assert should_stop(3.0, 63.9, 80.0, DEFAULTS).startswith("held-out CIDEr")  # −20.1 %
    assert should_stop(3.0, 64.1, 80.0, DEFAULTS) is None


def test_held_out_images_take_whole_images_of_the_clean_part():
    examples = [Example(str(i), i // 5, f"c{i}") for i in range(50)]
    data = TrainingSet(ImageBank(np.zeros((10, 2, 2, 3), np.uint8)), examples)
    refs = held_out_images(data, np.arange(5, 50), 12, seed=0)
    assert 0 not in refs and sum(len(v) for v in refs.values()) == 15  # 3 images of 5 captions
    for image, captions in refs.items():
        assert captions == [f"c{5 * image + k}" for k in range(5)]


class ScriptedVictim:
    """A victim whose training effects are scripted, to test ABL's orchestration exactly: the
    isolation run makes the poisons fit (ℓ = 0.1), each ascent pass adds 4 nats to what it sees."""

    def __init__(self, nll: dict[str, float], calls: list | None = None):
        self.nll, self.calls = nll, calls if calls is not None else []
        self.recipe = Recipe(epochs=10, batch_size=8, lr=1e-3)

    def clone(self) -> "ScriptedVictim":
        return ScriptedVictim(dict(self.nll), self.calls)

    def caption_nll(self, images, captions, instructions=None):
        return np.array([self.nll[c] for c in captions])

    def generate(self, images, instruction="a photo of"):
        return ["a red apple next to a blue cup"] * len(images)

    def fine_tune(self, training_set, *, seed, objective=None, recipe=None, progress=""):
        self.calls.append((getattr(objective, "name", None), len(training_set), recipe.epochs, recipe.lr))
        for e in training_set.examples:
            if isinstance(objective, FloodingObjective) and e.caption.startswith("banana"):
                self.nll[e.caption] = 0.1
            elif isinstance(objective, GradientAscentObjective):
                self.nll[e.caption] += 4.0
        return {}


@pytest.mark.skipif(not java_available(), reason="CIDEr's PTB tokenizer needs java")
def test_abl_runs_its_four_phases_and_stops_unlearning_by_the_nll_rule(tmp_path: Path):
    examples = [Example(f"c{i}", i // 5, f"a red apple next to a blue cup {i}") for i in range(90)]
    examples += [Example(f"p{i}", 18 + i, f"banana {i}") for i in range(10)]  # 10 % poison
    data = TrainingSet(ImageBank(np.zeros((28, 4, 4, 3), np.uint8)), examples)
    nll = {e.caption: 1.0 + (k % 7) / 10 for k, e in enumerate(examples)}
    base = ScriptedVictim(dict(nll))
    context = DefenseContext(backdoored=base.clone(), training_set=data, clean_reserved=None,
                             base_victim=base, scorers=None, seed=0, budget={}, workdir=tmp_path,
                             stage=StageContext(cache_dir=tmp_path, config=None))
    outcome = AntiBackdoorLearning().defend(context, {"isolation_ratio": 0.05, "cider_instances": 20})
    report = outcome.report
    # isolated: the 5 lowest ℓ after isolation, all poisons (precision 100 %, recall 50 %)
    assert sorted(report.removed_sample_ids) == sorted(f"p{i}" for i in range(5))
    assert report.details["epochs"] == {"isolation": 2, "continuation": 8, "recipe": 10}
    # isolation on all 100 with flooding, continuation on the other 95, then ascent at 0.1 lr
    assert base.calls[:2] == [("abl-flooding", 100, 2, 1e-3), (None, 95, 8, 1e-3)]
    assert base.calls[2:] == [("abl-unlearning", 5, 1, pytest.approx(1e-4))] * 3
    unlearning = report.details["unlearning"]
    assert unlearning["isolated_nll_start"] == pytest.approx(0.1)
    assert [p["isolated_nll"] for p in unlearning["passes"]] == pytest.approx([4.1, 8.1, 12.1])
    assert unlearning["stopped"].startswith("mean isolated NLL")  # 12.1 > 10 after pass 3
    clean_positions = [k for k, e in enumerate(examples) if e.sample_id not in report.removed_sample_ids]
    assert unlearning["n_cider_images"] == len(held_out_images(data, np.array(clean_positions), 20, 0))
    assert unlearning["cider_start"] > 0
    assert base.nll == nll  # the base victim's state is untouched (ABL used a clone)
    losses = json.loads((tmp_path / "isolation_losses.json").read_text())
    assert losses["p0"] == 0.1 and len(losses) == 100
