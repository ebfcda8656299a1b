"""MosaicGPT, the language model of OpenFlamingo-3B (MPT-1B RedPajama-200B), in plain torch (methods/victim.md §A1).

The published model ships remote code (``mosaic_gpt.py``, model_type ``mosaic_gpt``) that keeps legacy tuple KV
caches and does not run under transformers 5.x (methods/victim.md §B1 "Caveat"). This module rebuilds its forward pass with the
remote parameter names, so the real ``pytorch_model.bin`` / ``model.safetensors`` load key for key, and with the
transformers Cache API, so ``generate()`` (beam search, KV cache, left padding) works.

What differs from transformers' ``MptForCausalLM``:
- parameter names: ``transformer.blocks.N.{ln_1, ln_2, mlp.mlp_up, mlp.mlp_down}`` and ``transformer.ln_f`` where
  MptForCausalLM has ``norm_1``, ``norm_2``, ``ffn.up_proj``, ``ffn.down_proj``, ``norm_f``; no ``lm_head`` weight
  (the logits are ``F.linear(h, wte.weight)``, the remote code's tie);
- QK LayerNorm (``attn_qk_ln``): ``attn.q_ln`` / ``attn.k_ln`` normalise q and k over the whole d_model before the
  heads are split (remote ``attention.py``); MptForCausalLM has no such layers;
- the config is the remote code's flat ``MosaicGPTConfig`` (``mlp_ratio``, ``attn_qk_ln``, ``alibi_bias_max``, ...),
  not MptConfig's nested ``attn_config``; ``logit_scale`` and ``attn_clip_qkv`` are honoured;
- ALiBi slopes are the remote code's ``2^-(h * alibi_bias_max / n_heads)`` for heads h = 1..n_heads, which equals
  MptForCausalLM's for a power-of-two head count (MPT-1B: 16) and differs otherwise (no interleaving);
- the attention softmax runs in float32 (remote: in the input dtype); identical in fp32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlmbackdoor_bench.errors import VbbError
from vlmbackdoor_bench.victims.flamingo import describe_key_mismatch

# The remote code builds every LayerNorm with torch's default eps (its config has no eps field).
LAYER_NORM_EPS = 1e-5
# How the remote repository names its code (config.json "architectures"/"auto_map"); written by save_mosaic_gpt.
REMOTE_ARCHITECTURES = ["MosaicGPT"]
REMOTE_AUTO_MAP = {"AutoConfig": "configuration_mosaic_gpt.MosaicGPTConfig",
                   "AutoModelForCausalLM": "mosaic_gpt.MosaicGPT"}
# Keys a config.json may hold that do not change MosaicGPT's computation: the remote config's own bookkeeping
# (it deletes ``name`` and ``loss_fn``), and the generic PretrainedConfig attributes of transformers 4.x, which
# saved the real file; anything else unknown is refused rather than silently ignored.
INERT_CONFIG_KEYS = frozenset({
    "auto_map", "name", "loss_fn", "tokenizer_name", "torch_dtype", "_name_or_path", "name_or_path", "_commit_hash",
    "transformers_version", "attn_implementation", "output_attentions", "num_labels", "add_cross_attention",
    "bad_words_ids", "begin_suppress_tokens", "cross_attention_hidden_size", "decoder_start_token_id",
    "finetuning_task", "forced_bos_token_id", "forced_eos_token_id", "is_decoder", "prefix", "pruned_heads",
    "sep_token_id", "task_specific_params", "tf_legacy_loss", "tie_encoder_decoder", "tie_word_embeddings",
    "tokenizer_class", "torchscript", "use_bfloat16", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens"})
ATTN_IMPLS = ("torch", "flash", "triton")  # remote choices; all compute the same attention, here in plain torch


class MosaicGPTConfig(PretrainedConfig):
    """The remote ``configuration_mosaic_gpt.py`` fields with its defaults (mosaicml/examples, llm/src/models)."""

    model_type = "mosaic_gpt"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers"}

    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    mlp_ratio: int = 4
    max_seq_len: int = 2048
    vocab_size: int = 50368
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    attn_impl: str = "triton"
    attn_qk_ln: bool = False
    attn_clip_qkv: float | None = None
    softmax_scale: float | None = None
    prefix_lm: bool | None = False
    attn_uses_sequence_id: bool | None = False
    alibi: bool = False
    alibi_bias_max: int = 8
    init_device: str = "cpu"
    logit_scale: float | str | None = None
    no_bias: bool = False
    verbose: int = 0
    param_init_fn: str = "kaiming_normal_"
    init_div_is_residual: int | float | str | bool = True
    init_std: float = 0.02
    emb_init_std: float | None = None
    emb_init_uniform_lim: Any = None
    init_gain: float = 0.0
    fan_mode: str = "fan_in"
    init_nonlinearity: str = "relu"
    embedding_fraction: float = 1.0
    low_precision_layernorm: bool = True  # only changes bf16/fp16 autocast numerics; a plain LayerNorm here
    use_cache: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        model_type = kwargs.pop("model_type", self.model_type)  # present in to_dict() and config.json
        if model_type != self.model_type:
            raise VbbError(f"config has model_type {model_type!r}, not {self.model_type!r}",
                           "use the remote-code MPT-1B repository (anas-awadalla/mpt-1b-redpajama-200b)")
        unknown = sorted(set(kwargs) - INERT_CONFIG_KEYS)
        if unknown:
            raise VbbError(f"MosaicGPT config has unknown field(s): {', '.join(unknown)}",
                           "remove them from config.json, or extend MosaicGPTConfig if they change the model")
        super().__post_init__(**kwargs)
        self._refuse_unsupported()

    def _refuse_unsupported(self) -> None:
        def refuse(key: str, why: str) -> None:
            raise VbbError(f"MosaicGPT config {key}={getattr(self, key)!r}: {why}",
                           "use the MPT-1B settings (alibi=true, prefix_lm=false, attn_uses_sequence_id=false) "
                           "or extend victims/mosaic_gpt.py")
        if self.d_model % self.n_heads:
            refuse("n_heads", f"does not divide d_model={self.d_model}")
        if not self.alibi:
            refuse("alibi", "learned position embeddings (transformer.wpe) are not implemented")
        if self.prefix_lm:
            refuse("prefix_lm", "prefix-LM attention is not implemented")
        if self.attn_uses_sequence_id:
            refuse("attn_uses_sequence_id", "sequence-id attention masks are not implemented")
        if self.attn_impl not in ATTN_IMPLS:
            refuse("attn_impl", f"not one of {ATTN_IMPLS}")
        if isinstance(self.logit_scale, str) and self.logit_scale != "inv_sqrt_d_model":
            refuse("logit_scale", "the only named scale is 'inv_sqrt_d_model'")
        if not 0 < self.embedding_fraction <= 1:
            refuse("embedding_fraction", "must lie in (0, 1]")
        for key in ("attn_pdrop", "resid_pdrop", "emb_pdrop"):
            if not 0 <= getattr(self, key) <= 1:
                refuse(key, "a dropout probability must lie in [0, 1]")

    def logit_multiplier(self) -> float | None:
        if self.logit_scale == "inv_sqrt_d_model":
            return 1 / math.sqrt(self.d_model)
        return self.logit_scale


def alibi_slopes(n_heads: int, alibi_bias_max: float) -> torch.Tensor:
    """Per-head ALiBi slope, 2^-(h * alibi_bias_max / n_heads) for h = 1..n_heads (remote ``attention.alibi_bias``)."""
    return 2.0 ** -(torch.arange(1, n_heads + 1, dtype=torch.float64) * (alibi_bias_max / n_heads))


def _layer_norm(config: MosaicGPTConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.d_model, eps=LAYER_NORM_EPS, bias=not config.no_bias)


class MosaicGPTAttention(nn.Module):
    """Multi-head self-attention with a fused Wqkv, optional QK LayerNorm and an additive (ALiBi + mask) bias."""

    def __init__(self, config: MosaicGPTConfig, layer_idx: int):
        super().__init__()
        d, bias = config.d_model, not config.no_bias
        self.n_heads, self.layer_idx = config.n_heads, layer_idx
        self.clip_qkv, self.dropout = config.attn_clip_qkv, config.attn_pdrop
        self.scale = config.softmax_scale if config.softmax_scale is not None else (d // config.n_heads) ** -0.5
        self.Wqkv = nn.Linear(d, 3 * d, bias=bias)
        self.qk_ln = config.attn_qk_ln
        if self.qk_ln:
            self.q_ln, self.k_ln = _layer_norm(config), _layer_norm(config)
        self.out_proj = nn.Linear(d, d, bias=bias)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor, past_key_values: Cache | None) -> torch.Tensor:
        qkv = self.Wqkv(x)
        if self.clip_qkv:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.chunk(3, dim=-1)
        if self.qk_ln:  # over the full d_model, before the heads are split (remote attention.py)
            q, k = self.q_ln(q), self.k_ln(k)
        q, k, v = (t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2) for t in (q, k, v))
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        scores = (q @ k.transpose(-1, -2)).float() * self.scale + attn_bias  # float32 bias: see _attention_bias
        weights = F.dropout(scores.softmax(dim=-1).to(v.dtype), self.dropout, self.training)
        return self.out_proj((weights @ v).transpose(1, 2).flatten(2))


class MosaicGPTMLP(nn.Module):
    def __init__(self, config: MosaicGPTConfig):
        super().__init__()
        bias = not config.no_bias
        self.mlp_up = nn.Linear(config.d_model, config.mlp_ratio * config.d_model, bias=bias)
        self.mlp_down = nn.Linear(config.mlp_ratio * config.d_model, config.d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_down(F.gelu(self.mlp_up(x)))  # exact (erf) GELU, as the remote GPTMLP


class MosaicGPTBlock(GradientCheckpointingLayer):
    """Pre-LN block; with activation checkpointing on, transformers recomputes it in backward (cache disabled)."""

    def __init__(self, config: MosaicGPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = _layer_norm(config)
        self.attn = MosaicGPTAttention(config, layer_idx)
        self.ln_2 = _layer_norm(config)
        self.mlp = MosaicGPTMLP(config)
        self.resid_pdrop = config.resid_pdrop

    def forward(self, hidden_states: torch.Tensor, attn_bias: torch.Tensor, past_key_values: Cache | None = None,
                **kwargs: Any) -> torch.Tensor:
        x = hidden_states
        x = x + F.dropout(self.attn(self.ln_1(x), attn_bias, past_key_values), self.resid_pdrop, self.training)
        return x + F.dropout(self.mlp(self.ln_2(x)), self.resid_pdrop, self.training)


class TiedOutputHead(nn.Module):
    """Logits ``F.linear(h, wte.weight)`` (times logit_scale); owns no weight, so no extra state-dict key.

    A module of its own so callers can hook its input, the last hidden state (``get_output_embeddings``)."""

    def __init__(self, scale: float | None):
        super().__init__()
        self.scale = scale

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, embedding_weight)
        return logits if self.scale is None else logits * self.scale


class MosaicGPT(PreTrainedModel, GenerationMixin):
    config_class = MosaicGPTConfig
    base_model_prefix = "mosaic_gpt"  # as the remote class; there is no separate base model
    supports_gradient_checkpointing = True
    _no_split_modules = ["MosaicGPTBlock"]

    def __init__(self, config: MosaicGPTConfig):
        super().__init__(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.d_model),
            blocks=nn.ModuleList(MosaicGPTBlock(config, i) for i in range(config.n_layers)),
            ln_f=_layer_norm(config)))
        self.lm_head = TiedOutputHead(config.logit_multiplier())
        self.loss_type = "ForCausalLM"  # HF's shifted cross-entropy; the class name does not tell transformers
        self.post_init()
        # The remote config's use_cache=false would make generate() recompute every prefix; cached decoding gives
        # the same tokens (tests/test_mosaic_gpt.py), so generate caches unless told otherwise.
        self.generation_config.use_cache = True

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> TiedOutputHead:
        return self.lm_head

    def _resize_token_embeddings(self, new_num_tokens: int | None, pad_to_multiple_of: int | None = None,
                                 mean_resizing: bool = True) -> nn.Embedding:
        # The head reads wte.weight, so only the input embedding is resized (transformers would rebuild lm_head).
        old = self.get_input_embeddings()
        new = self._get_resized_embeddings(old, new_num_tokens, pad_to_multiple_of, mean_resizing)
        new.requires_grad_(old.weight.requires_grad)
        self.set_input_embeddings(new)
        return new

    def _attention_bias(self, attention_mask: torch.Tensor | None, batch: int, q_len: int, past: int,
                        device: torch.device) -> torch.Tensor:
        """(B|1, H, q_len, past+q_len) float32: ALiBi by key position, the most negative float where a key is masked.

        Float32 whatever the model dtype, so masked scores stay finite: in fp16, finfo.min plus a negative score
        can round to -inf, and a left-pad row of -inf softmaxes to NaN (which 0-weight keys still pass on).

        The remote bias depends on the key position only (softmax ignores a per-row constant), so left padding
        needs no position shift: masked pad keys drop out and the remaining distances are unchanged."""
        k_len = past + q_len
        if k_len > self.config.max_seq_len:
            raise VbbError(f"sequence of {k_len} tokens exceeds MosaicGPT max_seq_len={self.config.max_seq_len}",
                           "shorten the prompt or max_new_tokens")
        key_pos = torch.arange(k_len, device=device)
        slopes = alibi_slopes(self.config.n_heads, self.config.alibi_bias_max).to(device)
        alibi = (slopes[:, None] * (key_pos - (k_len - 1))).float()[None, :, None, :]
        allowed = key_pos[None, :] <= (past + torch.arange(q_len, device=device))[:, None]  # causal
        allowed = allowed[None, None]
        if attention_mask is not None:
            if attention_mask.shape != (batch, k_len):
                raise VbbError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, k_len)}",
                               "pass a 2D 0/1 mask over the cached and the new tokens")
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        return alibi.masked_fill(~allowed, torch.finfo(torch.float32).min)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, **kwargs: Any) -> CausalLMOutputWithPast:
        """Causal-LM output; ``labels`` give HF's shifted mean cross-entropy (-100 ignored)."""
        for unsupported in ("output_attentions", "output_hidden_states", "inputs_embeds"):
            if kwargs.get(unsupported) not in (None, False):
                raise VbbError(f"MosaicGPT does not implement {unsupported}", f"call it without {unsupported}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise VbbError("MosaicGPT got a legacy tuple KV cache", "pass a transformers Cache (e.g. DynamicCache)")
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        x = self.transformer.wte(input_ids)
        f = self.config.embedding_fraction
        if f != 1:  # scales the embedding's gradient only (remote code, after GLM-130B)
            x = x * f + x.detach() * (1 - f)
        x = F.dropout(x, self.config.emb_pdrop, self.training)
        bias = self._attention_bias(attention_mask, *input_ids.shape, past, x.device)
        for block in self.transformer.blocks:  # hidden states positional: our Flamingo layers pass it on
            x = block(x, attn_bias=bias, past_key_values=past_key_values)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x, self.transformer.wte.weight)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)


