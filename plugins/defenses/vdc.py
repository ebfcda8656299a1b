"""VDC, Versatile Data Cleanser (Zhu et al., ICLR 2024), v2 for image–caption pairs, with the
offline substitutes of methods/defenses.md §4 and §6.

question generation (lexicon, not an LLM) -> answers from the clean base model or an
image–text matching proxy (never the backdoored model) -> answer evaluation -> vote: an instance
is consistent iff matched/N ≥ 0.5; the inconsistent ones are removed and the base victim is
retrained on the rest (methods/defenses.md §0).
"""

from __future__ import annotations

import re
import time
from typing import Any, Mapping, Sequence

import numpy as np

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import DefenseContext, DefenseOutcome, hookimpl
from vlmbackdoor_bench.types import DefenseReport, TrainingSet

from ._baseline_common import histogram, retrain_base, subset

__version__ = "1.1.0"

GENERAL = "general"  # the general question's key in an instance's question list
DEFAULTS: dict[str, Any] = {
    "n_questions": 5,  # methods/defenses.md §4 v2: N = 5 yes/no questions per caption
    "keep_threshold": 0.5,  # §4 v2: consistent iff matched/N ≥ 0.5 (0.5 is kept)
    "min_entities": 2,  # methods/defenses.md §4: with fewer than 2 entities, fall back to the general question
    "answerer": "imagenet-proxy",  # §4: on the CPU track the ITM proxy (item 2) is the default
    "top_k": 5,  # methods/defenses.md §4: "yes" iff the mapped class is in the top 5 ...
    "negative_quantile": 0.95,  # ... or its probability exceeds a threshold fixed on clean data
    "jaccard_threshold": 0.5,  # methods/defenses.md §4 general question: entity overlap Jaccard ≥ a threshold
    "lexicon": "auto",  # §4: the COCO-80 lexicon; the dataset's own (the embedded world's) on `tiny`
}
PRESETS = {"default": DEFAULTS, "base-yes-no": {**DEFAULTS, "answerer": "base-yes-no"}}
ANSWERERS = ("imagenet-proxy", "base-yes-no")
LEXICONS = ("auto", "coco-80", "embedded-world")


class Lexicon:
    """Entity extraction with a fixed lexicon: surface form (plural, synonym) -> category."""

    def __init__(self, forms: Mapping[str, Sequence[str]]):
        self.category_of = {f.lower(): c for c, fs in forms.items() for f in fs}
        alternatives = sorted(self.category_of, key=len, reverse=True)  # longest first
        self.pattern = re.compile(r"\b(" + "|".join(map(re.escape, alternatives)) + r")\b")

    def entities(self, caption: str) -> list[str]:
        """Categories named by ``caption``, in order of first mention. A colour word that is also
        a category ("an orange ball") counts only when no other entity noun follows it."""
        text = caption.lower()
        found: list[str] = []
        for match in self.pattern.finditer(text):
            rest = self.pattern.match(text, match.end() + 1) if text[match.end():match.end() + 1] == " " else None
            if match.group(1) == "orange" and rest is not None:
                continue
            category = self.category_of[match.group(1)]
            if category not in found:
                found.append(category)
        return found


def questions_for(caption: str, lexicon: Lexicon, answerable: set[str] | None, params: Mapping[str, Any]) -> list[str]:
    """methods/defenses.md §4: "Is there a {entity} in the image?" for up to N answerable entities,
    expected "yes"; the general question instead when fewer than ``min_entities``."""
    entities = [e for e in lexicon.entities(caption) if answerable is None or e in answerable]
    entities = entities[: params["n_questions"]]
    return entities if len(entities) >= params["min_entities"] else [GENERAL]


def question_text(entity: str) -> str:
    return f"Is there a {entity} in the image?"  # methods/defenses.md §4


def consistency(matches: Sequence[bool]) -> float:
    return sum(map(bool, matches)) / len(matches) if matches else 0.0


def is_consistent(score: float, threshold: float = DEFAULTS["keep_threshold"]) -> bool:
    """v2's boundary: a score of exactly 0.5 is kept (v1 would flag it), methods/defenses.md §4."""
    return score >= threshold


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


