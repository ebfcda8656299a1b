"""Datasets: the Karpathy loader on a small real-photo fixture, the embedded world, the providers."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from vlmbackdoor_bench.data import karpathy as kp
from vlmbackdoor_bench.data import world as wm
from vlmbackdoor_bench.data import (
    CATEGORIES, COCO_KARPATHY, EMBEDDED_COCO, EMBEDDED_FLICKR, KarpathyProvider, KarpathyRecord, WorldSizes,
    generate_world, load_karpathy_split, load_scenes, register_datasets, world_paths, write_karpathy,
)
from vlmbackdoor_bench.data.world_captions import NOUNS
from vlmbackdoor_bench.data.world_draw import PALETTE, load_photo
from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.hookspecs import DatasetProvider, StageContext
from vlmbackdoor_bench.types import sha256_of_ids, sha256_of_images

PHOTOS = {"astronaut": "astronaut.png", "chelsea": "chelsea.png", "coffee": "coffee.png",
          "rocket": "rocket.jpg"}


# --------------------------------------------------------------------------- Karpathy fixture
def _sentences(imgid, captions, start):
    return [{"tokens": c.lower().rstrip(".").split(), "raw": c, "imgid": imgid, "sentid": start + k}
            for k, c in enumerate(captions)]


@pytest.fixture
def coco_dir(tmp_path):
    """COCO-style: filepath sub-folders, cocoid ids, photos bundled with scikit-image."""
    root = tmp_path / "coco"
    rows = [("astronaut", "train2014", "train", 391895, ["An astronaut in a white suit.", "A woman posing in front of a flag."]),
            ("chelsea", "train2014", "train", 522418, ["A tabby cat looking up.", "A close up of a cat's face.", "An orange cat."]),
            ("coffee", "val2014", "restval", 184613, ["A cup of coffee on a saucer.", "A latte with a spoon."]),
            ("rocket", "val2014", "test", 318219, ["A rocket on the launch pad.", "A space shuttle at dusk."])]
    images, sentid = [], 770337
    for imgid, (photo, folder, split, cocoid, caps) in enumerate(rows):
        (root / folder).mkdir(parents=True, exist_ok=True)
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        Image.fromarray(load_photo(PHOTOS[photo])).save(root / folder / name, quality=90)
        sents = _sentences(imgid, caps, sentid)
        sentid += len(caps)
        images.append({"filepath": folder, "sentids": [s["sentid"] for s in sents], "filename": name,
                       "imgid": imgid, "split": split, "sentences": sents, "cocoid": cocoid})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


@pytest.fixture
def flickr_dir(tmp_path):
    """Flickr-style: no filepath, imgid ids, PNG and JPEG files in one folder."""
    root = tmp_path / "flickr"
    root.mkdir()
    images, sentid = [], 0
    for imgid, photo in enumerate(["coffee", "astronaut", "chelsea"]):
        name = f"{1000092795 + imgid}.{'png' if imgid == 1 else 'jpg'}"
        Image.fromarray(load_photo(PHOTOS[photo])).save(root / name)
        caps = [f"Picture number {imgid} of a {photo} .", f"Another view of the {photo} ."]
        sents = _sentences(imgid, caps, sentid)
        sentid += len(caps)
        images.append({"sentids": [s["sentid"] for s in sents], "filename": name, "imgid": imgid,
                       "split": "test", "sentences": sents})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return root


def _bicubic(path):
    return np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC))


def test_coco_style_ids_references_and_bicubic_images(coco_dir, tmp_path):
    s = load_karpathy_split(coco_dir / "dataset_coco.json", coco_dir, "train", dataset="coco-test",
                            cache_dir=tmp_path / "cache")
    assert s.image_ids == [391895, 522418] and len(s) == 2
    assert s.references[1] == ["A tabby cat looking up.", "A close up of a cat's face.", "An orange cat."]
    assert s.sentence_ids[0] == ["770337", "770338"] and s.sentence_ids[1][0] == "770339"
    assert s.images.shape == (2, 224, 224, 3) and s.images.dtype == np.uint8
    np.testing.assert_array_equal(s.images[1], _bicubic(coco_dir / "train2014" / "COCO_train2014_000000522418.jpg"))
    assert s.manifest.n_images == 2 and s.manifest.dataset == "coco-test" and s.manifest.split == "train"
    union = load_karpathy_split(coco_dir / "dataset_coco.json", coco_dir, ["train", "restval"],
                                dataset="coco-test", cache_dir=None)
    assert union.image_ids == [391895, 522418, 184613] and union.split == "train+restval"
    np.testing.assert_array_equal(union.images[:2], s.images)
    examples = union.caption_examples()
    assert len(examples) == 7 and examples[-1].image_index == 2


def test_flickr_style_uses_imgid(flickr_dir):
    s = load_karpathy_split(flickr_dir / "dataset_flickr30k.json", flickr_dir, "test",
                            dataset="flickr-test", cache_dir=None)
    assert s.image_ids == [0, 1, 2]
    assert s.references[2][0] == "Picture number 2 of a chelsea ."
    np.testing.assert_array_equal(s.images[1], _bicubic(flickr_dir / "1000092796.png"))


def test_manifest_stable_cache_reused_and_sensitive_to_image_change(coco_dir, tmp_path):
    args = (coco_dir / "dataset_coco.json", coco_dir, ["train", "restval", "test"])
    cache = tmp_path / "cache"
    a = load_karpathy_split(*args, dataset="c", cache_dir=cache)
    files = sorted(cache.glob("*.npy"))
    mtime = files[0].stat().st_mtime_ns
    b = load_karpathy_split(*args, dataset="c", cache_dir=cache)
    assert a.manifest == b.manifest and isinstance(b.images, np.memmap)
    assert sorted(cache.glob("*.npy")) == files and files[0].stat().st_mtime_ns == mtime  # reused
    assert not b.images.flags.writeable
    fresh = load_karpathy_split(*args, dataset="c", cache_dir=None)
    assert fresh.manifest == a.manifest
    # change one image: the cache must not be reused and the image hash must change
    Image.fromarray(load_photo("chelsea.png")[::-1]).save(coco_dir / "val2014" / "COCO_val2014_000000184613.jpg")
    c = load_karpathy_split(*args, dataset="c", cache_dir=cache)
    assert c.manifest.ids_sha256 == a.manifest.ids_sha256
    assert c.manifest.images_sha256 != a.manifest.images_sha256
    np.testing.assert_array_equal(c.images[2], _bicubic(coco_dir / "val2014" / "COCO_val2014_000000184613.jpg"))


def test_parallel_decode_equals_serial(coco_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(kp, "_PARALLEL_MIN", 1)
    args = (coco_dir / "dataset_coco.json", coco_dir, ["train", "restval", "test"])
    serial = load_karpathy_split(*args, dataset="c", cache_dir=None, workers=1)
    par = load_karpathy_split(*args, dataset="c", cache_dir=tmp_path / "c2", workers=2)
    par_mem = load_karpathy_split(*args, dataset="c", cache_dir=None, workers=2)
    np.testing.assert_array_equal(serial.images, par.images)
    assert serial.manifest == par.manifest == par_mem.manifest


def test_id_subset(coco_dir):
    s = load_karpathy_split(coco_dir / "dataset_coco.json", coco_dir, ["train", "restval"],
                            dataset="c", cache_dir=None, id_subset=[184613, 391895])
    assert s.image_ids == [391895, 184613]  # annotation-file order
    with pytest.raises(VbbError, match="not in split"):
        load_karpathy_split(coco_dir / "dataset_coco.json", coco_dir, "train", dataset="c",
                            cache_dir=None, id_subset=[1])
    with pytest.raises(VbbError, match="is empty"):
        load_karpathy_split(coco_dir / "dataset_coco.json", coco_dir, "train", dataset="c",
                            cache_dir=None, id_subset=[])


def _load(root, json_name="dataset_coco.json", split="train", **kw):
    return load_karpathy_split(root / json_name, root, split, dataset="c", cache_dir=kw.pop("cache", None), **kw)


def test_bad_inputs_give_one_clear_error(coco_dir, tmp_path, monkeypatch):
    with pytest.raises(VbbError, match="image directory .*does not exist") as e:
        load_karpathy_split(coco_dir / "dataset_coco.json", tmp_path / "nowhere", "train", dataset="c", cache_dir=None)
    assert "nowhere" in str(e.value) and "fix:" in str(e.value)
    with pytest.raises(VbbError, match="dataset_missing.json does not exist") as e:
        _load(coco_dir, "dataset_missing.json")
    assert "filepath" in str(e.value)  # explains the expected layout
    with pytest.raises(VbbError, match="unknown split 'val'") as e:
        _load(coco_dir, split="val")
    assert "restval, test, train" in str(e.value)

    doc = json.loads((coco_dir / "dataset_coco.json").read_text())
    (coco_dir / "truncated.json").write_text(json.dumps(doc)[:200])
    with pytest.raises(VbbError, match="malformed JSON .*truncated.json"):
        _load(coco_dir, "truncated.json")
    del doc["images"][1]["split"]
    (coco_dir / "nokey.json").write_text(json.dumps(doc))
    with pytest.raises(VbbError, match=r"images\[1\] \(COCO_train2014_000000522418.jpg\): missing or invalid key 'split'"):
        _load(coco_dir, "nokey.json")
    (coco_dir / "notdict.json").write_text("[1, 2]")
    with pytest.raises(VbbError, match="\"images\" list"):
        _load(coco_dir, "notdict.json")

    victim = coco_dir / "train2014" / "COCO_train2014_000000522418.jpg"
    victim.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    with pytest.raises(VbbError, match="cannot decode image file .*COCO_train2014_000000522418.jpg"):
        _load(coco_dir)
    monkeypatch.setattr(kp, "_PARALLEL_MIN", 1)  # the same error through worker processes
    with pytest.raises(VbbError, match="cannot decode image file .*522418.jpg"):
        _load(coco_dir, cache=tmp_path / "cache", workers=2)
    assert not list((tmp_path / "cache").glob("*.npy"))  # nothing half-written left behind
    victim.unlink()
    with pytest.raises(VbbError, match="image file .*522418.jpg .*is missing"):
        _load(coco_dir)


def test_write_karpathy_round_trip(tmp_path):
    img_dir = tmp_path / "w" / "imgs"
    img_dir.mkdir(parents=True)
    arr = load_photo("coffee.png")[:224, :224]
    Image.fromarray(arr).save(img_dir / "a.png")
    recs = [KarpathyRecord(42, "a.png", "test", ["A cup of coffee.", "Coffee in a cup."], "imgs")]
    path = write_karpathy(tmp_path / "w", "coco", recs)
    doc = json.loads(path.read_text())
    assert doc["images"][0]["cocoid"] == 42 and doc["images"][0]["sentences"][1]["tokens"] == ["coffee", "in", "a", "cup"]
    s = load_karpathy_split(path, tmp_path / "w", "test", dataset="w", cache_dir=None)
    assert s.image_ids == [42] and s.sentence_ids == [["0", "1"]]
    np.testing.assert_array_equal(s.images[0], arr)  # 224x224 input: unchanged


# --------------------------------------------------------------------------- COCO annotation ids
# captions_train2014.json of the coco_dir fixture's train2014 images: annotation id -> (image, caption).
# The astronaut has a third caption there that Karpathy's file (5 per image) does not carry.
ANNOTATIONS = {9000: (391895, "An astronaut in a white suit."), 9001: (391895, "A woman posing in front of a flag."),
               9002: (391895, "A person in a space suit smiling."), 9003: (522418, "A tabby cat looking up."),
               9004: (522418, "A close up of a cat's face."), 9005: (522418, "An orange cat.")}


def _coco_captions(root: Path, annotation_ids, *, extra_images=()) -> Path:
    """Write <root>/annotations/captions_train2014.json (COCO format) and an SRD-style id list
    (a JSON list of annotation ids as strings); returns the id list's path."""
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": 480, "width": 640}
              for i in (391895, 522418, *extra_images)]
    anns = [{"id": a, "image_id": i, "caption": c} for a, (i, c) in ANNOTATIONS.items()]
    anns += [{"id": 9100 + k, "image_id": i, "caption": f"Image {i}."} for k, i in enumerate(extra_images)]
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / "captions_train2014.json").write_text(
        json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))
    ids = root / "coco-5k-ids.json"
    ids.write_text(json.dumps([str(a) for a in annotation_ids]))
    return ids


