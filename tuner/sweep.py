"""Sweeps: comma-separated option values expand to their cartesian product, each a separate run."""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path
from typing import Any, TextIO

from tuner import catalog
from tuner.console import ConsoleSignals
from tuner.launch import RunConfig, build_config, make_runner
from tuner.report import WIDTH, sweep_table
from tuner.runner import Runner
from workloads.engine.loadgen import ARITY

#: A value that holds commas of its own: a distribution such as ``uniform:4,48`` or ``normal:512,64``.
_DISTRIBUTION = re.compile(r"([A-Za-z_]+):")


def split_values(text: str) -> list[str]:
    """A comma-separated list of values, where a distribution keeps its own commas: ``uniform:4,48,16``
    is ``uniform:4,48`` and ``16``; ``1024,4096`` is two values (a distribution's arity from loadgen)."""
    out: list[str] = []
    need = 0  # numbers the last distribution still takes
    for part in text.split(","):
        if need > 0 and not _DISTRIBUTION.match(part):
            out[-1] += "," + part
            need -= 1
            continue
        m = _DISTRIBUTION.match(part)
        need = ARITY.get(m.group(1), 1 << 30) - 1 if m else 0
        out.append(part)
    return out


def expand(workload: str, argv: list[str]) -> list[dict[str, Any]]:
    """Option dicts for every combination; ``--seq-len 1024,4096 --attention-backend flash,flex`` gives 4."""
    spec = catalog.get(workload)
    ns = catalog.build_parser_for(spec).parse_args(argv)
    given = {k: v for k, v in vars(ns).items() if v is not None}
    axes = [(k, split_values(v)) if isinstance(v, str) else (k, [v]) for k, v in given.items()]
    keys = [k for k, _ in axes]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(vals for _, vals in axes))]


def plan(workload: str, argv: list[str], timeout: float = 0.0, sample_hz: float = 10.0) -> list[RunConfig]:
    """Validated configs for every combination; any bad one stops the sweep before anything runs."""
    return [build_config(workload, combo, timeout=timeout, sample_hz=sample_hz) for combo in expand(workload, argv)]


def run_to_end(runner: Runner, stopped: list[str]) -> Any:
    """``runner``'s run to its end; Ctrl+C cancels it, waits for its record and notes "interrupted" in
    ``stopped`` (so the caller starts no further run)."""
    try:
        return runner.run()
    except KeyboardInterrupt:
        runner.cancel()
        stopped.append("interrupted")
        return runner.wait()


def run_sweep(configs: list[RunConfig], out_dir: Path, out: TextIO, telemetry: bool = True,
              width: int = WIDTH) -> int:
    """Run each config in turn, then print one table (tuner.report.sweep_table: a row per run, named by the
    options that differ, ``width`` columns at most); 0 only if every run ended ok."""
    records = []
    current: list[Runner] = []
    stopped: list[str] = []

    def stop(reason: str) -> None:  # SIGTERM/SIGHUP: cancel this run, start no other
        stopped.append(reason)
        if current:
            current[-1].cancel(reason)

    with ConsoleSignals(stop):
        for n, config in enumerate(configs, 1):
            if stopped:
                break
            print(f"[{n}/{len(configs)}] {config.command_line}", file=out, flush=True)
            runner = make_runner(config, out_dir, telemetry)
            current.append(runner)
            result = run_to_end(runner, stopped)
            records.append(result.record)
            print(f"  {result.status}: {result.record_path}", file=out, flush=True)
            if result.write_error:
                print(f"error: {result.write_error}", file=sys.stderr)
                return 2
    if len(records) >= 2:
        print(sweep_table(records, width=width), file=out)
    return 0 if records and all(r["status"] == "ok" for r in records) and len(records) == len(configs) else 1