# ---------------------------------------------------------------- the remote-code directory format

CONFIG_FILE = "config.json"
WEIGHT_FILES = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin"}


def read_config(directory: Path) -> MosaicGPTConfig:
    path = directory / CONFIG_FILE
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VbbError(f"cannot read the MosaicGPT config {path}: {e}",
                       "point to a local MPT-1B directory with config.json and its weights") from e
    fields.pop("architectures", None)  # written back by save_mosaic_gpt
    return MosaicGPTConfig(**fields)


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only, never pickled code


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The state dict of a remote-code directory: single-file or sharded (``*.index.json``), safetensors first."""
    for name in (WEIGHT_FILES["safetensors"], WEIGHT_FILES["bin"]):
        if (directory / name).is_file():
            return _read_weight_file(directory / name)
        index = directory / f"{name}.index.json"
        if index.is_file():
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(_read_weight_file(directory / shard))
            return state
    raise VbbError(f"no MosaicGPT weights in {directory}",
                   "expected model.safetensors, pytorch_model.bin or their sharded *.index.json forms")


def load_mosaic_gpt(directory: str | Path, *, dtype: torch.dtype = torch.float32) -> MosaicGPT:
    """Build MosaicGPT from a local remote-code directory, strictly: every key and shape must match the config.

    Reads config.json and the weights only (never a .py file, never the hub); returns the model in eval mode."""
    directory = Path(directory)
    config = read_config(directory)
    with torch.device("meta"):  # no random init of a 1.3 B-parameter model that is overwritten at once
        model = MosaicGPT(config)
    state = read_weights(directory)
    mismatch = describe_key_mismatch(model.state_dict(), state)
    if mismatch:
        raise VbbError(f"MosaicGPT weights in {directory} do not match its config.json; {mismatch}",
                       "use the weights and config.json of the same remote-code MPT checkpoint")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def save_mosaic_gpt(model: MosaicGPT, directory: str | Path, *, weights: str = "bin") -> Path:
    """Write ``model`` in the remote-code layout (config.json + pytorch_model.bin or model.safetensors)."""
    if weights not in WEIGHT_FILES:
        raise VbbError(f"unknown weights format {weights!r}", f"use one of {sorted(WEIGHT_FILES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fields = {name: getattr(model.config, name) for name in MosaicGPTConfig.__annotations__}
    fields.update(model_type=MosaicGPTConfig.model_type, architectures=REMOTE_ARCHITECTURES,
                  auto_map=REMOTE_AUTO_MAP, torch_dtype=str(model.dtype).removeprefix("torch."))
    (directory / CONFIG_FILE).write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = directory / WEIGHT_FILES[weights]
    if weights == "safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path), metadata={"format": "pt"})
    else:
        torch.save(state, path)
    return directory
