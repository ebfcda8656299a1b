"""No defense: the backdoored model is evaluated as it is (the paper's "No Defense" column)."""

from __future__ import annotations

from vlmbackdoor_bench.hookspecs import DefenseContext, DefenseOutcome, hookimpl
from vlmbackdoor_bench.types import DefenseReport

__version__ = "1.0.0"


class NoDefense:
    name = "none"
    label, order = "No Defense", 0
    paper_tables = {1: 0, 2: 0, 3: 0}  # the SRD paper's Tables 1-3: table -> column
    version = __version__
    presets = {"default": {}}
    default_preset = "default"

    def defend(self, context: DefenseContext, params) -> DefenseOutcome:
        return DefenseOutcome(context.backdoored, DefenseReport(details={"note": "no defense applied"}))


@hookimpl
def register_defenses(register) -> None:
    register(NoDefense())