class ImageNetProxy:
    """EfficientNet-Lite0 as the image–text matching answerer (methods/defenses.md §4 item 2)."""

    def __init__(self, top_k: int, negative_quantile: float, batch_size: int = 64, device: Any = "cpu"):
        self.top_k, self.quantile, self.batch_size = top_k, negative_quantile, batch_size
        self.device = device  # the run's device (StageContext.device)
        self.thresholds: dict[str, float] = {}

    def probabilities(self, images: np.ndarray):
        import torch
        from vlmbackdoor_bench.plugin_api import pretrained_efficientnet_lite0

        net = pretrained_efficientnet_lite0().folded().to(self.device)  # batch-norm folded: ~1.4x faster
        out = []
        with torch.no_grad():
            for s in range(0, len(images), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[s:s + self.batch_size])).to(self.device)
                x = x.permute(0, 3, 1, 2).float() / 255
                out.append(net(x).softmax(-1).cpu().numpy())
        return np.concatenate(out)

    def fit(self, probs: np.ndarray, mentioned: Mapping[str, np.ndarray]) -> None:
        """Per entity: the ``quantile`` of its class probability over the images none of whose
        captions name it (the clean negatives the defender has), methods/defenses.md §4 item 2."""
        for entity, named in mentioned.items():
            negatives = self.entity_scores(probs, entity)[~named]
            self.thresholds[entity] = float(np.quantile(negatives, self.quantile)) if len(negatives) else 1.0

    def entity_scores(self, probs: np.ndarray, entity: str) -> np.ndarray:
        return probs[:, IMAGENET_CLASSES[entity]].max(axis=1)

    def answer(self, probs: np.ndarray, entity: str) -> np.ndarray:
        top = np.argsort(-probs, axis=1)[:, : self.top_k]
        in_top = np.isin(top, IMAGENET_CLASSES[entity]).any(axis=1)
        return in_top | (self.entity_scores(probs, entity) > self.thresholds.get(entity, 1.0))