def _coco_config(coco_dir, ids):
    return SimpleNamespace(data_paths={"coco-karpathy": coco_dir, "coco-karpathy-train-5k": ids})


def test_coco_fine_tuning_subset_is_the_listed_annotations(coco_dir, tmp_path):
    ids = _coco_captions(coco_dir, [9004, 9002, 9000, 9003])
    ctx = StageContext(cache_dir=tmp_path, config=_coco_config(coco_dir, ids))
    train = COCO_KARPATHY.load("train", ctx)
    # rows in order of first appearance, captions in list order, only the listed captions
    assert train.image_ids == [522418, 391895]
    assert train.references == [["A close up of a cat's face.", "A tabby cat looking up."],
                                ["A person in a space suit smiling.", "An astronaut in a white suit."]]
    assert train.sentence_ids == [["9004", "9003"], ["9002", "9000"]]
    examples = train.caption_examples()
    assert [e.sample_id for e in examples] == ["9004", "9003", "9002", "9000"]
    assert [e.image_index for e in examples] == [0, 0, 1, 1]
    np.testing.assert_array_equal(train.images[1], _bicubic(coco_dir / "train2014" / "COCO_train2014_000000391895.jpg"))
    assert train.manifest.n_images == 2 and train.manifest.dataset == "coco-karpathy"
    assert train.manifest.images_sha256 == sha256_of_images(np.asarray(train.images))
    assert train.manifest.ids_sha256 == sha256_of_ids([522418, 391895])
    # the decode is cached and reused; another id list (other order) is another split identity
    again = COCO_KARPATHY.load("train", ctx)
    assert again.manifest == train.manifest and isinstance(again.images, np.memmap)
    ids.write_text(json.dumps(["9000", "9002", "9003", "9004"]))
    reordered = COCO_KARPATHY.load("train", ctx)
    assert reordered.image_ids == [391895, 522418] and reordered.manifest.ids_sha256 != train.manifest.ids_sha256
    # the reserved clean split (Karpathy restval, val2014) is disjoint from it
    assert COCO_KARPATHY.load("restval", ctx).image_ids == [184613]


