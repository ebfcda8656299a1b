"""What a grid run leaves besides the store: each cell's result file and the run's summary, shared
by the local loop (runner.py) and the Ray executor (ray_executor.py), which both import it."""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..config import BenchmarkConfig
from ..errors import VbbError
from ..results_schema import CellResult
from .cells import Cell


@dataclass
class RunSummary:
    ok: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def record(self, cell: Cell, error: str | None) -> None:
        if error is None:
            self.ok.append(cell.cell_id)
        else:
            self.failed[cell.cell_id] = error


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    """The library versions a result records in its provenance."""
    import torch
    import transformers
    return {"vlmbackdoor_bench": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def error_message(exc: BaseException) -> str:
    """What a failed cell's result says: a VbbError as it reads, anything else with its type."""
    return str(exc) if isinstance(exc, VbbError) else f"{type(exc).__name__}: {exc}"


def result_path(config: BenchmarkConfig, cell: Cell) -> Path:
    return config.results_dir / config.profile / f"{cell.cell_id}.json"


def failed_result(cell: Cell, error: str, trace: str = "") -> dict:
    return CellResult(**cell.to_dict(), status="failed", error=error, traceback=trace,
                      provenance={"git_commit": git_commit(), "versions": versions()}).to_dict()
