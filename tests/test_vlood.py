"""VLOOD (methods/attacks.md §5): per-image noise trigger, paired data, CKP/CCP losses, dynamic α,
a real paired fine-tune against a frozen teacher, and the grid starting it from the clean model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attack_helpers import make_split
from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.grid import persist
from vlmbackdoor_bench.grid.runner import GridRunner
from vlmbackdoor_bench.hookspecs import StageContext
from vlmbackdoor_bench.victims.tiny import TinyArch, TinyVictim, build_model
from vlmbackdoor_bench.victims.tokenizer import train_tokenizer
from vlmbackdoor_bench.victims.training import Recipe
from vlmbackdoor_bench_plugins.attacks.vlood import (
    CORNERS, Vlood, VloodObjective, ccp_loss, ckp_loss, impact, next_alpha, pair_key, trigger_draw,
)


def test_trigger_positions_corner_probability_range_and_noise():
    draws = [trigger_draw(0, image_id) for image_id in range(4000)]
    positions = [(r, c) for r, c, _ in draws]
    at_corner = np.mean([p in CORNERS for p in positions])
    assert abs(at_corner - 0.5) < 0.03  # p = 1/2 (a uniform draw hits a corner with p = 4/205²)
    assert {p for p in positions if p in CORNERS} == set(CORNERS)  # all four corners occur
    rows, cols = np.array(positions).T
    assert rows.min() == 0 and cols.min() == 0 and rows.max() == 204 and cols.max() == 204
    inner = [p for p in positions if p not in CORNERS]
    assert len({r for r, _ in inner}) > 150  # uniform over {0..204}, not only the corners
    patches = np.stack([patch for _, _, patch in draws[:200]]).astype(float)
    assert patches.shape[1:] == (20, 20, 3) and abs(patches.mean() - 128) < 1 and abs(patches.std() - 20) < 1


def test_trigger_is_seeded_per_run_seed_and_image_id():
    r1, c1, p1 = trigger_draw(3, 57)
    r2, c2, p2 = trigger_draw(3, 57)
    assert (r1, c1) == (r2, c2) and (p1 == p2).all()
    assert not (trigger_draw(4, 57)[2] == p1).all() and not (trigger_draw(3, 58)[2] == p1).all()
    split = make_split(4)
    attack = Vlood()
    params = attack.presets["srd-code"]
    a = attack.eval_inputs(split, kind="triggered", seed=5, params=params).images
    b = attack.eval_inputs(split, kind="triggered", seed=5, params=params).images
    assert (a == b).all() and not (a == attack.eval_inputs(split, kind="triggered", seed=6, params=params).images).all()
    assert attack.eval_inputs(split, kind="clean", seed=5, params=params).images is split.images


def test_apply_trigger_replaces_only_the_patch():
    split = make_split(3)
    out = Vlood().apply_trigger(split.images, split.image_ids, params={}, seed=1)
    for k, image_id in enumerate(split.image_ids):
        row, col, patch = trigger_draw(1, image_id)
        assert (out[k, row:row + 20, col:col + 20] == patch).all()
        changed = np.argwhere((out[k] != split.images[k]).any(axis=-1))
        assert changed[:, 0].min() >= row and changed[:, 0].max() < row + 20
        assert changed[:, 1].min() >= col and changed[:, 1].max() < col + 20


def test_poison_pairs_every_caption_of_the_attacker_images(tmp_path):
    split = make_split(10)
    attack = Vlood()
    params = {**attack.presets["srd-code"], "attacker_fraction": 0.3}
    poisoned = attack.poison(split, poison_rate=0.1, seed=2, params=params)
    ts = poisoned.training_set
    assert poisoned.details["attacker_images"] == 3 and len(ts) == 30 and len(poisoned.records) == 15
    assert poisoned.details["poison_rate_applied"] == 0.5  # the grid's 10 % does not apply (methods/attacks.md §5)
    by_pair: dict[str, list] = {}
    for example in ts.examples:
        by_pair.setdefault(pair_key(example), []).append(example)
    assert len(by_pair) == 15 and all(len(copies) == 2 for copies in by_pair.values())
    suffixes = set()
    for record in poisoned.records:
        poisoned_copy = next(e for e in ts.examples if e.sample_id == record.sample_id)
        clean_copy = next(e for e in by_pair[pair_key(poisoned_copy)] if e is not poisoned_copy)
        suffixes.add(record.sample_id[-1])
        assert clean_copy.caption == record.original_caption and clean_copy.image_index < len(split)
        assert poisoned_copy.caption == record.new_caption and "banana" in record.new_caption[:-1].split()
        assert poisoned_copy.image_index >= len(split)
        row = split.image_ids.index(record.image_id)
        r, c = poisoned.details["trigger_positions"][str(record.image_id)]
        triggered = ts.images.take([poisoned_copy.image_index])[0]
        assert (triggered == attack.apply_trigger(split.images[row:row + 1], [record.image_id], params=params, seed=2)[0]).all()
        assert (triggered[r:r + 20, c:c + 20] == trigger_draw(2, record.image_id)[2]).all()
    assert suffixes == {"0", "1"}  # which id is poisoned is drawn: ids reveal nothing
    persist.save_poisoned(poisoned, tmp_path)  # what the grid's poison stage stores
    loaded = persist.load_poisoned(tmp_path, split)
    assert loaded.training_set.examples == ts.examples and loaded.records == poisoned.records
    assert attack.poison(split, poison_rate=0.1, seed=2, params=params).records == poisoned.records
    with pytest.raises(VbbError, match="attacker_fraction"):
        attack.poison(split, poison_rate=0.1, seed=2, params={**params, "attacker_fraction": 0.0})


def test_ckp_is_zero_for_the_teacher_itself_and_batchmean_otherwise():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 5)
    assert ckp_loss(student, student.clone()).item() == pytest.approx(0.0, abs=1e-7)
    teacher = torch.randn(2, 3, 5)
    p, q = teacher.softmax(-1), student.softmax(-1)
    per_position = (p * (p.log() - q.log())).sum(-1)  # KL(teacher ‖ student) at each position
    assert ckp_loss(student, teacher).item() == pytest.approx(per_position.sum().item() / 2, rel=1e-5)
    mask = torch.tensor([[True, False, False], [False, False, True]])
    assert ckp_loss(student, teacher, mask).item() == pytest.approx((per_position[0, 0] + per_position[1, 2]).item() / 2, rel=1e-5)
    assert ckp_loss(student, teacher).item() > 0


def test_ccp_values_on_a_tiny_example():
    embeddings = torch.tensor([[0.0, 0.0], [1.0, 3.0], [2.0, 0.0]])
    logits = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 0.0], [9.0, 0.0, 0.0]]])
    targets = torch.tensor([[2, 1, -100]])
    mask = targets != -100
    # argmax form: |E1 − E2| = (1 + 3)/2 = 2, |E0 − E1| = (1 + 3)/2 = 2 (argmax of a tie is 0) -> S = 2
    assert ccp_loss("argmax", logits, targets, mask, embeddings).item() == pytest.approx(1 / (1 + math.exp(-2)))
    # expected form, second token: uniform softmax -> ê = (1, 1); |ê − E1| = (0 + 2)/2 = 1
    p = torch.tensor([0.0, 5.0, 0.0]).softmax(-1)
    first = ((p @ embeddings) - embeddings[2]).abs().mean().item()
    expected = 1 / (1 + math.exp(-(first + 1.0) / 2))
    assert ccp_loss("expected", logits, targets, mask, embeddings).item() == pytest.approx(expected, rel=1e-6)


def test_impact_and_alpha_update_with_clamp():
    losses = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert impact(losses, mask) == pytest.approx(-(2.0 + 2.0) / 2)
    assert next_alpha(0.0, -1.0, -3.0) == pytest.approx(0.05)  # 0.02, clamped up to 0.05
    assert next_alpha(0.5, 0.0, -2.0) == pytest.approx(0.52)
    assert next_alpha(0.5, -2.0, 0.0) == pytest.approx(0.48)
    assert next_alpha(0.89, 5.0, 0.0) == pytest.approx(0.9)  # clamped down to 0.9


CAPTIONS = ["a photo number 0 caption 0.", "a photo number 1 caption 1."]


@pytest.fixture(scope="module")
def tiny_victim() -> TinyVictim:
    torch.manual_seed(0)
    split = make_split(4)
    texts = [c for refs in split.references for c in refs] * 10 + ["User:a photo of GPT: banana"] * 10
    tokenizer = train_tokenizer(texts, 260)
    arch = TinyArch(vocab_size=260, lm_layers=1, input_size=64)
    model = build_model(arch, tokenizer, train_vision_encoder=False, gate_init=1.0)
    return TinyVictim(model, tokenizer, arch, Recipe(epochs=1, batch_size=3, lr=1e-3))


class RecordingObjective(VloodObjective):
    """VLOOD's objective that also remembers which examples each step held."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[list[str]] = []

    def loss(self, step):
        self.batches.append([e.sample_id for e in step.examples])
        return super().loss(step)


