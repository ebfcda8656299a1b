"""Issue 30: the plugins' public surface. A module under plugins/ imports from the core only
hookspecs, types, errors, plugin_api and ``from vlmbackdoor_bench import hookimpl``; what else a
plugin needs arrives in its context (DefenseContext.recipe / .lexicon, StageContext.plugin_store)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest

import vlmbackdoor_bench
from vlmbackdoor_bench import device, hookspecs, plugin_api
from vlmbackdoor_bench.data.providers import EMBEDDED_COCO, FLICKR30K_KARPATHY
from vlmbackdoor_bench.grid.runner import GridRunner
from vlmbackdoor_bench.hookspecs import StageContext
from vlmbackdoor_bench.processes import host_tag
from vlmbackdoor_bench.victims.training import Recipe

REPO = Path(__file__).resolve().parents[1]
CORE = "vlmbackdoor_bench"
PLUGINS = "vlmbackdoor_bench_plugins"  # the package plugins/ is installed as (pyproject.toml)
SURFACE = {f"{CORE}.{name}" for name in ("hookspecs", "types", "errors", "plugin_api")}
FROM_PACKAGE = {"hookimpl"} | {name.rsplit(".", 1)[1] for name in SURFACE}  # from vlmbackdoor_bench import ...
DYNAMIC_IMPORTS = {"import_module", "__import__"}


def core_imports(root: Path, package: str = PLUGINS) -> list[tuple[str, int, str]]:
    """(file, line, what) of every import of the core outside the surface, in every module under
    ``root`` (the package ``package``), at any depth: function bodies, TYPE_CHECKING blocks and
    ``importlib.import_module("vlmbackdoor_bench....")`` calls included."""
    found = []
    for path in sorted(root.rglob("*.py")):
        here = [package, *path.relative_to(root).parent.parts]  # the package relative imports start in
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                if module == CORE:  # from vlmbackdoor_bench import hookimpl / a surface module
                    names = [module if alias.name in FROM_PACKAGE else f"{CORE}.{alias.name}"
                             for alias in node.names]
                else:
                    names = [module]
            elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                  and getattr(node.func, "attr", getattr(node.func, "id", None)) in DYNAMIC_IMPORTS):
                names = [str(node.args[0].value)]
            for name in names:
                inside_core = name == CORE or name.startswith(CORE + ".")
                if inside_core and name not in SURFACE and not (name == CORE and isinstance(node, ast.ImportFrom)):
                    found.append((str(path.relative_to(root)), node.lineno, name))
    return sorted(found)


def test_plugins_import_nothing_from_the_core_but_the_surface():
    assert core_imports(REPO / "plugins") == []


def test_the_check_finds_every_kind_of_core_import(tmp_path: Path):
    package = tmp_path / "plugins"
    (package / "defenses").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "defenses" / "__init__.py").write_text("from vlmbackdoor_bench.registry import load_registry\n")
    (package / "defenses" / "mine.py").write_text(
        "import importlib\n"
        "from vlmbackdoor_bench import hookimpl\n"  # allowed: the marker
        "from vlmbackdoor_bench import hookspecs, grid\n"  # the first allowed, grid not
        "from vlmbackdoor_bench.types import Split\n"
        "import vlmbackdoor_bench.plugin_api as api\n"
        "from vlmbackdoor_bench_plugins.attacks import badnet\n"  # another plugin: not core
        "from . import other\n"
        "import vlmbackdoor_bench\n"
        "def f():\n"
        "    from vlmbackdoor_bench.grid.store import Store\n"
        "    return importlib.import_module('vlmbackdoor_bench.device')\n"
        "if False:\n"
        "    import vlmbackdoor_bench.victims.training as training\n")
    assert core_imports(package) == [
        ("defenses/__init__.py", 1, "vlmbackdoor_bench.registry"),
        ("defenses/mine.py", 3, "vlmbackdoor_bench.grid"),
        ("defenses/mine.py", 8, "vlmbackdoor_bench"),
        ("defenses/mine.py", 10, "vlmbackdoor_bench.grid.store"),
        ("defenses/mine.py", 11, "vlmbackdoor_bench.device"),
        ("defenses/mine.py", 13, "vlmbackdoor_bench.victims.training"),
    ]


def test_hookimpl_comes_from_the_package_and_plugin_api_reexports_documented_core_objects():
    from vlmbackdoor_bench import hookimpl

    assert hookimpl is hookspecs.hookimpl
    with pytest.raises(AttributeError, match="no attribute 'registry_of'"):
        vlmbackdoor_bench.registry_of  # noqa: B018
    # the same objects as the core's (re-exports, not copies), each documented in the module
    assert plugin_api.victim_device is device.victim_device and plugin_api.Recipe is Recipe
    for name in plugin_api.__all__:
        obj = getattr(plugin_api, name)
        assert f"``{name}" in plugin_api.__doc__ or f"/ {name}(" in plugin_api.__doc__, name
        assert (inspect.getdoc(obj) or "").strip() and not inspect.getdoc(obj).startswith(f"{name}("), name


def test_plugin_store_builds_an_entry_once_and_sweeps_dead_builds(tmp_path: Path):
    stage = StageContext(cache_dir=tmp_path, config=None)
    builds = []

    def build(tmp: Path) -> dict:
        builds.append(tmp)
        (tmp / "value.txt").write_text("42")
        return {"n": 1}

    first = stage.plugin_store("mine").get_or_build("policy", {"seed": 0}, build)
    stale = first.path.parent / f".{first.key}.{host_tag()}-999999999.tmp"  # its builder is gone
    stale.mkdir()
    again = stage.plugin_store("mine").get_or_build("policy", {"seed": 0}, build)
    assert not stale.exists()
    other = stage.plugin_store("mine").get_or_build("policy", {"seed": 1}, build)
    assert len(builds) == 2 and not first.cached and again.cached and not other.cached
    assert again.path == first.path and first.path.parent.parent == tmp_path / "mine"
    assert (again.path / "value.txt").read_text() == "42" and again.meta["n"] == 1
    assert other.key != first.key


def test_the_grid_hands_a_defense_its_recipe_and_the_datasets_lexicon(tmp_path: Path):
    recipe = Recipe(epochs=3)
    registry = SimpleNamespace(dataset={"embedded-coco": EMBEDDED_COCO,
                                        "flickr30k-karpathy": FLICKR30K_KARPATHY}.get)

    def context_for(source: str):
        profile = SimpleNamespace(dataset_sources=lambda: {"coco": source},
                                  finetune_recipe=lambda params: recipe if params == {"epochs": 3} else None)
        runner = SimpleNamespace(
            profile=profile, profile_params={"epochs": 3}, registry=registry, context=StageContext(tmp_path, None),
            split=lambda role, split: f"{role}:{split}", reserved_clean_split=lambda: None,
            base_victim=lambda: ("base", None), clean_model=lambda seed: (f"clean{seed}", None),
            scorer=lambda: "scorers")
        return GridRunner.defense_context(runner, "backdoored", "training set", 5, tmp_path)

    embedded = context_for("embedded-coco")
    assert embedded.recipe is recipe and embedded.lexicon is EMBEDDED_COCO.lexicon
    assert embedded.lexicon["cup"][:3] == ["cup", "mug", "coffee cup"] and "recipe" not in embedded.extras
    assert embedded.extras == {"clean_split": "coco:train", "clean_model": "clean5"}
    assert context_for("flickr30k-karpathy").lexicon is None  # a dataset that declares none