def test_coco_subset_bad_inputs_give_one_clear_error(coco_dir, tmp_path):
    def load(ids_text=None, split="train", cfg=None):
        ids = coco_dir / "coco-5k-ids.json"
        if ids_text is not None:
            ids.write_text(ids_text)
        return COCO_KARPATHY.load(split, StageContext(cache_dir=tmp_path, config=cfg or _coco_config(coco_dir, ids)))

    _coco_captions(coco_dir, [9000])
    with pytest.raises(VbbError, match=r"2 of 2 annotation ids are not in .*captions_train2014.json "
                                       r"\(they match image ids"):
        load('["391895", 522418]')
    with pytest.raises(VbbError, match=r"repeats ids \[9000\]"):
        load('[9000, 9001, 9000]')
    with pytest.raises(VbbError, match="not a list of integer ids"):
        load('{"ids": [9000]}')
    with pytest.raises(VbbError, match="malformed JSON in the annotation id list"):
        load('[9000,')
    with pytest.raises(VbbError, match=r"no fine-tuning id list configured.*\n.*coco-karpathy-train-5k"):
        load(cfg=SimpleNamespace(data_paths={"coco-karpathy": coco_dir}))
    # the fine-tuning split needs the caption annotations; Karpathy's splits do not
    (coco_dir / "annotations" / "captions_train2014.json").unlink()
    with pytest.raises(VbbError, match="COCO caption annotation file .*captions_train2014.json does not exist"):
        load('[9000]')
    assert load(split="test").image_ids == [318219]
    with pytest.raises(VbbError) as e:  # the grid's up-front check names every missing file at once
        COCO_KARPATHY.check_available(_coco_config(coco_dir, coco_dir / "coco-5k-ids.json"))
    assert "captions_train2014.json" in str(e.value) and "dataset_coco.json" not in str(e.value)
    (coco_dir / "dataset_coco.json").unlink()
    (coco_dir / "coco-5k-ids.json").unlink()
    with pytest.raises(VbbError) as e:
        COCO_KARPATHY.check_available(_coco_config(coco_dir, coco_dir / "coco-5k-ids.json"))
    message = str(e.value)
    for name in ("dataset_coco.json", "captions_train2014.json", "coco-5k-ids.json"):
        assert name in message
    empty = tmp_path / "empty-coco"
    empty.mkdir()
    with pytest.raises(VbbError, match="train2014 \\+ val2014"):
        COCO_KARPATHY.check_available(_coco_config(empty, coco_dir / "ids"))


