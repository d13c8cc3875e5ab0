"""`python -m benchmarks`: run every scenario with its baseline in one run, or rebuild the report.

    python -m benchmarks run --quick      # the CI-sized run, under three minutes
    python -m benchmarks run --full       # the figures for RESULTS.md (about 8 minutes on two cores)
    python -m benchmarks run --smoke      # every scenario at a few hundred requests (the test suite's)
    python -m benchmarks report [FILE]    # RESULTS.md section and plots from a result file

A run writes benchmarks/results/<size>-<time>.json (machine, versions,
settings, every figure) and, unless --no-report, the report from it: a full
run rewrites RESULTS.md's generated section and results/plots/, a smaller
one writes <size>-<time>.md and results/plots-<size>/ beside its JSON.
Every scenario checks the answers it measured; a wrong answer fails the
scenario (exit status 1) rather than counting as speed. Run it on an
otherwise quiet machine, and compare only figures from one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from benchmarks.harness import kailash_venv, machine
from benchmarks.scenarios import SIZES, Context, Result

RESULTS = Path(__file__).resolve().parent / "results"


def _scenarios() -> dict[str, Callable[[Context], Result]]:
    from benchmarks.scenarios import memory, realtime, scale_out, startup, unary, workflow

    return {
        "unary": unary.run,
        "workflow": workflow.run,
        "realtime": realtime.run,
        "memory": memory.run,
        "startup": startup.run,
        "scale_out": scale_out.run,
    }


def run(args: argparse.Namespace) -> int:
    sizes = SIZES[args.size]
    scenarios = _scenarios()
    chosen = args.only.split(",") if args.only else list(scenarios)
    unknown = set(chosen) - set(scenarios)
    if unknown:
        print(f"unknown scenario(s): {', '.join(sorted(unknown))}; known: {', '.join(scenarios)}", file=sys.stderr)
        return 2
    kailash = None
    if "workflow" in chosen and not args.no_kailash:
        kailash = kailash_venv.ensure()
    record: dict[str, Any] = {
        "size": sizes.name,
        "sizes": sizes.__dict__,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine.describe(),
        "kailash": kailash_venv.REQUIREMENT if kailash else "not run (--no-kailash)",
        "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
        "scenarios": {},
    }
    failed = False
    with tempfile.TemporaryDirectory(prefix="flowport-bench-") as scratch:
        context = Context(sizes, Path(scratch), kailash)
        for name in chosen:
            print(f"— {name} …", file=sys.stderr, flush=True)
            started = time.monotonic()
            try:
                outcome = scenarios[name](context)
            except Exception as exc:  # noqa: BLE001 - recorded, and the run goes on with the next scenario
                failed = True
                outcome = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
                print(outcome["traceback"], file=sys.stderr)
            outcome["seconds_taken"] = round(time.monotonic() - started, 1)
            record["scenarios"][name] = outcome
            print(
                f"  {name}: {'FAILED' if 'error' in outcome else 'ok'} in {outcome['seconds_taken']}s", file=sys.stderr
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{sizes.name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2))
    print(f"results: {path}", file=sys.stderr)
    from benchmarks import report

    print(report.summary(record))
    if not args.no_report:
        # Only a full run replaces the published figures; smaller ones report beside their JSON.
        results_md, plots = _report_paths(path, sizes.name, args.results_md)
        report.write(record, results_md=results_md, plots=plots)
        print(f"report: {results_md}", file=sys.stderr)
    return 1 if failed else 0


def _report_paths(result: Path, size: str, results_md: str | None) -> tuple[Path, Path]:
    """Where the report of `result` goes: RESULTS.md for a full run, beside the JSON otherwise."""
    if results_md is not None:
        return Path(results_md), result.parent / "plots"
    if size == "full":
        return RESULTS.parent / "RESULTS.md", result.parent / "plots"
    return result.with_suffix(".md"), result.parent / f"plots-{size}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run", help="run the scenarios and write a result file")
    size = runner.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick", help="CI-sized (default)")
    size.add_argument("--full", dest="size", action="store_const", const="full", help="the figures for RESULTS.md")
    size.add_argument("--smoke", dest="size", action="store_const", const="smoke", help="smallest: the test suite's")
    runner.set_defaults(size="quick")
    runner.add_argument("--only", help="comma-separated scenarios: unary,workflow,realtime,memory,startup,scale_out")
    runner.add_argument("--no-kailash", action="store_true", help="skip the Kailash gateway (no venv is made)")
    runner.add_argument("--out", default=str(RESULTS), help="folder for result files and plots")
    runner.add_argument(
        "--results-md",
        help="report to update (default: benchmarks/RESULTS.md for --full, <result file>.md otherwise)",
    )
    runner.add_argument("--no-report", action="store_true", help="write the result file only")
    reporter = commands.add_parser("report", help="regenerate RESULTS.md's harness section and the plots")
    reporter.add_argument("file", nargs="?", help="a result file (default: the newest full run, else the newest)")
    reporter.add_argument("--results-md", help="report to update (default: as for `run`)")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args)
    from benchmarks import report

    path = Path(args.file) if args.file else report.newest(RESULTS)
    record = orjson.loads(path.read_bytes())
    print(report.summary(record))
    results_md, plots = _report_paths(path, record["size"], args.results_md)
    report.write(record, results_md=results_md, plots=plots)
    print(f"report: {results_md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
