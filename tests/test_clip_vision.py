"""The CLIP vision adapter (vlmbackdoor_bench.victims.clip_vision) on a tiny random CLIP written in HF's format.

The open_clip comparison installs open_clip_torch==2.20.0 with ``--no-deps`` into a throwaway directory and
imports only its ``transformer`` module (its package ``__init__`` needs torchvision, methods/victim.md §B1).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, GPT2Config, GPT2LMHeadModel  # noqa: E402

from vlmbackdoor_bench.errors import VbbError  # noqa: E402
from vlmbackdoor_bench.victims.clip_vision import load_clip_vision  # noqa: E402
from vlmbackdoor_bench.victims.flamingo import Flamingo  # noqa: E402

# ViT-L/14's shape at toy size: width 48, 2 layers, 4 heads, 28 px / patch 7 = 16 tokens, projection 24.
WIDTH, LAYERS, HEADS, IMAGE, PATCH, PROJ = 48, 2, 4, 28, 7, 24


def tiny_clip_config() -> CLIPConfig:
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  image_size=IMAGE, patch_size=PATCH, hidden_act="quick_gelu")  # OpenAI CLIP's activation
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJ)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A full CLIPModel (text tower included) saved as config.json + model.safetensors; LayerNorms randomised."""
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config()).eval()
    with torch.no_grad():  # default LayerNorm weights (1, 0) would hide a missing or misplaced norm
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    directory = tmp_path_factory.mktemp("clip")
    model.save_pretrained(directory)
    return directory, model


