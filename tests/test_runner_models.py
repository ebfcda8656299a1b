"""The grid's loaded-model cache: bounded by the profile, the base kept, one-off images in defend."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from types import SimpleNamespace

from vlmbackdoor_bench.grid.runner import GridRunner


class Model:
    def __init__(self, name: str):
        self.name, self.loaded = name, None
        self.transient = []  # the one-off flag each time a defense ran

    def clone(self) -> "Model":
        return Model(f"clone of {self.name}")

    def load_trainable(self, path) -> None:
        self.loaded = path


def runner_with(max_loaded):
    grid = GridRunner.__new__(GridRunner)
    base = Model("base")
    grid._victims, grid._max_loaded, grid._base_key = OrderedDict(), max_loaded, None
    grid._victims["base-key"] = base
    grid.base_victim = lambda: (grid._victims.setdefault("base-key", base), SimpleNamespace(key="base-key"))
    grid._base_key = "base-key"
    grid.store = SimpleNamespace(get_or_build=lambda stage, payload, build: SimpleNamespace(
        key=f"{stage}-{payload['n']}", path=f"/store/{payload['n']}"))
    return grid, base


def test_derived_models_beyond_the_bound_are_dropped_least_recent_first_and_reload():
    grid, base = runner_with(2)
    first, _ = grid.derived_victim("backdoor", {"n": 1}, None)
    grid.derived_victim("backdoor", {"n": 2}, None)
    assert grid.derived_victim("backdoor", {"n": 1}, None)[0] is first  # a hit refreshes its place
    grid.derived_victim("backdoor", {"n": 3}, None)  # drops model 2, the least recent
    assert list(grid._victims) == ["base-key", "backdoor-1", "backdoor-3"]
    again, _ = grid.derived_victim("backdoor", {"n": 2}, None)  # reloaded from the store
    assert again.loaded == "/store/2" and list(grid._victims) == ["base-key", "backdoor-3", "backdoor-2"]
    assert grid._victims["base-key"] is base


def test_without_a_bound_every_model_stays_loaded():
    grid, _ = runner_with(None)
    for n in range(6):
        grid.derived_victim("defend", {"n": n}, None)
    assert len(grid._victims) == 7


def test_a_defense_encodes_its_images_as_one_offs(monkeypatch, tmp_path):
    """The defend stage runs the defense inside the victim's one_off_images() block, so the
    token cache's disk tier is off during defend() and back on afterwards."""
    from vlmbackdoor_bench.grid import persist
    from vlmbackdoor_bench.hookspecs import DefenseOutcome
    from vlmbackdoor_bench.types import DefenseReport

    class Cache:
        persist = True

        @contextlib.contextmanager
        def transient(self):
            self.persist = False
            try:
                yield
            finally:
                self.persist = True

    cache = Cache()
    saved = []
    victim = SimpleNamespace(one_off_images=cache.transient, clone=lambda: victim,
                             save=lambda path: saved.append(path))
    seen = []

    class Defense:
        name, version = "probe", "1"

        def defend(self, context, params):
            seen.append(cache.persist)
            return DefenseOutcome(victim, DefenseReport())

    grid, _ = runner_with(None)
    grid._trained_here = lambda: {}
    grid.clean_model = lambda seed: None
    grid.split = lambda role, split: None
    grid.defense_context = lambda backdoored, training_set, seed, workdir: SimpleNamespace(workdir=workdir)
    grid.store = SimpleNamespace(get_or_build=lambda stage, payload, build: (
        build(tmp_path), SimpleNamespace(key="defend-1", path=tmp_path))[1])
    monkeypatch.setattr(persist, "load_poisoned",
                        lambda path, train: SimpleNamespace(training_set=None))
    grid.defended(Defense(), {}, victim, SimpleNamespace(key="b"), SimpleNamespace(path=tmp_path), 0)
    assert seen == [False] and cache.persist and saved == [tmp_path]