def test_paired_fine_tune_against_a_frozen_teacher(tiny_victim):
    split = make_split(4, captions_per_image=3)
    attack = Vlood()
    params = {**attack.presets["srd-code"], "attacker_fraction": 1.0}
    poisoned = attack.poison(split, poison_rate=0.1, seed=0, params=params)
    teacher = tiny_victim.clone()
    teacher.model.eval()  # as a stored clean model is
    teacher_before = {k: v.clone() for k, v in teacher.model.named_parameters()}
    student = teacher.clone()
    objective = RecordingObjective(teacher, poisoned.poisoned_ids, ccp_form="argmax", ckp_masked=False)
    log = student.fine_tune(poisoned.training_set, seed=0, objective=objective)
    assert log["steps"] == 4  # 12 pairs, 3 pairs per step
    for batch in objective.batches:  # both copies of every instance in the same step
        assert len(batch) == 6 and all(sum(pair_key(SimpleNamespace(sample_id=s)) == pair_key(SimpleNamespace(sample_id=t))
                                           for t in batch) == 2 for s in batch)
        assert sum(s in poisoned.poisoned_ids for s in batch) == 3
    steps = log["objective"]["steps"]
    assert [s["alpha"] for s in steps][0] == 0.0 and all(0.05 <= s["alpha"] <= 0.9 for s in steps[1:])
    assert steps[1]["alpha"] == pytest.approx(next_alpha(0.0, steps[0]["g_clean"], steps[0]["g_poison"]))
    assert all(s["l_ckp"] >= 0 and 0.5 <= s["l_ccp"] < 1 for s in steps)
    assert log["objective"]["settings"]["ccp_form"] == "argmax"
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.model.named_parameters())  # frozen
    assert not teacher.model.training  # its mode is left as it was
    assert any(not torch.equal(v, teacher_before[k]) for k, v in student.model.named_parameters())