def pixels(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def test_tokens_and_pooled_match_a_manual_computation_from_hf_outputs(clip_dir):
    directory, reference = clip_dir
    adapter = load_clip_vision(directory)
    x = pixels()
    with torch.no_grad():
        pooled, tokens = adapter(x)
        out = reference.vision_model(pixel_values=x)
        hidden = out.last_hidden_state
        expected_pooled = reference.visual_projection(reference.vision_model.post_layernorm(hidden[:, 0]))
    assert tokens.shape == (2, (IMAGE // PATCH) ** 2, WIDTH) and pooled.shape == (2, PROJ)
    torch.testing.assert_close(tokens, hidden[:, 1:], rtol=0, atol=0)  # no CLS, no post-LN (methods/victim.md §A1)
    torch.testing.assert_close(pooled, expected_pooled, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pooled, reference.get_image_features(pixel_values=x).pooler_output,
                               rtol=1e-6, atol=1e-6)
    assert (adapter.vis_dim, adapter.embed_dim, adapter.image_size, adapter.patch_size, adapter.num_tokens) == (
        WIDTH, PROJ, IMAGE, PATCH, 16)
    assert adapter.arch()["tokens_after_post_ln"] is False


def test_post_ln_knob_puts_post_layernorm_on_the_tokens(clip_dir):
    directory, reference = clip_dir
    plain, after = load_clip_vision(directory), load_clip_vision(directory, tokens_after_post_ln=True)
    x = pixels()
    with torch.no_grad():
        pooled_plain, tokens_plain = plain(x)
        pooled_after, tokens_after = after(x)
        ln = reference.vision_model.post_layernorm
        by_hand = torch.nn.functional.layer_norm(tokens_plain, (WIDTH,), ln.weight, ln.bias, ln.eps)
    torch.testing.assert_close(tokens_after, by_hand, rtol=1e-6, atol=1e-6)
    assert (tokens_after - tokens_plain).abs().max() > 0.1  # the knob changes the features
    torch.testing.assert_close(pooled_after, pooled_plain, rtol=0, atol=0)  # the pooled output never changes
    assert after.arch()["tokens_after_post_ln"] is True


def test_frozen_eval_and_gradients_reach_the_pixels(clip_dir):
    adapter = load_clip_vision(clip_dir[0])
    assert not any(p.requires_grad for p in adapter.parameters())
    adapter.train()  # a surrounding model.train() must not switch the frozen encoder to training
    assert not adapter.training and not adapter.clip.training
    x = pixels().requires_grad_(True)
    pooled, tokens = adapter(x)
    (tokens.square().mean() + pooled.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in adapter.parameters())


def test_flamingo_uses_the_adapter_without_a_visual_attribute(clip_dir):
    """Our Flamingo calls ``vision_encoder(pixels)[1]``: the adapter needs no open_clip-style ``.visual``."""
    adapter = load_clip_vision(clip_dir[0])
    assert not hasattr(adapter, "visual")
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    model = Flamingo(adapter, lm, eoc_token_id=48, media_token_id=49, vis_dim=adapter.vis_dim,
                     perceiver_kwargs=dict(depth=1, dim_head=8, heads=2, num_latents=4),
                     cross_attn_kwargs=dict(dim_head=8, heads=2)).eval()
    with torch.no_grad():
        media = model.encode_vision_x(pixels(2).reshape(2, 1, 1, 3, IMAGE, IMAGE))
        out = model(pixels(2).reshape(2, 1, 1, 3, IMAGE, IMAGE), torch.tensor([[49, 3, 4], [49, 5, 6]]))
    model.lang_encoder.clear_conditioned_layers()
    assert media.shape == (2, 1, 4, WIDTH) and out.logits.shape == (2, 3, 50)


def test_bin_weights_and_bf16(clip_dir, tmp_path):
    directory, _ = clip_dir
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    torch.save(load_file(str(directory / "model.safetensors")), tmp_path / "pytorch_model.bin")
    x = pixels()
    with torch.no_grad():
        from_bin = load_clip_vision(tmp_path)(x)
        from_safetensors = load_clip_vision(directory)(x)
        pooled16, tokens16 = load_clip_vision(directory, dtype=torch.bfloat16)(x)
    torch.testing.assert_close(from_bin, from_safetensors, rtol=0, atol=0)
    assert tokens16.dtype == torch.bfloat16
    torch.testing.assert_close(tokens16.float(), from_safetensors[1], rtol=0.05, atol=0.1)


def test_bad_directories_raise_one_clear_error(clip_dir, tmp_path):
    directory, _ = clip_dir
    with pytest.raises(VbbError, match="no CLIP config.json"):
        load_clip_vision(tmp_path)
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(VbbError, match="no CLIP weights"):
        load_clip_vision(tmp_path)
    state = load_file(str(directory / "model.safetensors"))
    del state["vision_model.encoder.layers.1.mlp.fc2.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(VbbError, match="vision_model.encoder.layers.1.mlp.fc2.weight"):
        load_clip_vision(tmp_path)
    vision_only = tmp_path / "vision_only"
    vision_only.mkdir()
    CLIPVisionConfig(**tiny_clip_config().vision_config.to_dict()).save_pretrained(vision_only)
    (vision_only / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    with pytest.raises(VbbError, match="not a full CLIPModel config"):
        load_clip_vision(vision_only)
    with pytest.raises(VbbError, match="pixels have shape"):
        load_clip_vision(directory)(torch.zeros(1, 3, IMAGE + 1, IMAGE + 1))


# ---------------------------------------------------------------- open_clip 2.20 reference


@pytest.fixture(scope="module")
def open_clip_transformer(tmp_path_factory):
    """open_clip 2.20's ``transformer`` module from a --no-deps install, with stub packages (no torchvision)."""
    target = tmp_path_factory.mktemp("open_clip_ref")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
           "--retries", "1", "--timeout", "20", "--target", str(target), "open_clip_torch==2.20.0"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"reference open_clip_torch==2.20.0 could not be installed with pip ({e})")
    if r.returncode != 0:
        pytest.skip(f"reference open_clip_torch==2.20.0 could not be installed with pip: {r.stderr.strip()[-300:]}")
    stubs = {"open_clip": str(target / "open_clip")}  # a package stub: its __init__ (imports torchvision) never runs
    saved = {name: sys.modules.get(name) for name in
             ("open_clip", "open_clip.utils", "open_clip.transformer", "torchvision", "torchvision.ops",
              "torchvision.ops.misc")}
    package = types.ModuleType("open_clip")
    package.__path__ = [stubs["open_clip"]]
    sys.modules["open_clip"] = package
    # open_clip.utils imports FrozenBatchNorm2d from torchvision for ResNet freezing only; a stub suffices.
    for name in ("torchvision", "torchvision.ops"):
        stub = types.ModuleType(name)
        stub.__path__ = []
        sys.modules[name] = stub
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    sys.modules["torchvision.ops.misc"] = misc
    try:
        yield importlib.import_module("open_clip.transformer")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP vision weights under open_clip's VisionTransformer names (q/k/v fused, projection transposed)."""
    hf = {k.removeprefix("vision_model."): v for k, v in state.items()}
    out = {"conv1.weight": hf["embeddings.patch_embedding.weight"],
           "class_embedding": hf["embeddings.class_embedding"],
           "positional_embedding": hf["embeddings.position_embedding.weight"],
           "ln_pre.weight": hf["pre_layrnorm.weight"], "ln_pre.bias": hf["pre_layrnorm.bias"],
           "ln_post.weight": hf["post_layernorm.weight"], "ln_post.bias": hf["post_layernorm.bias"],
           "proj": state["visual_projection.weight"].t()}
    for i in range(LAYERS):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        attn = src + "self_attn."
        out[dst + "attn.in_proj_weight"] = torch.cat([hf[attn + f"{p}_proj.weight"] for p in "qkv"])
        out[dst + "attn.in_proj_bias"] = torch.cat([hf[attn + f"{p}_proj.bias"] for p in "qkv"])
        for kind in ("weight", "bias"):
            out[dst + f"attn.out_proj.{kind}"] = hf[attn + f"out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = hf[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = hf[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = hf[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = hf[src + f"mlp.fc2.{kind}"]
    return out


def test_equivalent_to_open_clip_2_20_tokens_and_pooled(clip_dir, open_clip_transformer):
    directory, _ = clip_dir
    oc = open_clip_transformer
    visual = oc.VisionTransformer(image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=LAYERS, heads=HEADS,
                                  mlp_ratio=4.0, output_dim=PROJ, act_layer=oc.QuickGELU, output_tokens=True).eval()
    visual.load_state_dict(to_open_clip(load_file(str(directory / "model.safetensors"))), strict=True)
    adapter = load_clip_vision(directory)
    x = pixels(3, seed=5)
    with torch.no_grad():
        ref_pooled, ref_tokens = visual(x)
        pooled, tokens = adapter(x)
    assert tokens.shape == ref_tokens.shape == (3, 16, WIDTH)
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-5)
    # open_clip >= 2.23 normalises the tokens with ln_post too: that is the knob's order.
    with torch.no_grad():
        _, tokens_after = load_clip_vision(directory, tokens_after_post_ln=True)(x)
    torch.testing.assert_close(tokens_after, visual.ln_post(ref_tokens), rtol=1e-5, atol=1e-5)
