"""openflamingo-mini: the miniature real-format artifacts of the openflamingo-3b profile.

Written once per module (about 5 s); each test reads them with the real loaders or breaks a copy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlmbackdoor_bench.data import COCO_KARPATHY, FLICKR30K_KARPATHY
from vlmbackdoor_bench.fixtures.mini_broken import BROKEN, write_broken
from vlmbackdoor_bench.fixtures.mini_config import MiniConfig, MiniPaths
from vlmbackdoor_bench.fixtures.openflamingo_mini import (
    NEOX_EOS, NEOX_PADDING, main, write_clip, write_openflamingo_mini,
)
from vlmbackdoor_bench.hookspecs import StageContext
from vlmbackdoor_bench.victims.clip_vision import load_clip_vision
from vlmbackdoor_bench.victims.mosaic_gpt import load_mosaic_gpt
from vlmbackdoor_bench.victims.neox_tokenizer import load_openflamingo_tokenizer

CFG = MiniConfig()


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> MiniPaths:
    return write_openflamingo_mini(tmp_path_factory.mktemp("mini"), CFG)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_writing_is_deterministic_and_seeded(mini, tmp_path, capsys):
    assert main([str(tmp_path / "again")]) == 0
    assert "openflamingo-mini written to" in capsys.readouterr().out
    first, again = _digests(mini.root), _digests(tmp_path / "again")
    assert first == again and len(first) > 80
    for part in ("clip-vit-l14/model.safetensors", "mpt-1b/pytorch_model.bin", "tokenizer/tokenizer.json",
                 "openflamingo/checkpoint.pt", "coco/dataset_coco.json", "coco/annotations/captions_train2014.json",
                 "coco/coco-5k-1-random.json", "flickr30k/dataset_flickr30k.json"):
        assert part in first
    write_clip(tmp_path / "seed1", MiniConfig(seed=1))
    assert _digests(tmp_path / "seed1")["model.safetensors"] != first["clip-vit-l14/model.safetensors"]


def test_clip_directory_is_an_hf_clip_model(mini):
    from transformers import CLIPModel

    config = json.loads((mini.clip / "config.json").read_text())
    assert config["model_type"] == "clip" and {"vision_config", "text_config"} <= set(config)
    model = CLIPModel.from_pretrained(mini.clip, local_files_only=True)
    vision = model.config.vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (
        CFG.image_size, CFG.clip_patch, CFG.clip_width, CFG.clip_layers)
    adapter = load_clip_vision(mini.clip)
    pooled, tokens = adapter(torch.zeros(2, 3, CFG.image_size, CFG.image_size))
    n_tokens = (CFG.image_size // CFG.clip_patch) ** 2
    assert tokens.shape == (2, n_tokens, CFG.clip_width) and pooled.shape == (2, CFG.clip_projection)
    with torch.no_grad():  # same weights as the HF model: tokens = last hidden state without CLS
        hidden = model.vision_model(pixel_values=torch.zeros(2, 3, CFG.image_size, CFG.image_size)).last_hidden_state
    torch.testing.assert_close(tokens, hidden[:, 1:])


def test_tokenizer_is_gpt_neox_style(mini):
    from tokenizers import Tokenizer

    core = Tokenizer.from_file(str(mini.tokenizer / "tokenizer.json"))
    assert core.id_to_token(0) == NEOX_EOS and core.id_to_token(1) == NEOX_PADDING
    assert core.get_vocab_size() == CFG.tokenizer_vocab
    caption = "A red apple next to a blue cup ."
    ids = core.encode(caption).ids
    assert core.decode(ids) == caption and len(ids) < len(caption) // 2  # merges were learned
    special = json.loads((mini.tokenizer / "special_tokens_map.json").read_text())
    assert special == {"bos_token": NEOX_EOS, "eos_token": NEOX_EOS, "unk_token": NEOX_EOS}
    tokenizer, tokens = load_openflamingo_tokenizer(mini.tokenizer)
    # OpenFlamingo's tokens follow the base vocabulary; GPT-NeoX has no pad token, so <PAD> is added
    assert (tokens.base_length, tokens.openflamingo_length, tokens.length) == (
        CFG.tokenizer_vocab, CFG.tokenizer_vocab + 3, CFG.tokenizer_vocab + 4)
    assert tokens.pad_added and tokens.bos_id == tokens.eos_id == 0


def test_mpt_directory_is_mosaic_gpt_remote_code(mini):
    config = json.loads((mini.mpt / "config.json").read_text())
    assert config["model_type"] == "mosaic_gpt" and config["architectures"] == ["MosaicGPT"]
    assert config["attn_qk_ln"] and config["alibi"] and config["no_bias"]
    assert config["vocab_size"] % CFG.lm_vocab_multiple == 0 and config["vocab_size"] >= CFG.tokenizer_vocab
    state = torch.load(mini.mpt / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert "transformer.blocks.0.attn.q_ln.weight" in state and "transformer.wte.weight" in state
    assert not [k for k in state if k.endswith(".bias")]  # no biases anywhere, LayerNorms included
    assert "lm_head.weight" not in state  # tied output
    lm = load_mosaic_gpt(mini.mpt)
    assert lm.config.n_layers == CFG.lm_layers and lm.config.d_model == CFG.lm_width


def test_checkpoint_is_an_openflamingo_trainable_state_dict(mini):
    state = torch.load(mini.checkpoint, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    families = {k.split(".")[0] if k.startswith("perceiver.") else ".".join(k.split(".")[:3]) for k in state}
    assert families == {"perceiver", "lang_encoder.transformer.blocks", "lang_encoder.transformer.wte"}
    gated = {k.split(".")[3] for k in state if ".gated_cross_attn_layer." in k}
    assert gated == {str(i) for i in range(CFG.lm_layers)}  # one gated layer per MPT block
    assert not [k for k in state if k.startswith("lang_encoder.gated_cross_attn_layers.")]
    _, tokens = load_openflamingo_tokenizer(mini.tokenizer)
    wte = state["lang_encoder.transformer.wte.weight"]
    assert wte.shape == (tokens.openflamingo_length, CFG.lm_width)
    # base-vocabulary rows are the MPT's own (OpenFlamingo-3B trained only the new rows): LM and checkpoint pair
    lm_rows = load_mosaic_gpt(mini.mpt).transformer.wte.weight
    assert lm_rows.shape[0] > tokens.openflamingo_length  # MPT-1B's padded vocabulary
    torch.testing.assert_close(wte[: tokens.base_length], lm_rows[: tokens.base_length], rtol=0, atol=0)
    assert not torch.allclose(wte[tokens.base_length:], lm_rows[tokens.base_length: tokens.openflamingo_length])
    gates = [v.item() for k, v in state.items() if k.endswith(("attn_gate", "ff_gate"))]
    assert gates and all(g == CFG.gate_init for g in gates)


def test_datasets_in_coco_and_flickr_layouts(mini, tmp_path):
    coco = mini.data.coco
    ids = json.loads(mini.data.coco_ids.read_text())
    assert all(isinstance(i, str) for i in ids) and len(ids) == 5 * CFG.data.listed
    captions = json.loads((coco / "annotations" / "captions_train2014.json").read_text())
    assert len(captions["images"]) == CFG.data.listed + CFG.data.unlisted
    assert {int(i) for i in ids} < {a["id"] for a in captions["annotations"]}
    assert all((coco / "train2014" / im["file_name"]).is_file() and im["file_name"].startswith("COCO_train2014_")
               for im in captions["images"])
    config = SimpleNamespace(data_paths={k: Path(v) for k, v in mini.data_paths().items()})
    ctx = StageContext(cache_dir=tmp_path, config=config)
    train = COCO_KARPATHY.load("train", ctx)
    assert len(train) == CFG.data.listed and len(train.caption_examples()) == len(ids)
    assert sorted(s for sids in train.sentence_ids for s in sids) == sorted(ids)
    restval, test = COCO_KARPATHY.load("restval", ctx), COCO_KARPATHY.load("test", ctx)
    assert (len(restval), len(test)) == (CFG.data.restval, CFG.data.test)
    assert not set(restval.image_ids) & set(train.image_ids)
    flickr = FLICKR30K_KARPATHY.load("test", ctx)
    assert len(flickr) == CFG.data.flickr_test and all(len(r) == 5 for r in flickr.references)
    assert train.images.shape[1:] == (224, 224, 3)


def test_broken_variants_change_only_what_they_name(mini, tmp_path):
    state = torch.load(mini.checkpoint, map_location="cpu", weights_only=True)
    alias = write_broken(mini, "alias-mismatch", tmp_path / "alias")
    broken = torch.load(alias.checkpoint, map_location="cpu", weights_only=True)
    aliases = [k for k in broken if k.startswith("lang_encoder.gated_cross_attn_layers.")]
    assert len(aliases) == len([k for k in state if ".gated_cross_attn_layer." in k])

    def block_name(alias_key: str) -> str:  # lang_encoder.gated_cross_attn_layers.<i>.<rest>
        layer, rest = alias_key.split(".", 3)[2:]
        return f"lang_encoder.transformer.blocks.{layer}.gated_cross_attn_layer.{rest}"

    assert sum(not torch.equal(broken[k], broken[block_name(k)]) for k in aliases) == 1
    rows = write_broken(mini, "embedding-rows", tmp_path / "rows")
    assert torch.load(rows.checkpoint, weights_only=True)["lang_encoder.transformer.wte.weight"].shape[0] == \
        state["lang_encoder.transformer.wte.weight"].shape[0] - 1
    gone = write_broken(mini, "missing-tokenizer", tmp_path / "tok")
    assert not (gone.tokenizer / "tokenizer.json").exists() and (gone.mpt / "config.json").is_file()
    assert gone.data == mini.data
    with pytest.raises(KeyError, match="unknown broken variant"):
        write_broken(mini, "nope", tmp_path / "nope")
    assert set(BROKEN) >= {"alias-mismatch", "missing-key", "embedding-rows", "mismatched-lm"}


# --------------------------------------------------------------------------- through the profile
def _build_base(paths: MiniPaths, tmp_path: Path):
    from vlmbackdoor_bench.victims.profiles import OpenFlamingo3BProfile

    profile = OpenFlamingo3BProfile()
    params = profile.params({**paths.profile_params(), "finetune_epochs": 1, "finetune_batch_size": 4,
                             "finetune_micro_batch_size": 2, "decoding_batch_size": 4})
    profile.check_available(params)
    return profile.build_base(StageContext(cache_dir=tmp_path, config=None), params, None, None)


def test_profile_builds_the_victim_from_the_mini(mini, tmp_path):
    victim, log = _build_base(mini, tmp_path)
    assert victim.profile == "openflamingo-3b"
    report = log["checkpoint"]
    assert report["missing"] == report["unexpected"] == 0 and report["alias_family"] == "nested"
    assert report["base_row_drift"] == 0.0 and report["checkpoint_rows"] == CFG.tokenizer_vocab + 3
    images = COCO_KARPATHY.load("test", StageContext(cache_dir=tmp_path, config=SimpleNamespace(
        data_paths={k: Path(v) for k, v in mini.data_paths().items()}))).images[:2]
    captions = victim.generate(images)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    nll = victim.caption_nll(images, ["A red apple .", "Two chairs ."])
    assert nll.shape == (2,) and all(0 < v < 100 for v in nll)


# each variant -> (words the one error must contain)
BROKEN_MESSAGES = {
    "alias-mismatch": ("two names of one gated cross-attention tensor differ",),
    "missing-key": ("missing (1): perceiver.",),
    "embedding-rows": ("input embedding has", "rows", "OpenFlamingo's tokenizer"),
    "mismatched-lm": ("base-vocabulary embedding rows differ", "non-dolly"),
    "mismatched-lm-layers": ("gated cross-attention before 2 LM layers",),
    "missing-clip-weights": ("clip_vit_l14_dir", "model.safetensors"),
    "missing-mpt-weights": ("mpt_1b_dir", "pytorch_model.bin"),
    "missing-mpt-config": ("mpt_1b_dir", "config.json"),
    "missing-tokenizer": ("tokenizer_dir", "tokenizer.json"),
    "missing-checkpoint": ("openflamingo_checkpoint", "checkpoint.pt"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_broken_variant_gives_one_clear_error(mini, tmp_path, name):
    from vlmbackdoor_bench.errors import VbbError

    broken = write_broken(mini, name, tmp_path / name)
    with pytest.raises(VbbError) as e:
        _build_base(broken, tmp_path)
    message = str(e.value)
    assert all(word in message for word in BROKEN_MESSAGES[name]), message
    assert "fix:" in message and "Traceback" not in message


def test_grid_refuses_incomplete_data_before_building_anything(mini, tmp_path):
    """A run on the mini whose COCO folder lacks captions_train2014.json stops at once, naming it
    and the id list it also lacks; the store stays empty."""
    import shutil

    from vlmbackdoor_bench.config import parse_config
    from vlmbackdoor_bench.errors import VbbError
    from vlmbackdoor_bench.grid.runner import GridRunner
    from vlmbackdoor_bench.registry import load_registry

    coco = tmp_path / "coco"
    shutil.copytree(mini.data.coco, coco)
    (coco / "annotations" / "captions_train2014.json").unlink()
    data = {**mini.data_paths(), "coco-karpathy": str(coco), "coco-karpathy-train-5k": str(tmp_path / "ids.json")}
    config = parse_config({"benchmark": {"profile": "openflamingo-3b", "attacks": ["badnet"], "defenses": ["none"],
                                         "datasets": ["flickr30k"], "cache_dir": str(tmp_path / "cache")},
                           "profile": {"openflamingo-3b": mini.profile_params()}, "data": data}, None)
    runner = GridRunner(config, load_registry(config.plugin_dirs), log=lambda m: None)
    with pytest.raises(VbbError) as e:
        runner.run()
    assert "captions_train2014.json" in str(e.value) and "ids.json" in str(e.value)
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
