"""The grid as a DAG of stage tasks (methods/design.md §6), for executors that run stages side by side.

A task is one distinct piece of work, named by what it computes: the base victim, the clean model
of a seed, the clean model's reference captions of a dataset (the SFS reference), the poisoned set
and backdoored model of an attack, a defended model, and the evaluation of one cell. Each task
lists the tasks it needs; the cell tasks of the clean-model rows of one (dataset, seed) are chained,
because they may share caption and score entries (same model, same clean inputs). An executor runs
every task once after the tasks it needs, so no two workers ever build the same store entry.

What a task computes is the GridRunner's: ``run_task`` calls the runner method whose store entry
the task stands for, and whatever that method needs upstream is then a store hit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .cells import CLEAN_MODEL, Cell, resolve_params

# Every kind of task, upstream first; "cell" evaluates one cell and writes its result file.
STAGE_KINDS = ("base", "clean_model", "reference", "poison", "backdoor", "defend", "cell")


@dataclass(frozen=True)
class StageTask:
    kind: str
    name: str  # unique within a plan, e.g. "backdoor badnet seed0"
    needs: tuple[str, ...] = ()
    seed: int | None = None
    dataset: str | None = None
    attack: str | None = None
    defense: str | None = None
    cell: Cell | None = None


def plan(cells: list[Cell], attack_of: Callable[[str], Any]) -> list[StageTask]:
    """The distinct tasks ``cells`` need, each after every task it needs. ``attack_of(name)`` gives
    the attack plugin (its ``fine_tune_from`` and ``eval_uses_poison`` add edges)."""
    tasks: dict[str, StageTask] = {}

    def add(task: StageTask) -> str:
        tasks.setdefault(task.name, task)
        return task.name

    last_clean_row: dict[tuple[str, int], str] = {}
    for cell in cells:
        seed, attack = cell.seed, attack_of(cell.attack)
        base = add(StageTask("base", "base"))
        clean = add(StageTask("clean_model", f"clean_model seed{seed}", (base,), seed=seed))
        reference = add(StageTask("reference", f"reference {cell.dataset} seed{seed}", (clean,),
                                  seed=seed, dataset=cell.dataset))
        poison = add(StageTask("poison", f"poison {cell.attack} seed{seed}", (base,), seed=seed,
                               attack=cell.attack))
        if cell.defense == CLEAN_MODEL:
            needs = [reference]
            if getattr(attack, "eval_uses_poison", False):  # its test trigger is made while poisoning
                needs.append(poison)
            row = (cell.dataset, seed)
            if row in last_clean_row:
                needs.append(last_clean_row[row])
            last_clean_row[row] = add(StageTask("cell", cell.cell_id, tuple(needs), cell=cell))
            continue
        start = clean if getattr(attack, "fine_tune_from", "base") == "clean_model" else base
        backdoor = add(StageTask("backdoor", f"backdoor {cell.attack} seed{seed}",
                                 tuple(dict.fromkeys((poison, start))), seed=seed, attack=cell.attack))
        defend = add(StageTask("defend", f"defend {cell.attack} {cell.defense} seed{seed}",
                               (backdoor, clean), seed=seed, attack=cell.attack, defense=cell.defense))
        add(StageTask("cell", cell.cell_id, (defend, reference), cell=cell))
    return sorted(tasks.values(), key=lambda t: STAGE_KINDS.index(t.kind))


def run_task(runner, task: StageTask) -> str | None:
    """Compute ``task`` with ``runner`` (a GridRunner). Returns the key of the store entry it
    stands for, or for a cell task the cell's error (None when it succeeded; the result file is
    written either way)."""
    if task.kind == "cell":
        return runner.run_and_save(task.cell)
    if task.kind == "base":
        return runner.base_victim()[1].key
    if task.kind == "clean_model":
        return runner.clean_model(task.seed)[1].key
    if task.kind == "reference":
        return runner.reference_captions(task.dataset, task.seed).key
    attack = runner.registry.attack(task.attack)
    _, attack_params = resolve_params("attack", attack, runner.config.attack_params.get(task.attack, {}))
    if task.kind == "poison":
        return runner.poisoned_set(attack, attack_params, task.seed).key
    backdoored, backdoor_entry, poison_entry = runner.backdoored(attack, attack_params, task.seed)
    if task.kind == "backdoor":
        return backdoor_entry.key
    defense = runner.registry.defense(task.defense)
    _, defense_params = resolve_params("defense", defense, runner.config.defense_params.get(task.defense, {}))
    return runner.defended(defense, defense_params, backdoored, backdoor_entry, poison_entry, task.seed)[1].key