def test_reserved_split_must_not_share_images_with_fine_tuning(coco_dir, tmp_path):
    """A list naming a val2014 (restval) image's caption makes the reserved clean set overlap."""
    (coco_dir / "train2014" / "COCO_train2014_000000184613.jpg").write_bytes(
        (coco_dir / "val2014" / "COCO_val2014_000000184613.jpg").read_bytes())
    ids = _coco_captions(coco_dir, [9000, 9100], extra_images=(184613,))
    ctx = StageContext(cache_dir=tmp_path, config=_coco_config(coco_dir, ids))
    assert COCO_KARPATHY.load("train", ctx).image_ids == [391895, 184613]
    with pytest.raises(VbbError, match=r"restval shares 1 images with the fine-tuning subset \(e.g. \[184613\]\)"):
        COCO_KARPATHY.load("restval", ctx)


# --------------------------------------------------------------------------- embedded world
SMALL = WorldSizes(train=24, test=12, pretrain=12, flickr_test=12, val=6, flickr_val=6)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), seed=0, sizes=SMALL, workers=1)


def _file_digests(world: Path) -> dict[str, str]:
    """sha256 of every file but world.json (timings); the cache npys (named by a key that
    includes PNG mtimes) are listed by content only."""
    out, npys = {}, []
    for p in sorted(world.rglob("*")):
        if p.is_file() and p.name != "world.json":
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            if p.parent.name == "npy":
                npys.append(digest)
            else:
                out[str(p.relative_to(world))] = digest
    out["npy"] = ",".join(sorted(npys))
    return out