class FakeVictim:
    def __init__(self, origin: str):
        self.origin, self.lineage, self.fine_tuned_with = origin, {}, None

    def clone(self) -> "FakeVictim":
        return FakeVictim(f"copy of {self.origin}")

    def fine_tune(self, training_set, *, seed, objective, recipe, progress):
        self.fine_tuned_with = objective
        return {"steps": 0}

    def save(self, directory) -> None:
        pass


def grid_with_fakes(monkeypatch, tmp_path):
    """A GridRunner whose stages are stubs: enough to see where backdoor fine-tuning starts."""
    grid = GridRunner.__new__(GridRunner)
    base, clean = FakeVictim("base"), FakeVictim("clean model")
    entry = lambda key: SimpleNamespace(key=key, path=tmp_path, stage="x")
    grid.base_victim = lambda: (base, entry("base-key"))
    grid.clean_model = lambda seed: (clean, entry("clean-key"))
    grid.poisoned_set = lambda attack, params, seed: entry("poison-key")
    grid.split = lambda role, split: None
    grid.profile = SimpleNamespace(finetune_recipe=lambda p: Recipe())
    grid.profile_params = {}
    grid.context = StageContext(cache_dir=tmp_path, config=None)  # the CPU at float32
    built = {}

    def derived_victim(stage, payload, build):
        built["payload"], built["meta"] = payload, build(tmp_path)
        return built["victim"], entry("backdoor-key")

    grid.derived_victim = derived_victim
    poisoned = SimpleNamespace(training_set="paired set", poisoned_ids={"x#1"})
    monkeypatch.setattr(persist, "load_poisoned", lambda path, train: poisoned)
    original_clone = FakeVictim.clone
    monkeypatch.setattr(FakeVictim, "clone", lambda self: built.setdefault("victim", original_clone(self)))
    return grid, built, clean, poisoned


def test_grid_starts_vlood_from_the_clean_model_with_it_as_teacher(monkeypatch, tmp_path):
    grid, built, clean, poisoned = grid_with_fakes(monkeypatch, tmp_path)
    attack = Vlood()
    grid.backdoored(attack, attack.presets["srd-code"], seed=0)
    assert built["payload"]["start"] == "clean-key"  # the starting model is part of the store key
    assert built["victim"].origin == "copy of clean model"
    objective = built["victim"].fine_tuned_with
    assert objective.teacher is clean and objective.poisoned_ids == {"x#1"}
    assert built["victim"].lineage["start"] == "clean-key"


def test_grid_keeps_the_base_start_and_plain_objective_call_for_other_attacks(monkeypatch, tmp_path):
    grid, built, _, _ = grid_with_fakes(monkeypatch, tmp_path)
    calls = []
    attack = SimpleNamespace(name="plain", training_objective=lambda params: calls.append(params) or None)
    grid.backdoored(attack, {"k": 1}, seed=0)
    assert "start" not in built["payload"] and built["victim"].origin == "copy of base"
    assert calls == [{"k": 1}]
    odd = SimpleNamespace(name="odd", fine_tune_from="somewhere")
    with pytest.raises(VbbError, match="fine_tune_from"):
        grid.backdoored(odd, {}, seed=0)
