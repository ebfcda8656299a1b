"""The grid's loaded models (GridRunner's part): the base model built or loaded once, derived models
as the base's clone plus trainable weights from the store, the least recently used of them dropped
beyond the profile's ``max_loaded_models``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..device import training_payload
from .store import Entry


class LoadedModels:
    """Mixin of :class:`~vlmbackdoor_bench.grid.runner.GridRunner`; reads its ``store``,
    ``profile``, ``profile_params``, ``registry`` and ``context``; keeps the models in
    ``_victims`` (store key -> victim, least recently used first), bounded by ``_max_loaded``,
    the base's key in ``_base_key``."""

    def _trained_here(self) -> dict:
        """What a model stage's payload adds for this run's device and precision ({} on CPU fp32)."""
        return training_payload(self.context.device, self.context.precision)

    def base_victim(self) -> tuple[Any, Entry]:
        train = self.split("coco", "train")
        provider = self.registry.dataset(self.profile.dataset_sources()["coco"])
        pretrain = self.split("coco", "pretrain") if "pretrain" in provider.splits else None
        payload = {"profile": self.profile.name, "version": self.profile.version,
                   "params": self.profile.base_params(self.profile_params),
                   "manifests": [s.manifest.to_dict() for s in (pretrain, train) if s is not None],
                   **self._trained_here()}

        def build(tmp: Path) -> dict:
            victim, log = self.profile.build_base(self.context, self.profile_params, pretrain, train)
            victim.save_full(tmp)
            return {"log": log}

        entry = self.store.get_or_build("base", payload, build)
        if entry.key not in self._victims:
            self._victims[entry.key] = self.profile.load(entry.path, self.context)
        self._base_key = entry.key
        return self._victims[entry.key], entry

    def derived_victim(self, stage: str, payload: dict, train_fn: Callable[[Path], dict]) -> tuple[Any, Entry]:
        """A model = base + trainable weights saved by ``train_fn`` (cached in memory too)."""
        entry = self.store.get_or_build(stage, payload, train_fn)
        if entry.key not in self._victims:
            base, _ = self.base_victim()
            victim = base.clone()
            victim.load_trainable(entry.path)
            self._victims[entry.key] = victim
            self._drop_least_recent_models()
        self._victims.move_to_end(entry.key)
        return self._victims[entry.key], entry

    def _drop_least_recent_models(self) -> None:
        """Forget the least recently used derived models beyond the profile's bound (they reload
        from the store when needed again)."""
        if self._max_loaded is None:
            return
        derived = [key for key in self._victims if key != self._base_key]
        for key in derived[:max(0, len(derived) - self._max_loaded)]:
            del self._victims[key]
