"""Our own Flamingo (vision encoder -> perceiver resampler -> HF causal LM with gated cross-attention).

Parameter names are identical to open-flamingo 2.0.1 so its checkpoints load (methods/victim.md §A1, §A6),
but the package itself cannot be a dependency (it pins torch 2.0.1 and imports open_clip, §B1).
Written in plain torch; tests/test_flamingo.py checks keys, logits and beam search against the package.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from vlmbackdoor_bench.errors import VbbError

# Perceiver and cross-attention defaults of open-flamingo 2.0.1's helpers.py (methods/victim.md §A1: "library defaults").
PERCEIVER_DEFAULTS: dict[str, Any] = dict(depth=6, dim_head=64, heads=8, num_latents=64, ff_mult=4)
CROSS_ATTN_DEFAULTS: dict[str, Any] = dict(dim_head=64, heads=8, ff_mult=4, only_attend_immediate_media=True)
# Where HF causal LMs keep their decoder layers (methods/victim.md §B1, last bullet).
KNOWN_DECODER_LAYER_PATHS = (
    "transformer.h", "model.decoder.layers", "model.layers", "gpt_neox.layers", "transformer.blocks")
# OpenFlamingo registers the gated layers and the original blocks a second time under these names (methods/victim.md §A6).
ALIAS_PREFIXES = ("lang_encoder.gated_cross_attn_layers.", "lang_encoder.old_decoder_blocks.")


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_path(obj: Any, path: str, value: Any) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(_get_path(obj, parent) if parent else obj, leaf, value)


def FeedForward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear; a Sequential so keys are ``.0/.1/.3`` as in OpenFlamingo."""
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., n, h*d) -> (b, h, ..., n, d): heads right after the batch dimension."""
    x = x.unflatten(-1, (heads, -1))
    return x.movedim(-2, 1)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_split_heads`."""
    return x.movedim(1, -2).flatten(-2)


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, scale: float,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    sim = (q * scale) @ k.transpose(-1, -2)
    if mask is not None:
        # A finite fill, not -inf: rows with no allowed media then softmax to uniform instead of NaN (as OpenFlamingo).
        sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    return sim.softmax(dim=-1)