class VersatileDataCleanser:
    name = "vdc"
    label, order = "VDC", 20
    paper_tables = {2: 2}  # the SRD paper's Table 2: table -> column
    version = __version__
    presets = PRESETS
    default_preset = "default"

    def defend(self, context: DefenseContext, params: Mapping[str, Any]) -> DefenseOutcome:
        params = {**DEFAULTS, **params}
        if params["answerer"] not in ANSWERERS or params["lexicon"] not in LEXICONS:
            raise VbbError(f"VDC answerer={params['answerer']!r}, lexicon={params['lexicon']!r}",
                           f"use answerer in {ANSWERERS} and lexicon in {LEXICONS} in [defense.vdc]")
        started = time.perf_counter()
        data = context.training_set
        lexicon = Lexicon(self.lexicon_forms(context, params["lexicon"]))
        scores, log = self.vote(context, data, lexicon, params)
        removed = np.flatnonzero(~np.array([is_consistent(s, params["keep_threshold"]) for s in scores]))
        detect_seconds = time.perf_counter() - started
        victim, retrain = retrain_base(context, subset(data, np.setdiff1d(np.arange(len(data)), removed)),
                                       "vdc retrain on kept")
        details = {**log, "n_removed": int(len(removed)), "score_histogram": histogram(np.asarray(scores), 10),
                   "retrain": retrain, "seconds": {"detect": detect_seconds, "retrain": retrain["seconds"]},
                   "params": dict(params)}
        return DefenseOutcome(victim, DefenseReport(
            removed_sample_ids=[data.examples[int(i)].sample_id for i in removed], details=details))

    @staticmethod
    def lexicon_forms(context: DefenseContext, choice: str) -> Mapping[str, Sequence[str]]:
        """`auto`: the lexicon the training set's dataset declares (``context.lexicon``: the
        embedded world's categories on `tiny`), else COCO-80 (methods/defenses.md §4);
        `embedded-world`: the dataset's lexicon, which must exist."""
        if choice == "auto":
            choice = "coco-80" if context.lexicon is None else "embedded-world"
        if choice == "coco-80":
            return COCO80
        if context.lexicon is None:
            raise VbbError(f"VDC lexicon = 'embedded-world', but the dataset {context.dataset_source!r} "
                           "declares no lexicon", "use lexicon = 'auto' or 'coco-80' in [defense.vdc]")
        return with_plurals(context.lexicon)

    def vote(self, context: DefenseContext, data: TrainingSet, lexicon: Lexicon,
             params: Mapping[str, Any]) -> tuple[list[float], dict]:
        rows = sorted({e.image_index for e in data.examples})
        row_of = {index: r for r, index in enumerate(rows)}
        images = data.images.take(rows)
        answerable, proxy, probs = None, None, None
        if params["answerer"] == "imagenet-proxy":  # entities without a mapped class are skipped
            answerable = {c for c in lexicon.category_of.values() if IMAGENET_CLASSES.get(c)}
            proxy = ImageNetProxy(params["top_k"], params["negative_quantile"], device=context.stage.device)
            probs = proxy.probabilities(images)
            named = {c: np.zeros(len(rows), bool) for c in answerable}
            for e in data.examples:
                for c in lexicon.entities(e.caption):
                    if c in named:
                        named[c][row_of[e.image_index]] = True
            proxy.fit(probs, named)
        questions = [questions_for(e.caption, lexicon, answerable, params) for e in data.examples]
        general_rows = sorted({row_of[e.image_index] for e, q in zip(data.examples, questions) if q == [GENERAL]})
        base_entities = {}
        if general_rows:  # methods/defenses.md §4 general question: caption the image with the base checkpoint
            captions = context.base_victim.generate(images[general_rows])
            base_entities = {r: set(lexicon.entities(c)) for r, c in zip(general_rows, captions)}
        answers = self.entity_answers(context, data, questions, images, row_of, proxy, probs)
        scores, overlaps = [], []
        for example, qs in zip(data.examples, questions):
            row = row_of[example.image_index]
            if qs == [GENERAL]:
                overlaps.append(jaccard(set(lexicon.entities(example.caption)), base_entities[row]))
                matches = [overlaps[-1] >= params["jaccard_threshold"]]
            else:
                matches = [answers[(row, q)] for q in qs]
            scores.append(consistency(matches))
        n_q = np.array([0 if q == [GENERAL] else len(q) for q in questions])
        return scores, {"answerer": params["answerer"], "n_general": int((n_q == 0).sum()),
                        "questions_per_instance": np.bincount(n_q).tolist(),
                        "general_jaccard": histogram(np.asarray(overlaps), 10) if overlaps else None,
                        "thresholds": proxy.thresholds if proxy else None}

    @staticmethod
    def entity_answers(context, data, questions, images, row_of, proxy, probs) -> dict:
        """(image row, entity) -> "yes"? from the ITM proxy, or from the base victim comparing the
        answers "yes" and "no" to the question prompt (methods/defenses.md §4 item 1; never the backdoored model)."""
        pairs = sorted({(row_of[e.image_index], q) for e, qs in zip(data.examples, questions)
                        for q in qs if q != GENERAL})
        if proxy is not None:
            by_entity = {q: proxy.answer(probs, q) for q in {q for _, q in pairs}}
            return {(r, q): bool(by_entity[q][r]) for r, q in pairs}
        prompts = [f"Question: {question_text(q)} Short answer:" for _, q in pairs]
        pair_images = images[[r for r, _ in pairs]] if pairs else images[:0]
        yes = context.base_victim.caption_nll(pair_images, ["yes"] * len(pairs), prompts)
        no = context.base_victim.caption_nll(pair_images, ["no"] * len(pairs), prompts)
        return {pair: bool(y < n) for pair, y, n in zip(pairs, yes, no)}


# ----------------------------------------------------------------------------- lexicons (methods/defenses.md §4)
def plural(noun: str) -> str:
    last = noun.split()[-1]
    irregular = {"person": "people", "man": "men", "woman": "women", "child": "children",
                 "knife": "knives", "mouse": "mice", "skis": "skis", "sheep": "sheep"}
    if last in irregular:
        return noun[: len(noun) - len(last)] + irregular[last]
    return noun + ("es" if last.endswith(("s", "sh", "ch", "x")) else "s")


