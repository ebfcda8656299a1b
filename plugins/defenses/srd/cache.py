"""Attack-independent SRD stages cached under ``context.stage.cache_dir/srd`` (spec/srd.md §0:
the surrogate and the policy are built once per (dataset, seed, preset) and reused for every
attack cell). Keys hash the parameters, the defender-data fingerprint, the seed and the base
model's identity; entries are written to a temporary directory and renamed into place, under a
lock, so that grid workers sharing the cache (``vbb run --jobs N``) build each one once."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlmbackdoor_bench.filelock import exclusive

CACHE_FORMAT = 1  # bump when a cached entry's meaning changes


def key_of(payload: Any) -> str:
    text = json.dumps({"format": CACHE_FORMAT, "payload": payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


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


def get_or_build(root: Path, kind: str, key: str, build: Callable[[Path], dict]) -> tuple[Path, dict, bool]:
    """``root/kind-key``: built by ``build(tmp_dir) -> meta`` unless it exists; atomic rename."""
    final = Path(root) / f"{kind}-{key}"
    if (final / "meta.json").is_file():
        return final, json.loads((final / "meta.json").read_text()), True
    with exclusive(final.parent / ".locks" / f"{kind}-{key}.lock"):
        if (final / "meta.json").is_file():  # built by the process that held the lock
            return final, json.loads((final / "meta.json").read_text()), True
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-{key}.", dir=final.parent))
        try:
            meta = build(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, default=str))
            try:
                os.rename(tmp, final)
            except OSError:  # another host sharing the cache finished first: keep its entry
                if not (final / "meta.json").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final, json.loads((final / "meta.json").read_text()), False
