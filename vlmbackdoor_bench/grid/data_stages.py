"""The grid's data (GridRunner's part): each (dataset role, split) loaded once per runner from
the dataset the profile names for the role, the defenders' reserved clean split, and the check
of local files before anything is built."""

from __future__ import annotations

from types import SimpleNamespace

from ..errors import VbbError
from ..types import Split


class DataStages:
    """Mixin of :class:`~vlmbackdoor_bench.grid.runner.GridRunner`; reads its ``config``,
    ``profile``, ``profile_params``, ``registry`` and ``context``, and caches in ``_splits``."""

    def _data_config(self) -> SimpleNamespace:
        from ..data.world import WorldSizes
        p = self.profile_params
        sizes = WorldSizes(train=p["world_train"], test=p["world_test"],
                           pretrain=p["world_pretrain"], flickr_test=p["world_flickr_test"],
                           val=p["world_val"], flickr_val=p["world_flickr_val"]) \
            if "world_train" in p else None
        return SimpleNamespace(world_seed=self.config.world_seed, world_sizes=sizes,
                               data_paths=self.config.data_paths)

    def split(self, role: str, split: str) -> Split:
        key = (role, split)
        if key not in self._splits:
            source = self.profile.dataset_sources().get(role)
            if source is None:
                raise VbbError(f"profile '{self.profile.name}' has no dataset for role '{role}'",
                               f"use datasets from: {', '.join(self.profile.dataset_sources())}")
            self._splits[key] = self.registry.dataset(source).load(split, self.context)
        return self._splits[key]

    def reserved_clean_split(self) -> Split | None:
        """The COCO dataset's split disjoint from fine-tuning, the defenders' reserved clean set
        (hookspecs.DefenseContext): Karpathy ``restval`` or the embedded world's ``pretrain``."""
        provider = self.registry.dataset(self.profile.dataset_sources()["coco"])
        name = next((s for s in ("restval", "pretrain") if s in provider.splits), None)
        return None if name is None else self.split("coco", name)

    def check_data(self) -> None:
        """Every local dataset the grid reads (fine-tuning and each eval role) is complete before
        anything is built: one VbbError naming each missing file (providers' check_available)."""
        sources = self.profile.dataset_sources()  # every role is known: validate_plugins ran
        for role in dict.fromkeys(["coco", *self.config.datasets]):
            check = getattr(self.registry.dataset(sources[role]), "check_available", None)
            if check is not None:
                check(self.context.config)
