"""Attack-independent SRD stages (methods/srd.md §0: the surrogate and the policy are built once per
(dataset, seed, preset) and reused for every attack cell), kept in the plugin store the harness
lends SRD (``context.stage.plugin_store("srd")``, under ``cache_dir/srd``). Payloads name the
parameters, the defender-data fingerprint, the seed and the base model's identity; the store's
lock makes grid workers of one host sharing the cache (``vbb run --executor ray``) build each
entry once."""

from __future__ import annotations

import hashlib
import sys
from typing import Any, Callable

import numpy as np

from vlmbackdoor_bench.hookspecs import StageContext

CACHE_FORMAT = 2  # bump when a cached entry's meaning changes (2: entries moved into the Store layout)


def victim_identity(victim) -> str:
    """A fingerprint of a victim's weights: names, shapes and the first 1,024 values of every
    tensor (cheap even for 3B parameters); the class and profile for anything else."""
    h = hashlib.sha256(f"{type(victim).__name__}:{getattr(victim, 'profile', '')}".encode())
    model = getattr(victim, "model", None)
    if model is not None and hasattr(model, "state_dict"):
        for name, tensor in sorted(model.state_dict().items()):
            h.update(f"{name}{tuple(tensor.shape)}".encode())
            h.update(np.ascontiguousarray(tensor.detach().flatten()[:1024].float().cpu().numpy()).tobytes())
    return h.hexdigest()[:24]


def srd_store(stage_context: StageContext) -> Any:
    """SRD's store (StageContext.plugin_store), its waiting messages on stderr."""
    return stage_context.plugin_store("srd", log=lambda message: print(f"srd {message}", file=sys.stderr,
                                                                       flush=True))


def cached_stage(store: Any, stage: str, payload: dict, build: Callable[[Any], dict]) -> tuple[Any, dict]:
    """The entry ``stage/<key of payload>`` of SRD's ``store``, built by ``build(tmp_dir) -> meta``
    when missing, and its summary for the defense report (key, cached, path, build metadata)."""
    entry = store.get_or_build(stage, {"format": CACHE_FORMAT, **payload}, build)
    meta = {k: v for k, v in entry.meta.items() if k not in ("stage", "key", "payload")}
    return entry, {"key": entry.key, "cached": entry.cached, "path": str(entry.path), **meta}