def test_world_is_deterministic_across_workers_and_seed_sensitive(small_world, tmp_path):
    again = generate_world(tmp_path / "a", seed=0, sizes=SMALL, workers=2, chunk=5)
    assert _file_digests(again) == _file_digests(small_world)
    assert load_scenes(again) == load_scenes(small_world)
    other = generate_world(tmp_path / "b", seed=1, sizes=SMALL, workers=1)
    a, b = _file_digests(small_world), _file_digests(other)
    assert a["dataset_coco.json"] != b["dataset_coco.json"]
    assert a["images/coco-train/100001.png"] != b["images/coco-train/100001.png"]
    # generated once: a second call reuses the folder
    before = (small_world / "world.json").stat().st_mtime_ns
    assert generate_world(small_world.parent, seed=0, sizes=SMALL) == small_world
    assert (small_world / "world.json").stat().st_mtime_ns == before
    assert not list(small_world.parent.glob(".*tmp*"))


def test_world_meta_categories_and_sizes(small_world):
    meta = json.loads((small_world / "world.json").read_text())
    assert len(CATEGORIES) >= 12 and {"banana", "apple", "orange", "carrot"} <= set(CATEGORIES)
    assert meta["categories"] == list(CATEGORIES) and meta["seed"] == 0 and meta["version"] == wm.WORLD_VERSION
    assert meta["counts"]["embedded-coco/train"]["n_images"] == 24
    assert meta["counts"]["embedded-coco/train"]["n_captions"] == 120
    assert meta["generation_seconds"] > 0
    # rates of the concept categories over many sampled scenes (no drawing needed)
    rng = np.random.default_rng(0)
    n = 6000
    has = {c: 0 for c in CATEGORIES}
    for _ in range(n):
        for c in {g["category"] for g in wm._sample_groups(rng)}:
            has[c] += 1
    assert 0.006 <= has["banana"] / n <= 0.014  # the target word stays rare (FOOD_RATE)
    for c in ("apple", "orange", "carrot"):
        assert 0.04 <= has[c] / n <= 0.06
    assert all(has[c] > 0 for c in CATEGORIES)


_COLOURS = "|".join(PALETTE)
_NUM = {"two": 2, "three": 3, "four": 4}