class PerceiverAttention(nn.Module):
    """Latents attend to [media; latents] (Flamingo's resampler attention)."""

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.scale, self.heads = dim_head**-0.5, heads
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x: (b, T, n1, D) media features; latents: (b, T, n2, D)."""
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (_split_heads(t, self.heads) for t in (q, k, v))
        out = _softmax_attention(q, k, self.scale) @ v
        return self.to_out(_merge_heads(out))


class PerceiverResampler(nn.Module):
    """Maps (b, T, F, v, D) visual tokens to (b, T, num_latents, D)."""

    def __init__(self, *, dim: int, depth: int = 6, dim_head: int = 64, heads: int = 8, num_latents: int = 64,
                 max_num_media: int | None = None, max_num_frames: int | None = None, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.frame_embs = nn.Parameter(torch.randn(max_num_frames, dim)) if max_num_frames is not None else None
        self.media_time_embs = nn.Parameter(torch.randn(max_num_media, 1, dim)) if max_num_media is not None else None
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), FeedForward(dim, ff_mult)])
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, T, F = x.shape[:3]
        if self.frame_embs is not None:
            x = x + self.frame_embs[:F].unsqueeze(1)  # (F, 1, D) broadcasts over b, T and v
        x = x.flatten(2, 3)  # frames and spatial tokens form one sequence per media
        if self.media_time_embs is not None:
            x = x + self.media_time_embs[:T]
        latents = self.latents.expand(b, T, *self.latents.shape)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


class MaskedCrossAttention(nn.Module):
    """Text attends to perceiver latents of the media it is allowed to see."""

    def __init__(self, *, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8,
                 only_attend_immediate_media: bool = True):
        super().__init__()
        self.scale, self.heads = dim_head**-0.5, heads
        inner = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.only_attend_immediate_media = only_attend_immediate_media

    def forward(self, x: torch.Tensor, media: torch.Tensor, media_locations: torch.Tensor | None = None,
                use_cached_media: bool = False) -> torch.Tensor:
        """x: (B, T_txt, D); media: (B, T_img, n, D_vis); media_locations: bool (B, T_txt) marking <image>.

        With ``use_cached_media`` (KV-cached decoding) every token of x comes after the last cached media.
        """
        T_txt, (T_img, n) = x.shape[1], media.shape[1:3]
        q = self.to_q(self.norm(x))
        k, v = self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1)
        q, k, v = (_split_heads(t, self.heads) for t in (q, k, v))
        mask = text_time = None
        if media_locations is not None:
            if use_cached_media:
                text_time = media_locations.sum(dim=1, keepdim=True).expand(-1, T_txt)
            else:  # the i-th <image> token opens "media time" i for itself and the tokens after it
                text_time = media_locations.cumsum(dim=-1)
            media_time = torch.arange(1, T_img + 1, device=x.device).repeat_interleave(n)
            op = torch.eq if self.only_attend_immediate_media else torch.ge
            mask = op(text_time[:, None, :, None], media_time[None, None, None, :])
        attn = _softmax_attention(q, k, self.scale, mask)
        if text_time is not None and self.only_attend_immediate_media:
            attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)  # no image seen yet: attend to nothing
        return self.to_out(_merge_heads(attn @ v))


class GatedCrossAttentionBlock(nn.Module):
    """Cross-attention and feed-forward, each behind a tanh gate that starts closed (methods/victim.md §A1)."""

    def __init__(self, *, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8, ff_mult: int = 4,
                 only_attend_immediate_media: bool = True):
        super().__init__()
        self.attn = MaskedCrossAttention(dim=dim, dim_visual=dim_visual, dim_head=dim_head, heads=heads,
                                         only_attend_immediate_media=only_attend_immediate_media)
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))
        self.ff = FeedForward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x: torch.Tensor, media: torch.Tensor, media_locations: torch.Tensor | None = None,
                use_cached_media: bool = False) -> torch.Tensor:
        x = self.attn(x, media, media_locations, use_cached_media) * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x


class FlamingoLayer(nn.Module):
    """An LM decoder layer preceded by an (optional) gated cross-attention layer; holds the media state."""

    def __init__(self, gated_cross_attn_layer: GatedCrossAttentionBlock | None, decoder_layer: nn.Module):
        super().__init__()
        self.gated_cross_attn_layer = gated_cross_attn_layer  # registered first: key order as OpenFlamingo
        self.decoder_layer = decoder_layer
        self.vis_x: torch.Tensor | None = None
        self.media_locations: torch.Tensor | None = None
        self.use_cached_media = False

    def is_conditioned(self) -> bool:
        return self.vis_x is not None and self.media_locations is not None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # transformers >= 4.54 passes extra positional args to decoder layers (methods/victim.md §B1.1): pass all through.
        if self.gated_cross_attn_layer is not None:
            if not self.is_conditioned():
                raise VbbError("a Flamingo layer ran without media", "call it through Flamingo.forward/generate")
            hidden_states = self.gated_cross_attn_layer(hidden_states, self.vis_x, self.media_locations,
                                                        self.use_cached_media)
        return self.decoder_layer(hidden_states, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Some HF decoders read per-layer attributes (e.g. ``attention_type``) off their layers.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "decoder_layer":
                raise
            return getattr(super().__getattr__("decoder_layer"), name)


class FlamingoLMMixin:
    """Mixed into an HF causal LM instance: wraps its decoder layers and tracks <image> positions."""

    decoder_layers_attr_name: str
    media_token_id: int
    _use_cached_vision_x: bool

    def decoder_layers(self) -> nn.ModuleList:
        return _get_path(self, self.decoder_layers_attr_name)

    def init_flamingo(self, media_token_id: int, lang_hidden_size: int, vis_hidden_size: int,
                      cross_attn_every_n_layers: int, cross_attn_kwargs: dict[str, Any]) -> None:
        # Decoder blocks and gated layers are each registered twice, as OpenFlamingo does, so checkpoint keys match:
        # old_decoder_blocks.<i>, gated_cross_attn_layers.<i> and <decoder path>.<i>.{gated_cross_attn,decoder}_layer.
        self.old_decoder_blocks = self.decoder_layers()
        self.gated_cross_attn_layers = nn.ModuleList(
            GatedCrossAttentionBlock(dim=lang_hidden_size, dim_visual=vis_hidden_size, **cross_attn_kwargs)
            if (i + 1) % cross_attn_every_n_layers == 0 else None
            for i in range(len(self.old_decoder_blocks)))
        _set_path(self, self.decoder_layers_attr_name, nn.ModuleList(
            FlamingoLayer(g, d) for g, d in zip(self.gated_cross_attn_layers, self.old_decoder_blocks)))
        self.media_token_id = media_token_id
        self._use_cached_vision_x = False

    def condition_vis_x(self, vis_x: torch.Tensor | None) -> None:
        for layer in self.decoder_layers():
            layer.vis_x = vis_x

    def condition_media_locations(self, media_locations: torch.Tensor | None) -> None:
        for layer in self.decoder_layers():
            layer.media_locations = media_locations

    def is_conditioned(self) -> bool:
        return all(layer.is_conditioned() for layer in self.decoder_layers())

    def clear_conditioned_layers(self) -> None:
        for layer in self.decoder_layers():
            layer.vis_x, layer.media_locations, layer.use_cached_media = None, None, False

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        # attention_mask is optional: transformers 5.x drops an all-ones mask from generate's inputs (methods/victim.md §B1.2).
        if input_ids is None:
            raise VbbError("a Flamingo LM needs input_ids to find the <image> tokens",
                           "pass input_ids, not inputs_embeds")
        media_locations = input_ids == self.media_token_id
        # During cached generate, new single tokens carry no <image>: they attend to the last cached media.
        use_cached = self._use_cached_vision_x and self.is_conditioned() and not bool(media_locations.any())
        for layer in self.decoder_layers():
            if not use_cached:
                layer.media_locations = media_locations
            layer.use_cached_media = use_cached
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)  # type: ignore[misc]


def _mix_into(lm: nn.Module) -> None:
    """Make ``lm`` an instance of (FlamingoLMMixin, type(lm)), keeping the base forward's signature.

    generate() decides from forward's signature whether to build position_ids (left padding) and
    logits_to_keep, so we expose the base signature rather than the mixin's ``**kwargs``.
    """
    base = type(lm)
    sig = inspect.signature(base.forward)
    params = list(sig.parameters.values())
    var_kw = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = sig.bind_partial(self, *args, **kwargs).arguments
        arguments.pop(params[0].name)  # self
        arguments.update(arguments.pop(var_kw, {}) if var_kw else {})
        return FlamingoLMMixin.forward(self, **arguments)

    forward.__signature__ = sig  # type: ignore[attr-defined]
    lm.__class__ = type(base.__name__, (FlamingoLMMixin, base), {"forward": forward})


def infer_decoder_layers_attr_name(lm: nn.Module) -> str:
    """The first known decoder-layer path that exists on ``lm`` (methods/victim.md §B1)."""
    for path in KNOWN_DECODER_LAYER_PATHS:
        try:
            if isinstance(_get_path(lm, path), nn.ModuleList):
                return path
        except AttributeError:
            continue
    raise VbbError(f"cannot find the decoder layers of {type(lm).__name__}",
                   f"pass decoder_layers_attr_name (known: {', '.join(KNOWN_DECODER_LAYER_PATHS)})")


def input_embeddings(lm: nn.Module) -> nn.Module:
    """The LM input embedding; MPT's remote code lacks get_input_embeddings, so fall back to ``transformer.wte``."""
    try:
        emb = lm.get_input_embeddings()
        if emb is not None:
            return emb
    except (AttributeError, NotImplementedError):
        pass
    return _get_path(lm, "transformer.wte")


