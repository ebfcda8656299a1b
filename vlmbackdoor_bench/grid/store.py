"""Content-addressed store of stage outputs (methods/design.md §6).

A stage output lives in ``<root>/<stage>/<key>/`` where key = sha256 of the canonical JSON of
everything that determines it (stage, plugin name + version, resolved parameters, upstream keys,
split manifests). Outputs are built in a temporary sibling directory and renamed into place, so
a killed run leaves no half-written entry and a rerun skips whatever exists. Processes of one
host that share a store (two `vbb run`s, SRD's cache in several Ray workers) build each entry
once: the first holds the entry's lock (``.locks/<stage>-<key>.lock``) while it builds, the others
wait for it and then read the entry. Across hosts the Ray executor submits each grid stage once
(grid.ray_executor); should two hosts still build one entry, the first rename wins.
A run killed outright (SIGKILL, out of memory) cannot remove its temporary directory; the next grid run
sweeps those of dead processes on this host (``Store.sweep_stale``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..allocator import release_freed_memory
from ..atomic import write_text_atomic
from ..errors import VbbError
from ..filelock import exclusive
from ..processes import dead_owner, owner_tag

META = "meta.json"
# A build's temporary sibling: ``.<key>.<host>-<pid>.tmp``; the host and pid say whose it is.
TMP_SUFFIX = ".tmp"


def canonical_json(payload: Any) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


def content_key(stage: str, payload: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json({"stage": stage, **payload}).encode()).hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` whole or not at all: a full disk or a read-only
    folder is one VbbError naming the file, and no partial temporary file is left behind."""
    path = Path(path)
    text = json.dumps(data, indent=2, sort_keys=True, default=str)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    except OSError as error:
        raise VbbError(f"could not write {path}: {error.strerror or error}",
                       "free disk space or make the cache directory writable (cache_dir in the "
                       "config), then rerun: finished stages are kept") from None


@dataclass
class Entry:
    stage: str
    key: str
    path: Path
    meta: dict[str, Any]
    cached: bool  # True when the entry existed before this call


class Store:
    def __init__(self, root: Path, log: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.log = log or (lambda message: None)

    def sweep_stale(self) -> list[Path]:
        """Remove the temporary build directories of processes of this host that no longer
        run (a killed build); another host's or a live process's are left alone. Returns them."""
        removed = []
        for tmp in self.root.glob(f"*/.*{TMP_SUFFIX}"):
            owner = tmp.name[: -len(TMP_SUFFIX)].rsplit(".", 1)[-1]
            if tmp.is_dir() and dead_owner(owner):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        return removed

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def has(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / META).exists()

    def get(self, stage: str, key: str) -> Entry | None:
        path = self.path(stage, key)
        if not (path / META).exists():
            return None
        return Entry(stage, key, path, json.loads((path / META).read_text()), cached=True)

    def get_or_build(
        self, stage: str, payload: dict[str, Any], build: Callable[[Path], dict[str, Any] | None]
    ) -> Entry:
        """Return the entry for (stage, payload), calling ``build(tmp_dir)`` only if it is missing.

        ``build`` writes its files into ``tmp_dir`` and may return extra metadata; the store adds
        the payload, key and build seconds to ``meta.json`` and renames the directory into place.
        """
        key = content_key(stage, payload)
        existing = self.get(stage, key)
        if existing is not None:
            return existing
        lock = self.root / ".locks" / f"{stage}-{key}.lock"
        with exclusive(lock, on_wait=lambda: self.log(
                f"store: another process is building {stage} {key[:12]}; waiting for it")):
            existing = self.get(stage, key)  # built by the process that held the lock
            if existing is not None:
                return existing
            return self._build(stage, key, payload, build)

    def _build(self, stage: str, key: str, payload: dict[str, Any],
               build: Callable[[Path], dict[str, Any] | None]) -> Entry:
        final = self.path(stage, key)
        tmp = final.with_name(f".{key}.{owner_tag()}{TMP_SUFFIX}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        self.log(f"store: building {stage} {key[:12]}")
        started = time.perf_counter()
        try:
            extra = build(tmp) or {}
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        seconds = time.perf_counter() - started
        release_freed_memory()  # the stage's temporaries would stay resident otherwise (allocator.py)
        meta = {"stage": stage, "key": key, "payload": payload, "seconds": seconds, **extra}
        write_json_atomic(tmp / META, meta)
        self.log(f"store: built {stage} {key[:12]} in {meta['seconds']:.0f} s")
        if final.exists():  # another host sharing the store finished first: keep its entry
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, final)
        return Entry(stage, key, final, json.loads((final / META).read_text()), cached=False)