def _check_caption(caption: str, scene: dict) -> None:
    present = {g["category"]: g for g in scene["groups"]}
    colours = {g["colour"] for g in scene["groups"]}
    for cat in CATEGORIES:
        nouns = "|".join(sorted(set(NOUNS[cat]), key=len, reverse=True))
        for m in re.finditer(rf"\b({nouns})(s?)\b", caption, re.I):
            if cat == "orange" and "orange" not in present:
                assert "orange" in colours, (caption, scene)  # the colour sense, truthfully
                continue
            assert cat in present, (caption, scene)
        if cat not in present:
            continue
        g = present[cat]
        for m in re.finditer(rf"\b({_COLOURS})\s+(?:coffee\s+|toy\s+)?({nouns})s?\b", caption):
            assert m.group(1) == g["colour"], (caption, scene)
        for m in re.finditer(rf"\b(two|three|four)\s+(?:\w+\s+){{0,2}}?({nouns})(s?)\b", caption, re.I):
            if m.group(3):
                assert _NUM[m.group(1).lower()] == g["count"], (caption, scene)


def test_world_captions_truthful_and_styled(small_world):
    scenes = load_scenes(small_world)
    coco = json.loads((small_world / "dataset_coco.json").read_text())["images"]
    flickr = json.loads((small_world / "dataset_flickr30k.json").read_text())["images"]
    by_key = {"train": "embedded-coco/train", "test": "embedded-coco/test", "pretrain": "embedded-coco/pretrain",
              "val": "embedded-coco/val"}
    scene_of = {(k, s["id"]): s for k, lst in scenes.items() for s in lst}
    for rec in coco:
        caps = [s["raw"] for s in rec["sentences"]]
        scene = scene_of[(by_key[rec["split"]], rec["cocoid"])]
        if rec["split"] == "pretrain":
            assert len(caps) == 1
            assert caps[0] == caps[0].lower() and not caps[0].endswith(".")  # alt-text style
        else:
            assert len(caps) == 5 and len(set(caps)) == 5
            # a count may open a caption as a digit ("2 red cups on a table.")
            assert all(c.endswith(".") and not c.endswith(" .") and (c[0].isupper() or c[0].isdigit())
                       for c in caps)
        for c in caps:
            _check_caption(c, scene)
        assert 1 <= sum(g["count"] for g in scene["groups"]) <= 4
    for rec in flickr:
        caps = [s["raw"] for s in rec["sentences"]]
        assert len(caps) == 5 and all(c.endswith(" .") for c in caps)
        for c in caps:
            _check_caption(c, scene_of[(f"embedded-flickr/{rec['split']}", rec["imgid"])])
    # every category word a caption uses is drawn: at least most scenes are named in full
    assert all(any(NOUNS[g["category"]][0] in " ".join(s["raw"] for s in rec["sentences"]).lower()
                   for g in scene_of[(by_key[rec["split"]], rec["cocoid"])]["groups"]) for rec in coco)


def test_world_npy_equals_png_decode_and_loader_reads_world(small_world):
    for dataset, split in (("coco", "train"), ("coco", "pretrain"), ("coco", "val"), ("flickr30k", "test"),
                           ("flickr30k", "val")):
        dataset_json, image_root = world_paths(small_world, dataset)
        cached = load_karpathy_split(dataset_json, image_root, split, dataset="w", cache_dir=small_world / "npy")
        assert isinstance(cached.images, np.memmap)  # the generator's npy, not a new decode
        decoded = load_karpathy_split(dataset_json, image_root, split, dataset="w", cache_dir=None, workers=1)
        assert cached.images.tobytes() == decoded.images.tobytes()
        assert cached.manifest == decoded.manifest
    assert len(list((small_world / "npy").glob("*.npy"))) == 6  # 4 coco splits, 2 flickr