class Flamingo(nn.Module):
    """Vision encoder -> perceiver -> Flamingo LM; ``vision_encoder(pixels)`` returns ``(pooled, tokens[B, N, D])``."""

    def __init__(self, vision_encoder: nn.Module, lang_encoder: nn.Module, eoc_token_id: int, media_token_id: int,
                 vis_dim: int, cross_attn_every_n_layers: int = 1, perceiver_kwargs: dict[str, Any] | None = None,
                 cross_attn_kwargs: dict[str, Any] | None = None, decoder_layers_attr_name: str | None = None,
                 train_vision_encoder: bool = False):
        super().__init__()
        self.eoc_token_id, self.media_token_id, self.vis_dim = eoc_token_id, media_token_id, vis_dim
        self.train_vision_encoder = train_vision_encoder
        cfg = lang_encoder.config
        self.lang_dim = cfg.d_model if hasattr(cfg, "d_model") else cfg.hidden_size  # MPT calls it d_model
        # Registration order vision_encoder, perceiver, lang_encoder gives OpenFlamingo's key order.
        self.vision_encoder = vision_encoder
        self.perceiver = PerceiverResampler(dim=vis_dim, **{**PERCEIVER_DEFAULTS, **(perceiver_kwargs or {})})
        if isinstance(lang_encoder, FlamingoLMMixin):
            raise VbbError("the language model is already a Flamingo LM", "pass a fresh HF causal LM")
        _mix_into(lang_encoder)
        lang_encoder.decoder_layers_attr_name = decoder_layers_attr_name or infer_decoder_layers_attr_name(lang_encoder)
        lang_encoder.init_flamingo(media_token_id, self.lang_dim, vis_dim, cross_attn_every_n_layers,
                                   {**CROSS_ATTN_DEFAULTS, **(cross_attn_kwargs or {})})
        self.lang_encoder = lang_encoder

    def encode_vision_x(self, vision_x: torch.Tensor) -> torch.Tensor:
        """Encode (B, T_img, F=1, C, H, W) images, condition every LM layer on them, return (B, T_img, n, D)."""
        if vision_x.ndim != 6 or vision_x.shape[2] != 1:
            raise VbbError(f"vision_x has shape {tuple(vision_x.shape)}", "pass (B, T_img, 1, C, H, W) (methods/victim.md §A4)")
        b, T, F = vision_x.shape[:3]
        with torch.set_grad_enabled(self.train_vision_encoder and torch.is_grad_enabled()):
            tokens = self.vision_encoder(vision_x.flatten(0, 2))[1]  # frozen encoder by default (methods/victim.md §A2)
        return self.condition_on_tokens(tokens.unflatten(0, (b, T, F)))

    def condition_on_tokens(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """Resample precomputed encoder tokens (B, T_img, F, v, D) and condition every LM layer.

        With a frozen encoder the tokens of an image never change, so training loops may compute
        them once per image instead of once per caption and step.
        """
        media = self.perceiver(vision_tokens)
        self.lang_encoder.condition_vis_x(media)
        return media

    def forward(self, vision_x: torch.Tensor | None, lang_x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, clear_conditioned_layers: bool = True,
                past_key_values: Any = None, use_cache: bool = False,
                vision_tokens: torch.Tensor | None = None) -> Any:
        """HF causal-LM output for text ``lang_x`` (B, T_txt) conditioned on ``vision_x`` (or on cached media,
        or on precomputed encoder ``vision_tokens`` (B, T_img, F, v, D) with ``vision_x=None``)."""
        lm = self.lang_encoder
        if vision_tokens is not None:
            self.condition_on_tokens(vision_tokens)
            lm.condition_media_locations(lang_x == self.media_token_id)
        elif lm._use_cached_vision_x:
            if vision_x is not None:
                raise VbbError("media are cached and vision_x was also given", "call uncache_media() first")
            if not lm.is_conditioned():
                raise VbbError("media caching is on but no media are cached", "call cache_media() first")
        else:
            if vision_x is None:
                raise VbbError("no vision_x and no cached media", "pass vision_x or call cache_media()")
            self.encode_vision_x(vision_x)
            lm.condition_media_locations(lang_x == self.media_token_id)
        try:
            return lm(input_ids=lang_x, attention_mask=attention_mask, labels=labels,
                      past_key_values=past_key_values, use_cache=use_cache)
        finally:
            if clear_conditioned_layers:
                lm.clear_conditioned_layers()

    @torch.no_grad()
    def generate(self, vision_x: torch.Tensor | None, lang_x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 *, vision_tokens: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """HF generate on ``lang_x``; returns prompt + new tokens. Stops at <|endofchunk|> unless told (methods/victim.md §A4).
        ``vision_tokens`` (B, T_img, F, v, D) replaces ``vision_x`` with precomputed encoder tokens."""
        num_beams = kwargs.pop("num_beams", 1)
        lm = self.lang_encoder
        lm._use_cached_vision_x = True
        try:
            media = self.encode_vision_x(vision_x) if vision_tokens is None else self.condition_on_tokens(vision_tokens)
            if num_beams > 1:  # HF expands the text per beam; the media must line up with it.
                # Repeating the resampled media (not the pixels) gives the same result as
                # OpenFlamingo's repeat of vision_x without encoding each image num_beams times.
                lm.condition_vis_x(media.repeat_interleave(num_beams, dim=0))
            return lm.generate(input_ids=lang_x, attention_mask=attention_mask,
                               eos_token_id=kwargs.pop("eos_token_id", self.eoc_token_id), num_beams=num_beams,
                               **kwargs)
        finally:
            lm.clear_conditioned_layers()
            lm._use_cached_vision_x = False

    def cache_media(self, input_ids: torch.Tensor, vision_x: torch.Tensor) -> None:
        """Fix media for later forward() calls (log-likelihood scoring); they attend to the last image."""
        self.encode_vision_x(vision_x)
        self.lang_encoder.condition_media_locations(input_ids == self.media_token_id)
        self.lang_encoder._use_cached_vision_x = True

    def uncache_media(self) -> None:
        self.lang_encoder.clear_conditioned_layers()
        self.lang_encoder._use_cached_vision_x = False


def set_openflamingo_trainable(model: Flamingo) -> None:
    """Train perceiver, gated cross-attention and LM input embeddings only (methods/victim.md §A2); a tied output trains too."""
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    input_embeddings(model.lang_encoder).requires_grad_(True)


def _trainable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters under OpenFlamingo names, one name each (methods/victim.md §A6)."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if not (isinstance(t, nn.Parameter) and t.requires_grad) or name.startswith(ALIAS_PREFIXES):
            continue
        if id(t) in seen:  # tied output embedding: keep the input-embedding name, which comes first
            continue
        seen.add(id(t))
        out[name] = t
    return out


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint payload: trainable tensors (detached, sharing storage) keyed by OpenFlamingo names."""
    return {k: p.detach() for k, p in _trainable_params(model).items()}


def describe_key_mismatch(expected: dict[str, Any], state: dict[str, Any]) -> str:
    """'' when ``state`` has exactly the keys and shapes of ``expected``, else each kind of mismatch with its count
    and first names (checkpoint loaders put this in their one error)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = [f"{k} {tuple(state[k].shape)} != {tuple(t.shape)}" for k, t in expected.items()
                 if k in state and tuple(getattr(state[k], "shape", ())) != tuple(t.shape)]

    def show(label: str, keys: list[str]) -> str:
        return f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}" if keys else ""
    parts = [show("missing", missing), show("unexpected", unexpected), show("wrong shape", bad_shape)]
    return "; ".join(p for p in parts if p)


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into the trainable parameters; strict on that subset (methods/victim.md §A6, not ``strict=False``, §A8)."""
    params = _trainable_params(model)
    mismatch = describe_key_mismatch(params, state)
    if mismatch:
        raise VbbError("checkpoint does not match the model's trainable parameters; " + mismatch,
                       "build the model with the same profile, tokenizer (embedding size) and trainable set as the "
                       "checkpoint; keys must be OpenFlamingo names with one alias (methods/victim.md §A6)")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])
