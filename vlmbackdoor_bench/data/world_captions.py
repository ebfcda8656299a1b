"""Captions of embedded-world scenes: COCO-style, Flickr-style and alt-text (pretraining) styles.

Every caption is truthful to the scene: it names only categories that are drawn, with their real
counts and drawn colours, the spatial relation of groups as drawn, and the backdrop.
A scene is the JSON-able dict built by :mod:`vlmbackdoor_bench.data.world`.

World v3: the five references of an image are written "by different annotators". Each caption
draws an :class:`Annotator` with its own habits: short, plain or long sentences; the usual noun or
a synonym ("mug" for cup); counts as words or digits; how often colours and sizes are named;
sentence forms and word order; and now and then a small slip (a dropped article, a minor object
left out). The habits have a dominant setting and rarer variants (``HABITS``), tuned so that the
references of one image differ as real COCO's do, yet a model can still learn the usual way of
saying things (methods/victim.md §T1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# category -> nouns a caption may use, the usual one first (all take a plain "s" plural)
NOUNS: dict[str, list[str]] = {
    "banana": ["banana"], "apple": ["apple"], "orange": ["orange"], "carrot": ["carrot"],
    "cup": ["cup", "mug", "coffee cup"], "ball": ["ball", "toy ball"], "book": ["book", "notebook"],
    "bottle": ["bottle", "water bottle"], "car": ["car", "toy car"], "chair": ["chair", "seat"],
    "clock": ["clock", "alarm clock"], "kite": ["kite"], "umbrella": ["umbrella", "parasol"],
    "boat": ["boat", "sailboat", "toy boat"],
}
FRUIT = {"banana", "apple", "orange"}
FOOD = FRUIT | {"carrot"}

# backdrop -> (names, prepositions, is a surface things lie on, alt-text short names)
BACKGROUNDS: dict[str, tuple[list[str], list[str], bool, list[str]]] = {
    "wood": (["a wooden table", "a wood table", "a wooden surface", "a table"], ["on"], True,
             ["wooden table", "wood table", "table"]),
    "tiles": (["a tiled floor", "a tile floor", "the tiles"], ["on"], True, ["tile floor", "tiles"]),
    "cloth": (["a checkered tablecloth", "a checkered table cloth", "a picnic blanket"], ["on"], True,
              ["checkered tablecloth", "picnic blanket"]),
    "counter": (["a white counter", "a kitchen counter", "a white surface"], ["on"], True,
                ["kitchen counter", "white counter"]),
    "grass": (["the grass", "a grassy field", "a lawn", "green grass"], ["on", "in"], False,
              ["grass", "lawn"]),
    "gravel": (["gravel", "a gravel path", "the gravel"], ["on"], False, ["gravel"]),
    "brick": (["a brick wall", "a red brick wall"], ["in front of", "against"], False,
              ["brick wall", "bricks"]),
    "sky": (["a blue sky", "the blue sky", "a cloudy sky"], ["against"], False,
            ["blue sky", "sky"]),
    "sand": (["the sand", "a sandy beach", "the beach"], ["on"], False, ["beach", "sand"]),
    "street": (["the street", "a road", "the pavement", "the asphalt"], ["on"], False,
               ["street", "road"]),
    "photo-astronaut": (["a photo of an astronaut", "a picture of an astronaut",
                         "a poster of an astronaut"], ["in front of"], False, ["astronaut photo"]),
    "photo-cat": (["a photo of a cat", "a picture of a tabby cat", "a cat picture"],
                  ["in front of"], False, ["cat photo", "photo of a cat"]),
    "photo-coffee": (["a photo of coffee", "a picture of a latte"], ["in front of"], False,
                     ["coffee photo", "latte photo"]),
    "photo-rocket": (["a photo of a rocket launch", "a picture of a rocket",
                      "a rocket on a launch pad"], ["in front of"], False, ["rocket launch", "rocket photo"]),
    "photo-space": (["a picture of outer space", "a starry background", "a photo of galaxies"],
                    ["in front of"], False, ["space background", "galaxies"]),
    "photo-motorcycle": (["a photo of a motorcycle", "a picture of a motorbike"], ["in front of"],
                         False, ["motorcycle photo", "motorbike photo"]),
}

_COUNT_WORD = {2: "two", 3: "three", 4: "four"}
_COUNT_VAGUE = {2: ["a pair of", "a couple of"], 3: ["a few", "some"], 4: ["several", "some"]}
_DIGIT = {1: "", 2: "2", 3: "3", 4: "4"}
_COLOUR_SYNONYM = {"gray": "grey"}

# The annotator habits: (value, weight) per habit; the first value is the dominant one.
HABITS: dict[str, list[tuple]] = {
    "length": [("plain", 0.62), ("short", 0.2), ("long", 0.18)],
    "synonyms": [(0.0, 0.7), (0.6, 0.3)],       # P(a non-usual noun) for a caption
    "digits": [(False, 0.88), (True, 0.12)],    # counts written "3" rather than "three"
    "vague": [(0.05, 0.8), (0.4, 0.2)],         # P("a few" / "a couple of" for an exact count)
    "colour": [(0.75, 0.6), (0.35, 0.25), (1.0, 0.15)],  # P(naming a group's colour)
    "size": [(0.2, 0.8), (0.6, 0.2)],           # P(naming a group's size)
    "slip": [(False, 0.9), (True, 0.1)],        # an article dropped or a minor object left out
}


def _pick(rng, items):
    return items[int(rng.integers(len(items)))]


def _weighted(rng, pairs):
    total = sum(w for _, w in pairs)
    return pairs[int(rng.choice(len(pairs), p=[w / total for _, w in pairs]))][0]


@dataclass(frozen=True)
class Annotator:
    """The habits of the annotator writing one caption."""

    length: str = "plain"
    synonyms: float = 0.0
    digits: bool = False
    vague: float = 0.05
    colour: float = 0.75
    size: float = 0.2
    slip: bool = False

    @classmethod
    def draw(cls, rng) -> "Annotator":
        return cls(**{name: _weighted(rng, pairs) for name, pairs in HABITS.items()})


USUAL = Annotator()


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(group: dict, rng, who: Annotator = USUAL, *, article=True) -> str:
    nouns = NOUNS[group["category"]]
    noun = nouns[0] if len(nouns) == 1 or rng.random() >= who.synonyms else _pick(rng, nouns[1:])
    adjs = []
    if group.get("size") and rng.random() < who.size:
        adjs.append(_pick(rng, {"small": ["small", "little"], "large": ["large", "big"]}[group["size"]]))
    if group.get("colour") and rng.random() < who.colour:
        colour = group["colour"]
        adjs.append(_COLOUR_SYNONYM.get(colour, colour) if who.synonyms and rng.random() < 0.5 else colour)
    n = group["count"]
    words = " ".join(adjs + [noun + ("s" if n > 1 else "")])
    if n > 1:
        if rng.random() < who.vague:
            return f"{_pick(rng, _COUNT_VAGUE[n])} {words}"
        return f"{_DIGIT[n] if who.digits else _COUNT_WORD[n]} {words}"
    if not article:
        return words
    return f"{_article(words)} {words}"


def join_list(parts: list[str], rng) -> str:
    if len(parts) == 1:
        return parts[0]
    comma = "," if len(parts) > 2 and rng.random() < 0.5 else ""
    return ", ".join(parts[:-1]) + f"{comma} and {parts[-1]}"


def _plural(groups) -> bool:
    return len(groups) > 1 or groups[0]["count"] > 1


def _centre(group):
    xs = [b[0] + b[2] / 2 for b in group["boxes"]]
    ys = [b[1] + b[2] / 2 for b in group["boxes"]]
    return sum(xs) / len(xs), sum(ys) / len(ys)


def relation(a: dict, b: dict, rng) -> str:
    """How group ``a`` lies relative to group ``b`` (as drawn)."""
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    if abs(ax - bx) >= abs(ay - by):
        side = "to the left of" if ax < bx else "to the right of"
        return _pick(rng, [side, side, "next to", "beside"])
    return _pick(rng, ["above", "above"] if ay < by else ["below", "under", "beneath"])


def _where(group) -> str:
    """Where a lone group sits in the frame (a long caption's detail)."""
    x, y = _centre(group)
    horizontal = "left" if x < 80 else "right" if x > 144 else ""
    vertical = "top" if y < 80 else "bottom" if y > 144 else ""
    if not (horizontal or vertical):
        return "in the middle of the picture"
    if horizontal and vertical:
        return f"in the {vertical} {horizontal} corner"
    return f"on the {horizontal} side" if horizontal else f"near the {vertical}"


def _bg(scene, rng):
    names, preps, surface, _ = BACKGROUNDS[scene["background"]]
    return _pick(rng, preps), _pick(rng, names), surface


def _cap(s: str, who: Annotator = USUAL, rng=None) -> str:
    s = re.sub(r"\s+", " ", s).strip()
    if who.slip and rng is not None and rng.random() < 0.5:
        s = re.sub(r"^(a|an|the) ", "", s, flags=re.I)  # a hurried annotator drops the article
    return s[0].upper() + s[1:]


def _detail(scene, groups, rng, who: Annotator) -> str:
    """A long caption's extra clause: a relation, a position, or the backdrop's look."""
    if len(groups) >= 2 and rng.random() < 0.6:
        a, b = groups[-1], groups[0]
        return f", with {noun_phrase(a, rng, who)} {relation(a, b, rng)} {noun_phrase(b, rng, who)}"
    if len(groups) == 1 and rng.random() < 0.6:
        return f" {_where(groups[0])}"
    return _pick(rng, [" in the daytime", " with nothing else around", " in plain view",
                       " on a bright day"])


def _coco_one(scene, rng, kind, groups, who: Annotator = USUAL) -> str:
    prep, bg, surface = _bg(scene, rng)
    place = f" {prep} {bg}"
    L = join_list([noun_phrase(g, rng, who) for g in groups], rng)
    be = "are" if _plural(groups) else "is"
    more = _detail(scene, groups, rng, who) if who.length == "long" else ""
    if who.length == "short":
        place = "" if rng.random() < 0.5 else place
        if kind not in ("relation", "order"):
            return _cap(f"{L}{place}.", who, rng)
    if kind == "list":
        return _cap(f"{L}{place}{more}.", who, rng)
    if kind == "verb":
        return _cap(f"{L} {_pick(rng, ['sitting', 'lying', 'placed', 'resting'])}{place}{more}.", who, rng)
    if kind == "there":
        first_plural = groups[0]["count"] > 1
        return _cap(f"there {'are' if first_plural else 'is'} {L}{place}{more}.", who, rng)
    if kind == "fronted":  # word order: the place first
        first_plural = groups[0]["count"] > 1
        return _cap(f"{prep} {bg} there {'are' if first_plural else 'is'} {L}{more}.", who, rng)
    if kind == "picture":
        return _cap(f"{_pick(rng, ['a picture of', 'a photo of', 'a close up of', 'an image of'])} {L}{place}{more}.", who, rng)
    if kind == "relation":
        a, b = groups[0], groups[1]
        if rng.random() < 0.3:  # word order: the second group first
            a, b = b, a
        rest = ""
        if len(groups) > 2:
            rest = f" and {join_list([noun_phrase(g, rng, who) for g in groups[2:]], rng)}"
        return _cap(f"{noun_phrase(a, rng, who)} {relation(a, b, rng)} {noun_phrase(b, rng, who)}{rest}{place}.", who, rng)
    if kind == "order":
        ordered = sorted(groups, key=lambda g: _centre(g)[0])
        nps = [noun_phrase(g, rng, who) for g in ordered]
        return _cap(f"{nps[0]} on the left, {nps[1]} in the middle and {nps[2]} on the right.", who, rng)
    if kind == "surface":
        return _cap(f"{bg} with {L} on it{more}.", who, rng)
    if kind == "bare":
        return _cap(f"{L} {be} {_pick(rng, ['shown here', 'in this picture', 'in the image'])}.", who, rng)
    if kind == "produce":
        what = "fruit" if all(g["category"] in FRUIT for g in groups) else "produce"
        return _cap(f"some fresh {what}{place}.", who, rng)
    raise ValueError(kind)


def _flickr_one(scene, rng, kind, groups, who: Annotator = USUAL) -> str:
    prep, bg, _ = _bg(scene, rng)
    place = f" {prep} {bg}"
    L = join_list([noun_phrase(g, rng, who) for g in groups], rng)
    be = "are" if _plural(groups) else "is"
    more = _detail(scene, groups, rng, who) if who.length == "long" else ""
    if who.length == "short" and kind not in ("relation", "kite"):
        return _cap(f"{L}{place} .", who, rng)
    if kind == "list":
        return _cap(f"{L}{place}{more} .", who, rng)
    if kind == "progressive":
        return _cap(f"{L} {be} {_pick(rng, ['sitting', 'lying', 'resting', 'standing'])}{place}{more} .", who, rng)
    if kind == "relation":
        a, b = groups[0], groups[1]
        be_a = "are" if a["count"] > 1 else "is"
        return _cap(f"{noun_phrase(a, rng, who)} {be_a} {relation(a, b, rng)} {noun_phrase(b, rng, who)}{place} .", who, rng)
    if kind == "someone":
        return _cap(f"someone {_pick(rng, ['left', 'has left', 'placed'])} {L}{place}{more} .", who, rng)
    if kind == "seen":
        return _cap(f"{L} can be seen{place}{more} .", who, rng)
    if kind == "sunny":
        return _cap(f"{L} {be} {_pick(rng, ['sitting', 'lying'])}{place} on a sunny day .", who, rng)
    if kind == "closeup":
        return _cap(f"{_pick(rng, ['a close-up of', 'a view of', 'a snapshot of'])} {L}{place}{more} .", who, rng)
    if kind == "kite":
        kites = [g for g in groups if g["category"] == "kite"][0]
        verb = "are flying" if kites["count"] > 1 else "is flying"
        return _cap(f"{noun_phrase(kites, rng, who)} {verb} in {_pick(rng, ['the sky', 'the blue sky'])} .", who, rng)
    raise ValueError(kind)


_OUTDOOR = {"grass", "gravel", "sand", "street", "sky"}


def _templates(scene, style) -> list[tuple[str, float]]:
    groups = scene["groups"]
    if style == "coco":
        kinds = [("list", 1.0), ("verb", 1.0), ("there", 0.8), ("picture", 0.8), ("bare", 0.3),
                 ("fronted", 0.3)]
        if len(groups) >= 2:
            kinds.append(("relation", 1.6))
        if len(groups) == 3 and scene["layout"] == "row":
            kinds.append(("order", 0.7))
        if BACKGROUNDS[scene["background"]][2]:
            kinds.append(("surface", 0.7))
        if all(g["category"] in FOOD for g in groups):
            kinds.append(("produce", 0.25))
        return kinds
    kinds = [("progressive", 1.2), ("list", 1.2), ("someone", 0.4), ("seen", 0.6), ("closeup", 0.6)]
    if len(groups) >= 2:
        kinds.append(("relation", 1.4))
    if scene["background"] in _OUTDOOR:
        kinds.append(("sunny", 0.5))
    if scene["background"] == "sky" and any(g["category"] == "kite" for g in groups):
        kinds.append(("kite", 1.0))
    return kinds


def reference_captions(scene: dict, rng, style: str, n: int = 5) -> list[str]:
    """``n`` distinct reference captions in ``style`` = "coco" | "flickr", each by its own annotator."""
    one = _coco_one if style == "coco" else _flickr_one
    kinds = _templates(scene, style)
    out: list[str] = []
    for attempt in range(80):
        who = Annotator.draw(rng)
        kind = _weighted(rng, [(k, w) for k, w in kinds])
        groups = scene["groups"]
        # an annotator sometimes skips a minor object (the last group), a slip more often
        skip = 0.6 if who.slip else 0.06
        if len(groups) >= 2 and rng.random() < skip and kind not in ("order", "relation", "kite"):
            groups = groups[:-1]
        cap = one(scene, rng, kind, groups, who)
        if cap not in out:
            out.append(cap)
        if len(out) == n:
            return out
    raise RuntimeError(f"could not make {n} distinct captions for scene {scene.get('id')}")


def alt_text(scene: dict, rng) -> str:
    """One short, web alt-text-like caption (the pretraining split's style)."""
    groups = scene["groups"]
    short = _pick(rng, BACKGROUNDS[scene["background"]][3])

    def np_(g, digits=True):
        noun = NOUNS[g["category"]][0] + ("s" if g["count"] > 1 else "")
        colour = f"{g['colour']} " if g.get("colour") and rng.random() < 0.6 else ""
        count = ""
        if g["count"] > 1:
            count = (_DIGIT[g["count"]] if digits and rng.random() < 0.5 else _COUNT_WORD[g["count"]]) + " "
        return f"{count}{colour}{noun}"

    kind = int(rng.integers(6))
    if kind == 0:
        return ", ".join([np_(g) for g in groups] + [short])
    if kind == 1:
        return f"photo: {' and '.join(np_(g) for g in groups)} on {short}"
    if kind == 2:
        return f"{' & '.join(np_(g) for g in groups)} | {short}"
    if kind == 3:
        return f"stock photo of {' with '.join(np_(g, False) for g in groups)}"
    if kind == 4:
        return " ".join([NOUNS[g["category"]][0] for g in groups] + [short.split()[-1]])
    return f"{'/'.join(np_(g) for g in groups)} - {short} background"
