"""Sweeps: comma-separated option values expand to their cartesian product, each a separate run."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, TextIO

from tuner import catalog
from tuner.launch import RunConfig, build_config, make_runner
from tuner.report import compare


def expand(workload: str, argv: list[str]) -> list[dict[str, Any]]:
    """Option dicts for every combination; ``--seq-len 1024,4096 --attention-backend flash,flex`` gives 4."""
    spec = catalog.get(workload)
    ns = catalog.build_parser_for(spec).parse_args(argv)
    given = {k: v for k, v in vars(ns).items() if v is not None}
    axes = [(k, str(v).split(",")) if isinstance(v, str) else (k, [v]) for k, v in given.items()]
    keys = [k for k, _ in axes]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(vals for _, vals in axes))]


def plan(workload: str, argv: list[str], timeout: float = 0.0, sample_hz: float = 10.0) -> list[RunConfig]:
    """Validated configs for every combination; any bad one stops the sweep before anything runs."""
    return [build_config(workload, combo, timeout=timeout, sample_hz=sample_hz) for combo in expand(workload, argv)]


def run_sweep(configs: list[RunConfig], out_dir: Path, out: TextIO, telemetry: bool = True) -> int:
    """Run each config in turn, then print one comparison table; 0 only if every run ended ok."""
    records = []
    for n, config in enumerate(configs, 1):
        print(f"[{n}/{len(configs)}] {config.command_line}", file=out, flush=True)
        runner = make_runner(config, out_dir, telemetry)
        try:
            result = runner.run()
        except KeyboardInterrupt:
            runner.cancel()
            result = runner.wait()
            records.append(result.record)
            print(f"  {result.status}: {result.record_path}", file=out)
            break
        records.append(result.record)
        print(f"  {result.status}: {result.record_path}", file=out, flush=True)
    if len(records) >= 2:
        print(compare(records), file=out)
    return 0 if records and all(r["status"] == "ok" for r in records) and len(records) == len(configs) else 1
