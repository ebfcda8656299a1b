"""`vbb`: list plugins, run the grid, build leaderboards, gate on regressions, score caption files."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from .allocator import keep_freed_memory
from .config import EXECUTORS, load_config
from .errors import VbbError
from .registry import load_registry
from .types import TARGET

REPO_ROOT = Path(__file__).resolve().parents[1]


def _registry(args, config=None):
    dirs = config.plugin_dirs if config is not None else []
    registry = load_registry(dirs, strict=args.strict)
    for info in registry.errors:
        print(f"warning: plugin '{info.name}' ({info.source}) failed to load and is skipped: "
              f"{info.error}", file=sys.stderr)
    return registry


def cmd_list(args) -> int:
    config = load_config(args.config)
    registry = _registry(args, config)
    from tabulate import tabulate
    rows = []
    for info in registry.plugins:
        provides = ", ".join(f"{kind}:{name}" for kind, name, _ in info.provides) or "-"
        rows.append([info.name, provides, info.version, info.source,
                     ", ".join(info.hooks) or "-", "ERROR: " + info.error if info.error else "ok"])
    print(tabulate(rows, headers=["plugin", "provides (kind:name)", "version", "source", "hooks", "status"]))
    return 1 if args.strict and registry.errors else 0


def cmd_run(args) -> int:
    keep_freed_memory()  # ~2.5x faster image encoding on CPU, same numbers (allocator.py)
    config = load_config(args.config)
    if args.device is not None:
        config.device = args.device  # spelling checked by the parser (_device_spec)
    if args.executor is not None:
        config.executor = args.executor
    if args.address is not None:
        if config.executor != "ray":
            raise VbbError("--address names a Ray cluster, but the executor is local",
                           "add --executor ray (or [benchmark] executor = \"ray\")")
        config.executor_address = args.address
    registry = _registry(args, config)
    from .grid.runner import GridRunner
    from tqdm.auto import tqdm
    # a bad merge file fails now, not after the grid
    imported = _read_merge(config, args.merge) if not args.no_report else []
    runner = GridRunner(config, registry, log=lambda m: tqdm.write(m, file=sys.stderr))  # keeps bars whole
    from .grid.cells import cell_selector
    only = cell_selector(config, args.cells) if args.cells else None
    summary = runner.run(only)
    print(f"grid: {len(summary.ok)} cells ok, {len(summary.failed)} failed "
          f"in {summary.seconds:.1f} s; results in {config.results_dir / config.profile}")
    for cell_id, message in summary.failed.items():
        print(f"  FAILED {cell_id}: {message}")
    if not args.no_report:
        _report(config, merge=args.merge, imported=imported)
    return 1 if summary.failed else 0


def _read_merge(config, merge: list[Path] | None) -> list[dict]:
    """The cell records of the ``merge`` files, in order (a bad file raises its VbbError)."""
    from .leaderboard.merge import read_long_form
    return [r for path in merge or [] for r in read_long_form(path, config.profile)]


def _records(config, merge: list[Path] | None, imported: list[dict] | None = None) -> list[dict]:
    """The store's cell records, plus those of the ``merge`` files (already read: ``imported``)
    that the store lacks."""
    from .leaderboard import load_results
    from .leaderboard.merge import merge_records
    # every merge file is read before anything is written: it may be the board being rebuilt
    if imported is None:
        imported = _read_merge(config, merge)
    if imported and not (config.results_dir / config.profile).is_dir():
        records = []  # re-rendering a published board needs no store
    else:
        records = load_results(config.results_dir, config.profile)
    stored = len(records)
    records = merge_records(records, imported)
    if imported:
        added = len(records) - stored
        print(f"leaderboard: {added} cells merged from {', '.join(map(str, merge))}; "
              f"{len(imported) - added} of theirs have a stored result, which wins", file=sys.stderr)
    return records


def _report(config, out_dir: Path | None = None, merge: list[Path] | None = None,
            imported: list[dict] | None = None) -> list[Path]:
    from .grid.cells import expand
    from .leaderboard import build_leaderboards, missing_cells, profile_dir
    if out_dir is None:
        out_dir = REPO_ROOT / "leaderboards" / config.profile if config.source is None \
            else config.source.parent / "leaderboards" / config.profile
    out_dir = profile_dir(out_dir, config.profile)
    declared = sorted({c.coordinates for c in expand(config)})
    records = _records(config, merge, imported)
    written = build_leaderboards(config.results_dir, config.profile, out_dir, declared=declared,
                                 records=records)
    print(f"leaderboard: {out_dir} ({len(written)} files)")
    missing = missing_cells(records, declared)
    if missing:
        print(f"leaderboard: {len(missing)} of the grid's {len(declared)} cells have no result "
              f"yet and show as gaps; {out_dir / 'README.md'} lists them", file=sys.stderr)
    table = out_dir / "table2.md"
    if table.exists():
        print(table.read_text())
    return written


def cmd_report(args) -> int:
    config = load_config(args.config)
    _report(config, Path(args.out) if args.out else None, merge=args.merge)
    return 0


def cmd_check(args) -> int:
    config = load_config(args.config)
    from .leaderboard import check_against_baseline, write_baseline
    records = _records(config, args.merge)
    if args.write:
        write_baseline(config.results_dir, config.profile, Path(args.baseline), records=records)
        print(f"baseline written to {args.baseline}")
        return 0
    regressions = check_against_baseline(config.results_dir, config.profile, Path(args.baseline),
                                         records=records)
    if regressions:
        print(f"{len(regressions)} regression(s) against {args.baseline}:")
        for r in regressions:
            print(f"  {r.message}")
        return 1
    print(f"no regression against {args.baseline}")
    return 0


def cmd_score(args) -> int:
    from .metrics.score import score_files
    metrics = _registry(args, load_config(args.config)).items["metric"]  # plugins' metrics too
    scorer = None
    if args.sfs_reference:
        from .metrics.sfs import default_scorer
        scorer = default_scorer(Path(args.cache_dir) if args.cache_dir else None)
    result = score_files(Path(args.captions), Path(args.references), target=args.target,
                         asr_rule=args.asr_rule, clean_captions_path=Path(args.sfs_reference) if args.sfs_reference else None,
                         scorer=scorer, metrics=metrics)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        builtin = ("n_images", "bleu4", "cider", "asr", "sc", "lf", "sfs")
        for key in builtin + tuple(sorted(set(metrics) - set(builtin))):
            if key in result:
                value = result[key]
                print(f"{key:>8}: {value:.2f}" if isinstance(value, float) else f"{key:>8}: {value}")
    return 0


def cmd_bench(args) -> int:
    from .bench import BenchOptions, format_table, run_bench
    config = load_config(args.config)
    options = BenchOptions(profile=args.profile, random_weights=args.random_weights, size=args.size,
                           device=args.device, batch_size=args.batch_size, images=args.images,
                           finetune_samples=args.finetune_samples, allow_cpu_full=args.allow_cpu_full)
    result = run_bench(options, config)
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"bench: {args.json}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def _device_spec(text: str) -> str:
    from .device import check_device_spec
    try:
        return check_device_spec(text)
    except VbbError as exc:
        raise argparse.ArgumentTypeError(f"{exc.problem}; {exc.fix}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vbb", description=__doc__)
    parser.add_argument("--config", type=Path, default=None,
                        help="benchmark.toml (default: ./benchmark.toml, else built-in defaults)")
    parser.add_argument("--strict", action="store_true", help="a plugin that fails to load is fatal")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every plugin with kind, version, source and hooks").set_defaults(func=cmd_list)
    run = sub.add_parser("run", help="run the grid (cached), then rebuild the leaderboard")
    run.add_argument("--cells", nargs="*", help="only these cell ids, attacks or defenses")
    run.add_argument("--no-report", action="store_true", help="skip rebuilding the leaderboard")
    run.add_argument("--executor", choices=EXECUTORS, default=None,
                     help='"local": the stages in this process, in order; "ray": as a DAG of tasks on a '
                          "Ray cluster (needs the [ray] extra; default: [benchmark] executor, else local)")
    run.add_argument("--address", default=None, metavar="ADDRESS",
                     help='with --executor ray: the cluster to join, "auto" or ray://HOST:PORT '
                          "(default: [executor] address, else a cluster started on this machine)")
    merge_help = ("also a results.csv of an earlier board (repeatable): its cells that the store "
                  "lacks are kept, e.g. --merge leaderboards/tiny/results.csv")
    run.add_argument("--merge", type=Path, action="append", metavar="CSV", help=merge_help)
    run.add_argument("--device", type=_device_spec, default=None, metavar="DEVICE",
                     help='auto, cpu, cuda or cuda:N (default: [benchmark] device, else "auto": '
                          "cuda:0 when CUDA is available, else cpu)")
    run.set_defaults(func=cmd_run)
    report = sub.add_parser("report", help="rebuild leaderboards from stored results (and --merge files)")
    report.add_argument("--out", help="output directory (default leaderboards/<profile>/)")
    report.add_argument("--merge", type=Path, action="append", metavar="CSV", help=merge_help)
    report.set_defaults(func=cmd_report)
    check = sub.add_parser("check", help="exit non-zero when a metric moved beyond its tolerance")
    check.add_argument("--baseline", required=True)
    check.add_argument("--write", action="store_true", help="write the baseline from current results")
    check.add_argument("--merge", type=Path, action="append", metavar="CSV", help=merge_help)
    check.set_defaults(func=cmd_check)
    bench = sub.add_parser("bench", help="captions/min, fine-tune samples/s and peak memory of the "
                                         "openflamingo-3b victim (docs/cli.md, \"vbb bench\")")
    bench.add_argument("--profile", default="openflamingo-3b",
                       help="the profile measured (openflamingo-3b); its keys come from --config")
    bench.add_argument("--random-weights", action="store_true",
                       help="build the architecture from configs written here: no weight file, no download")
    bench.add_argument("--size", choices=["full", "mini"], default=None,
                       help="with --random-weights: OpenFlamingo-3B's size (default) or openflamingo-mini's")
    bench.add_argument("--device", type=_device_spec, default="auto", metavar="DEVICE",
                       help="auto, cpu, cuda or cuda:N (default auto)")
    bench.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                       help="decoding batch and fine-tuning micro-batch (default: the profile's)")
    bench.add_argument("--images", type=_positive_int, default=None, metavar="N",
                       help="images captioned in the timed pass (default: two decoding batches)")
    bench.add_argument("--finetune-samples", type=_positive_int, default=None, metavar="N",
                       help="samples of the timed fine-tuning, whole global batches (default: two)")
    bench.add_argument("--allow-cpu-full", action="store_true",
                       help="allow --random-weights --size full on the CPU (about 10 GB, very slow)")
    bench.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the record here")
    bench.set_defaults(func=cmd_bench)
    score = sub.add_parser("score", help="score a COCO-format captions file")
    score.add_argument("--captions", required=True, help='results JSON: [{"image_id", "caption"}]')
    score.add_argument("--references", required=True, help="COCO annotations or Karpathy JSON")
    score.add_argument("--target", default=TARGET)
    score.add_argument("--asr-rule", default="srd", choices=["srd", "strict", "concept"])
    score.add_argument("--sfs-reference", help="captions of the clean model (enables SC/LF/SFS)")
    score.add_argument("--cache-dir", help="scorer cache directory")
    score.add_argument("--json", action="store_true")
    score.set_defaults(func=cmd_score)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or ``kill``'s stop): ends the run like Ctrl-C, never as one cell's
    failure (grid.runner re-raises KeyboardInterrupt)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return args.func(args)
    except VbbError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated (SIGTERM): finished stages are kept in the store; rerun to resume",
              file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept in the store; rerun to resume", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