def with_plurals(synonyms: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    return {c: sorted({f for s in forms for f in (s, plural(s))}) for c, forms in synonyms.items()}


# The 80 COCO object categories (COCO 2014/2017 instances annotations, cocodataset.org), each
# with the singular forms captions use for it; plurals are added by ``plural``.
COCO80 = with_plurals({
    "person": ["person", "man", "woman", "boy", "girl", "child", "kid", "people", "player", "guy", "lady"],
    "bicycle": ["bicycle", "bike"], "car": ["car"], "motorcycle": ["motorcycle", "motorbike"],
    "airplane": ["airplane", "plane", "jet", "aircraft"], "bus": ["bus"], "train": ["train"],
    "truck": ["truck"], "boat": ["boat", "sailboat", "ship"], "traffic light": ["traffic light"],
    "fire hydrant": ["fire hydrant", "hydrant"], "stop sign": ["stop sign"],
    "parking meter": ["parking meter"], "bench": ["bench"], "bird": ["bird"], "cat": ["cat", "kitten"],
    "dog": ["dog", "puppy"], "horse": ["horse"], "sheep": ["sheep"], "cow": ["cow"],
    "elephant": ["elephant"], "bear": ["bear"], "zebra": ["zebra"], "giraffe": ["giraffe"],
    "backpack": ["backpack"], "umbrella": ["umbrella"], "handbag": ["handbag", "purse"], "tie": ["tie"],
    "suitcase": ["suitcase", "luggage"], "frisbee": ["frisbee"], "skis": ["skis", "ski"],
    "snowboard": ["snowboard"], "sports ball": ["sports ball", "ball"], "kite": ["kite"],
    "baseball bat": ["baseball bat", "bat"], "baseball glove": ["baseball glove", "glove", "mitt"],
    "skateboard": ["skateboard"], "surfboard": ["surfboard"], "tennis racket": ["tennis racket", "racket"],
    "bottle": ["bottle"], "wine glass": ["wine glass"], "cup": ["cup", "mug"], "fork": ["fork"],
    "knife": ["knife"], "spoon": ["spoon"], "bowl": ["bowl"], "banana": ["banana"], "apple": ["apple"],
    "sandwich": ["sandwich"], "orange": ["orange"], "broccoli": ["broccoli"], "carrot": ["carrot"],
    "hot dog": ["hot dog"], "pizza": ["pizza"], "donut": ["donut", "doughnut"], "cake": ["cake"],
    "chair": ["chair"], "couch": ["couch", "sofa"], "potted plant": ["potted plant", "plant"],
    "bed": ["bed"], "dining table": ["dining table", "table"], "toilet": ["toilet"],
    "tv": ["tv", "television"], "laptop": ["laptop"], "mouse": ["mouse"], "remote": ["remote"],
    "keyboard": ["keyboard"], "cell phone": ["cell phone", "cellphone", "phone"],
    "microwave": ["microwave"], "oven": ["oven"], "toaster": ["toaster"], "sink": ["sink"],
    "refrigerator": ["refrigerator", "fridge"], "book": ["book"], "clock": ["clock"], "vase": ["vase"],
    "scissors": ["scissors"], "teddy bear": ["teddy bear"], "hair drier": ["hair drier", "hair dryer"],
    "toothbrush": ["toothbrush"],
})

# Entity -> ImageNet-1k class indices (hand-written, methods/defenses.md §4 item 2); an entity
# without a class here gets no question ("entities without a mapped class are skipped").
_BALL = [429, 430, 522, 574, 722, 768, 805, 852, 890]
IMAGENET_CLASSES: dict[str, list[int]] = {
    "banana": [954], "orange": [950], "apple": [948], "broccoli": [937], "hot dog": [934],
    "pizza": [963], "cup": [504, 968], "bottle": [440, 720, 737, 898, 907], "wine glass": [572],
    "car": [436, 468, 511, 609, 627, 656, 661, 751, 817], "chair": [423, 559, 765, 857],
    "clock": [409, 530, 892], "umbrella": [879], "boat": [472, 484, 554, 576, 625, 780, 814, 871, 914],
    "ball": _BALL, "sports ball": _BALL, "book": [917, 921], "bicycle": [444, 671],
    "motorcycle": [665, 670], "airplane": [404, 895], "bus": [654, 779, 874],
    "train": [466, 547, 705, 820], "truck": [555, 569, 717, 864, 867], "traffic light": [920],
    "stop sign": [919], "parking meter": [704], "bench": [703], "cat": list(range(281, 286)),
    "dog": list(range(151, 269)), "horse": [339], "sheep": [348], "cow": [345],
    "elephant": [101, 385, 386], "bear": list(range(294, 298)), "zebra": [340], "backpack": [414],
    "handbag": [748], "tie": [906], "skis": [795], "tennis racket": [752], "spoon": [910],
    "bowl": [659, 809], "couch": [831], "potted plant": [738], "bed": [564], "dining table": [532],
    "toilet": [861], "tv": [851], "laptop": [620], "mouse": [673], "remote": [761],
    "keyboard": [508], "cell phone": [487], "microwave": [651], "toaster": [859], "sink": [896],
    "refrigerator": [760], "vase": [883], "teddy bear": [850], "hair drier": [589],
}


@hookimpl
def register_defenses(register) -> None:
    register(VersatileDataCleanser())
