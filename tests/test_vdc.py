"""VDC (methods/defenses.md §4): lexicon questions, the vote boundary, the answerers, a full run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlmbackdoor_bench.data.providers import EMBEDDED_COCO, PROVIDERS
from vlmbackdoor_bench.data.world import CATEGORIES
from vlmbackdoor_bench.data.world_captions import NOUNS
from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import DefenseContext, StageContext
from vlmbackdoor_bench.types import Example, ImageBank, TrainingSet
from vlmbackdoor_bench.victims.training import Recipe
from vlmbackdoor_bench_plugins.defenses.vdc import (
    COCO80, DEFAULTS, GENERAL, ImageNetProxy, Lexicon, VersatileDataCleanser, consistency,
    is_consistent, jaccard, questions_for, with_plurals,
)

WORLD_FORMS = with_plurals(EMBEDDED_COCO.lexicon)  # what VDC uses on the embedded world
WORLD = Lexicon(WORLD_FORMS)
COCO = Lexicon(COCO80)


def test_vote_boundary_keeps_exactly_half():
    assert consistency([True, False]) == 0.5 and is_consistent(0.5)  # v2 keeps 0.5 (v1 flags it)
    assert not is_consistent(consistency([True, False, False]))  # 1/3
    assert is_consistent(consistency([True, True, False, False, True]))  # 3/5
    assert not is_consistent(consistency([True, False, False, False, False]))  # 1/5
    assert consistency([]) == 0.0


def test_questions_come_from_the_caption_entities():
    caption = "Two bananas and an orange ball next to a coffee mug, three oranges and a toy car."
    assert WORLD.entities(caption) == ["banana", "ball", "cup", "orange", "car"]  # colour "orange" skipped
    assert questions_for(caption, WORLD, None, DEFAULTS) == ["banana", "ball", "cup", "orange", "car"]
    six = caption + " A clock."
    assert len(questions_for(six, WORLD, None, DEFAULTS)) == 5  # at most N = 5
    # fewer than 2 entities: the general question replaces the entity questions
    assert questions_for("The image depicts a photo of the banana.", WORLD, None, DEFAULTS) == [GENERAL]
    # an entity the answerer cannot check is skipped before counting
    assert questions_for("Two kites and a cup.", WORLD, {"cup", "ball"}, DEFAULTS) == [GENERAL]


def test_lexicons_cover_the_world_categories_and_coco_80():
    assert set(WORLD_FORMS) == set(CATEGORIES) and len(COCO80) == 80
    assert all(set(NOUNS[c]) <= set(forms) for c, forms in WORLD_FORMS.items())
    assert WORLD_FORMS["cup"] == ["coffee cup", "coffee cups", "cup", "cups", "mug", "mugs"]
    assert "banana" in COCO80  # methods/defenses.md §4: inserted targets are caught by the COCO-80 lexicon
    assert COCO.entities("A man riding a bike next to two hot dogs and a dog.") == [
        "person", "bicycle", "hot dog", "dog"]
    assert COCO.entities("Several people and knives on a dining table.") == ["person", "knife", "dining table"]


def test_jaccard():
    assert jaccard({"cup", "ball"}, {"cup"}) == 0.5 and jaccard({"banana"}, {"kite"}) == 0.0
    assert jaccard(set(), set()) == 1.0


def test_imagenet_proxy_answers_from_a_real_photo():
    from PIL import Image
    from skimage import data as skdata

    cat = np.asarray(Image.fromarray(skdata.chelsea()).resize((224, 224), Image.BICUBIC))
    proxy = ImageNetProxy(top_k=5, negative_quantile=0.95)
    probs = proxy.probabilities(np.stack([cat, np.full_like(cat, 128)]))
    assert proxy.answer(probs, "cat").tolist()[0] is True  # a tabby is in the top 5
    assert proxy.answer(probs, "banana").tolist() == [False, False]
    proxy.fit(probs, {"cat": np.array([True, False])})  # the grey image is cat's clean negative
    assert proxy.thresholds["cat"] == pytest.approx(proxy.entity_scores(probs, "cat")[1])


class ScriptedBase:
    """A clean base victim whose knowledge is a table: what each image really contains."""

    def __init__(self, truth: dict[int, list[str]]):
        self.truth, self.recipe, self.trained_on = truth, Recipe(epochs=1, batch_size=4), None

    def _image(self, image: np.ndarray) -> int:
        return int(image[0, 0, 0])

    def generate(self, images, instruction="a photo of"):
        return [" and ".join(f"a {c}" for c in self.truth[self._image(im)]) for im in images]

    def caption_nll(self, images, captions, instructions=None):
        out = []
        for image, answer, prompt in zip(images, captions, instructions):
            present = any(f"a {c} in" in prompt for c in self.truth[self._image(image)])
            out.append(1.0 if (answer == "yes") == present else 2.0)
        return np.array(out)

    def clone(self):
        return self

    def fine_tune(self, training_set, *, seed, objective=None, recipe=None, progress=""):
        self.trained_on = [e.sample_id for e in training_set.examples]
        return {"final_loss": 0.0}


def test_vdc_removes_inconsistent_pairs_and_retrains_the_base(tmp_path: Path):
    truth = {0: ["cup", "ball", "clock"], 1: ["kite"], 2: ["car", "chair"]}
    images = np.stack([np.full((8, 8, 3), k, np.uint8) for k in truth])
    examples = [
        Example("c0", 0, "A cup, a ball and a clock on a table."),  # 3/3
        Example("c1", 0, "A cup and a ball and a banana."),  # 2/3 kept
        Example("c2", 2, "A car and a chair and a cup and a book."),  # 2/4 = 0.5 kept (boundary)
        Example("p0", 2, "A car and a banana and a cup and a book."),  # 1/4 removed
        Example("c3", 1, "Two kites in the sky."),  # 1 entity: general question, Jaccard 1
        Example("p1", 1, "The image depicts a photo of the banana."),  # general, Jaccard 0
    ]
    data = TrainingSet(ImageBank(images), examples)
    base = ScriptedBase(truth)
    context = DefenseContext(backdoored=None, training_set=data, clean_reserved=None, base_victim=base,
                             scorers=None, seed=0, budget={}, workdir=tmp_path,
                             stage=StageContext(cache_dir=tmp_path, config=None), lexicon=EMBEDDED_COCO.lexicon)
    outcome = VersatileDataCleanser().defend(context, {"answerer": "base-yes-no", "lexicon": "embedded-world"})
    assert outcome.report.removed_sample_ids == ["p0", "p1"]
    assert base.trained_on == ["c0", "c1", "c2", "c3"] and outcome.victim is base
    details = outcome.report.details
    assert details["n_general"] == 2 and details["questions_per_instance"] == [2, 0, 0, 2, 2]


def test_auto_lexicon_follows_the_dataset_the_training_set_comes_from(tmp_path: Path):
    def context(source):  # as the grid builds it: the provider's lexicon, if it declares one
        lexicon = next((getattr(p, "lexicon", None) for p in PROVIDERS if p.name == source), None)
        return DefenseContext(backdoored=None, training_set=None, clean_reserved=None, base_victim=None,
                              scorers=None, seed=0, budget={}, workdir=tmp_path,
                              stage=StageContext(cache_dir=tmp_path, config=None), dataset_source=source,
                              lexicon=lexicon)
    embedded = VersatileDataCleanser.lexicon_forms(context("embedded-coco"), "auto")
    coco = VersatileDataCleanser.lexicon_forms(context("coco-karpathy"), "auto")
    assert embedded == WORLD_FORMS and coco is COCO80
    assert VersatileDataCleanser.lexicon_forms(context(None), "auto") is COCO80
    with pytest.raises(VbbError, match="declares no lexicon"):
        VersatileDataCleanser.lexicon_forms(context("coco-karpathy"), "embedded-world")