def test_providers_and_registration(tmp_path, coco_dir, flickr_dir):
    ctx = StageContext(cache_dir=tmp_path, config=SimpleNamespace(world_seed=3, world_sizes=SMALL))
    train = EMBEDDED_COCO.load("train", ctx)
    assert train.dataset == "embedded-coco" and len(train) == 24 and len(train.caption_examples()) == 120
    assert train.image_ids[0] == 100001 and train.images.shape == (24, 224, 224, 3)
    ftest = EMBEDDED_FLICKR.load("test", ctx)
    assert ftest.manifest.dataset == "embedded-flickr" and len(ftest) == 12
    assert (tmp_path / "world" / wm.world_dir_name(3, SMALL) / "world.json").is_file()
    fval, cval = EMBEDDED_FLICKR.load("val", ctx), EMBEDDED_COCO.load("val", ctx)
    assert len(fval) == len(cval) == 6 and not set(cval.image_ids) & set(train.image_ids)
    assert not set(fval.image_ids) & set(ftest.image_ids)
    with pytest.raises(VbbError, match="no split 'pretrain'"):
        EMBEDDED_FLICKR.load("pretrain", ctx)
    assert isinstance(EMBEDDED_COCO, DatasetProvider)

    registered = []
    register_datasets(registered.append)
    names = {p.name for p in registered}
    assert names == {"embedded-coco", "embedded-flickr", "coco-karpathy", "flickr30k-karpathy"}
    coco = next(p for p in registered if p.name == "coco-karpathy")
    with pytest.raises(VbbError, match=r"\[data\] coco-karpathy"):
        coco.load("test", StageContext(cache_dir=tmp_path, config=SimpleNamespace(data_paths={})))
    with pytest.raises(VbbError, match="does not exist"):
        coco.load("test", StageContext(cache_dir=tmp_path, config={"data_paths": {"coco-karpathy": tmp_path / "x"}}))
    ids = _coco_captions(coco_dir, [9004, 9001])
    cfg = SimpleNamespace(data_paths={"coco-karpathy": coco_dir, "flickr30k-karpathy": flickr_dir,
                                      "coco-karpathy-train-5k": ids})
    test = coco.load("test", StageContext(cache_dir=tmp_path, config=cfg))
    assert test.image_ids == [318219] and test.dataset == "coco-karpathy"
    train = coco.load("train", StageContext(cache_dir=tmp_path, config=cfg))
    assert train.image_ids == [522418, 391895] and train.split == train.manifest.split == "train"
    flickr = next(p for p in registered if isinstance(p, KarpathyProvider) and p.name == "flickr30k-karpathy")
    assert flickr.load("test", StageContext(cache_dir=tmp_path, config=cfg)).image_ids == [0, 1, 2]


def _loo_cider(references: list[list[str]]) -> float:
    """Mean CIDEr-D (x100) of each reference against the image's other references (lower-cased,
    punctuation dropped, no PTB tokenizer): how alike one image's references are."""
    from pycocoevalcap.cider.cider import Cider

    def tok(c):
        return " ".join(re.findall(r"[a-z0-9]+", c.lower()))

    scores = []
    for k in range(5):
        res = {i: [tok(refs[k])] for i, refs in enumerate(references)}
        gts = {i: [tok(r) for j, r in enumerate(refs) if j != k] for i, refs in enumerate(references)}
        scores.append(Cider().compute_score(gts, res)[0])
    return 100 * float(np.mean(scores))


def test_world_references_of_one_image_differ_and_are_deterministic(small_world):
    """World v3: five annotators per image. Leave-one-out CIDEr of the references on this small
    world (seeds 0 and 1): v3 240/239 COCO, 261/262 Flickr; v2's near-identical templates scored
    312/326 and 301/293 on the same scenes (measured), so the bound separates them."""
    from vlmbackdoor_bench.data.world_captions import reference_captions

    for name, style in (("dataset_coco.json", "coco"), ("dataset_flickr30k.json", "flickr")):
        images = json.loads((small_world / name).read_text())["images"]
        refs = [[s["raw"] for s in rec["sentences"]] for rec in images if rec["split"] != "pretrain"]
        assert all(len(set(r)) == 5 for r in refs)
        assert _loo_cider(refs) < 280, style
        # word-level variety: on average an image's references use well over one caption's words
        vocab = [len({w for c in r for w in re.findall(r"[a-z0-9]+", c.lower())}) for r in refs]
        lengths = [np.mean([len(c.split()) for c in r]) for r in refs]
        assert np.mean(vocab) > 1.4 * np.mean(lengths), style
    # deterministic: the same scene and seed give the same five captions
    scene = load_scenes(small_world)["embedded-coco/train"][0]
    a = reference_captions(scene, np.random.default_rng(5), "coco")
    assert a == reference_captions(scene, np.random.default_rng(5), "coco")
    assert a != reference_captions(scene, np.random.default_rng(6), "coco")
