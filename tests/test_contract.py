"""Issue 30: the cell record's schema (CellResult vs docs/CONTRACTS.md), plugin facts flowing from a
plugin through the record into the tables, ``vbb score`` through the registered metrics, and an
import graph without cycles."""

from __future__ import annotations

import ast
import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest

from vlmbackdoor_bench.grid.runner import plugin_facts
from vlmbackdoor_bench.hookspecs import MetricRequest
from vlmbackdoor_bench.leaderboard import build_tables, long_form
from vlmbackdoor_bench.leaderboard.facts import Facts, registry_facts
from vlmbackdoor_bench.metrics.score import compute_metrics, score_captions
from vlmbackdoor_bench.registry import load_registry
from vlmbackdoor_bench.results_schema import (CLEAN_MODEL, SCHEMA_VERSION, CellResult,
                                              stored_key)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- schema
def _documented_record() -> dict:
    """The JSON example of docs/CONTRACTS.md's cell-record section, its // comments removed."""
    text = (REPO / "docs" / "CONTRACTS.md").read_text(encoding="utf-8")
    section = text[text.index("## Cell result record"):text.index("## Long form")]
    block = re.search(r"```json\n(.*?)```", section, re.S).group(1)
    return json.loads(re.sub(r"\s//[^\n]*", "", block))


def test_contracts_doc_lists_exactly_the_cell_result_fields():
    documented = _documented_record()
    fields = set(CellResult.__dataclass_fields__) - {"extra"}
    assert set(documented) == fields
    assert documented["schema"] == SCHEMA_VERSION
    assert CellResult.from_dict(documented).to_dict() == documented  # the example is a valid record


def test_cell_result_reads_schema_1_and_keeps_unknown_keys():
    old = {"schema": 1, "profile": "tiny", "dataset": "coco", "attack": "badnet", "defense": "none",
           "poison_rate": 0.1, "seed": 0, "status": "ok", "error": None,
           "metrics": {"triggered": {"asr_srd": 99.5}}, "added_later": {"x": 1}}
    result = CellResult.from_dict(old)
    assert result.schema == 1 and result.plugin_facts == {} and result.extra == {"added_later": {"x": 1}}
    again = result.to_dict()
    assert again["metrics"] == old["metrics"] and again["added_later"] == {"x": 1}
    assert again["poison_rate"] == 0.1 and again["seed"] == 0
    for broken, problem in (({**old, "schema": 7}, "schema is 7"),
                            ({**old, "attack": ""}, "'attack'"),
                            ({**old, "status": "done"}, "status"),
                            ({**old, "metrics": None}, "metrics")):
        with pytest.raises(ValueError, match=problem):
            CellResult.from_dict(broken)


# --------------------------------------------------------------------------- plugin facts
TOY_PLUGIN = '''
from vlmbackdoor_bench.hookspecs import hookimpl

class ToyAttack:
    name, version, label, order = "toy_attack", "0.1", "Toy Attack", 5
    presets, default_preset, target = {"default": {}}, "default", "banana"
    asr_rules = ("srd", "strict")
    def poison(self, *a, **k): raise NotImplementedError
    def eval_inputs(self, *a, **k): raise NotImplementedError

class ToyDefense:
    name, version, label, order = "toy_defense", "0.1", "Toy Defense", 45
    presets, default_preset = {"default": {}}, "default"
    def defend(self, context, params): raise NotImplementedError

class CaptionLength:
    """Mean caption length in words, lower is better (a test metric)."""
    name, version, unit, direction, label, order = "length", "0.1", "words", "down", "Len", 15
    def compute(self, request):
        words = [len(c.split()) for c in request.captions.values()]
        return {"value": sum(words) / len(words), "n": len(words)}

@hookimpl
def register_attacks(register):
    register(ToyAttack())

@hookimpl
def register_defenses(register):
    register(ToyDefense())

@hookimpl
def register_metrics(register):
    register(CaptionLength())
'''


@pytest.fixture(scope="module")
def toy_registry(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy_plugins")
    (folder / "toy_plugin.py").write_text(textwrap.dedent(TOY_PLUGIN))
    registry = load_registry([folder], strict=True)
    assert {"toy_attack", "badnet"} <= set(registry.items["attack"])
    return registry


def _record(registry, attack, defense, dataset, metrics) -> dict:
    """A cell record as the runner assembles it, with the runner's own plugin facts."""
    return CellResult(profile="tiny", dataset=dataset, attack=attack, defense=defense,
                      poison_rate=0.1, seed=0, status="ok", metrics=metrics,
                      metric_details={s: {"n_images": 4} for s in metrics},
                      plugin_facts=plugin_facts(registry, attack, defense, metrics)).to_dict()


def test_runner_scores_a_plugin_metric_under_its_stored_keys(toy_registry):
    metrics = {n: m for n, m in toy_registry.items["metric"].items() if n in ("asr", "length")}
    request = MetricRequest(captions={1: "a banana on a table", 2: "two cats"},
                            references={1: ["a cup on a table"], 2: ["two cats on a sofa"]})
    values, details = compute_metrics(metrics, request, ["srd", "strict"])
    assert values == {"asr_srd": 50.0, "asr_strict": 50.0, "length": 3.5}
    assert details["length"] == {"n": 2} and details["asr_strict"]["rule"] == "strict"


def test_new_plugins_appear_in_the_tables_with_their_facts(toy_registry):
    triggered = {"bleu4": 10.0, "cider": 20.0, "sfs": 30.0, "asr_srd": 90.0, "asr_strict": 80.0,
                 "length": 7.25}
    records = [_record(toy_registry, attack, defense, "coco",
                       {"triggered": triggered, "clean": {"cider": 50.0, "asr_strict": 1.0}})
               for attack in ("badnet", "toy_attack") for defense in ("none", "toy_defense")]
    records.append(_record(toy_registry, "toy_attack", CLEAN_MODEL, "coco",
                           {"triggered": triggered, "clean": {"cider": 60.0}}))
    # the facts come from the records only: a fallback without the toy plugins
    tables = {t.key: t for t in build_tables(records, "tiny", {}, Facts.of(records, Facts())).tables}

    table1 = tables["table1"]
    assert [g.label for g in table1.groups] == ["No Defense"]  # only defenses the records declare
    assert table1.groups[0].columns[-1] == "Len ↓"  # the plugin metric, its label and direction
    rows = [labels for labels, _ in table1.rows]
    assert rows == [("COCO", "Toy Attack"), ("COCO", "BadNet"), ("COCO", "Clean model: Toy Attack")]
    assert table1.rows[0][1][-1] == "7.2"  # 7.25, one decimal
    table2 = tables["table2"]
    assert [g.label for g in table2.groups] == ["No Defense", "Toy Defense"]
    headline = tables["asr_headline"]
    assert headline.rows[0][0] == ("COCO", "Toy Attack", "strict")
    frame = long_form(records)
    assert list(frame[frame.attack == "toy_attack"].metric.unique()[:3]) == ["bleu4", "length", "cider"]


def test_registry_fallback_gives_the_paper_layout_for_records_without_facts():
    facts = registry_facts()
    assert facts.paper_defenses(1) == ["none", "srd"]
    # RobustIT (with its two ablations) and the re-fine-tune control are extra columns after the
    # paper's (not in its tables)
    assert facts.paper_defenses(2) == ["none", "abl", "vdc", "ct", "srd", "robustit", "robustit_idr", "robustit_aar"]
    assert facts.paper_defenses(3) == ["none", "random_mask", "srd_ppo", "srd_sac", "srd", "refinetune"]
    assert facts.paper_label(3, "srd") == "DQN" and facts.label("defense", "srd") == "SRD"
    assert facts.headline_metric("shadowcast") == "asr_concept"
    assert facts.headline_metric("badnet") == "asr_strict"
    assert [facts.arrow(m) for m in ("cider", "asr_srd", "unknown")] == ["↑", "↓", ""]
    old = {"dataset": "coco", "attack": "shadowcast", "defense": "none"}
    assert Facts.of([old]).label("attack", "shadowcast") == "Shadowcast"


def test_vbb_score_runs_plugin_metrics(toy_registry):
    refs = {1: ["a cup on a table"], 2: ["two cats on a sofa"]}
    metrics = {n: m for n, m in toy_registry.items["metric"].items() if n in ("asr", "length", "sfs")}
    out = score_captions({1: "a banana here", 2: "two cats"}, refs, asr_rule="strict", metrics=metrics)
    # sfs needs the clean model's captions, which were not given: left out, not an error
    assert out["length"] == 2.5 and "sfs" not in out
    assert out["asr"] == out[stored_key("asr", "strict")] == 50.0 and out["asr_n"] == 2


# --------------------------------------------------------------------------- import graph
def _module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def import_graph(roots: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (at any depth of the file, ``TYPE_CHECKING``
    blocks excepted), for the packages ``roots`` (package name -> folder)."""
    modules = {_module_name(p, root, pkg): p for pkg, root in roots.items() for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = ".".join(p for p in (base if node.level else "", node.module or "") if p)
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source
                           for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


PROJECT_ROOTS = {"vlmbackdoor_bench": REPO / "vlmbackdoor_bench",
                 "vlmbackdoor_bench_plugins": REPO / "plugins"}


def test_the_project_has_no_import_cycle():
    graph = import_graph(PROJECT_ROOTS)
    assert graph["vlmbackdoor_bench.leaderboard.tables"] >= {"vlmbackdoor_bench.leaderboard.defense_report"}
    assert "vlmbackdoor_bench.hookspecs" in graph["vlmbackdoor_bench_plugins.attacks.badnet"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import thing\n")
    (package / "b.py").write_text("thing = 1\n\ndef later():\n    from . import a\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n")
    graph = import_graph({"pkg": package})
    assert graph["pkg.c"] == set()
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


@pytest.mark.skipif(shutil.which("java") is None, reason="java not on PATH (PTB tokenizer for BLEU/CIDEr)")
def test_vbb_score_cli_prints_a_metric_of_a_config_plugin(tmp_path, capsys):
    from vlmbackdoor_bench.cli import main

    plugins = tmp_path / "my_plugins"
    plugins.mkdir()
    (plugins / "toy_plugin.py").write_text(textwrap.dedent(TOY_PLUGIN))
    config = tmp_path / "benchmark.toml"
    config.write_text('[benchmark]\nplugin_dirs = ["my_plugins"]\n')
    captions, references = tmp_path / "caps.json", tmp_path / "refs.json"
    captions.write_text(json.dumps({"1": "a banana on a table", "2": "two cats"}))
    references.write_text(json.dumps({"1": ["a cup on a table"], "2": ["two cats on a sofa"]}))
    assert main(["--config", str(config), "score", "--captions", str(captions),
                 "--references", str(references), "--asr-rule", "strict", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["length"] == 3.5 and out["asr_strict"] == out["asr"] == 50.0
    assert out["n_images"] == 2 and "sfs" not in out
