"""A bench config: a TOML file of jobs, read into frozen dataclasses and checked before anything runs.

Unknown keys at any level are refused; a job's options go through the workload's own checks
(tuner.launch.build_config, as a sweep does), a command job through tuner.launch.command_config.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from tuner.bench import BenchError
from tuner.command import Command, CommandError
from tuner.launch import LaunchError, RunConfig, build_config, command_config
from tuner.metrics import REGISTRY, applies, figure_of
from workloads.options import OptionError

DEFAULT_TOLERANCE = 0.05
DIRECTIONS = ("higher", "lower")
_TOP = {"name", "repeats", "tolerance", "timeout", "job"}
_JOB = {"name", "workload", "options", "command", "cwd", "env", "parse", "repeats", "timeout", "watch"}
_WATCH = {"metric", "stat", "tolerance", "direction"}


@dataclass(frozen=True)
class Watch:
    """One watched figure: a registry metric (a statistic of a described one), its tolerance and direction."""

    metric: str
    stat: str | None
    tolerance: float
    higher_is_better: bool

    @property
    def key(self) -> str:
        """The history's metric name: ``name`` or ``name.stat`` (tuner.metrics.Figure.key)."""
        return f"{self.metric}.{self.stat}" if self.stat else self.metric


@dataclass(frozen=True)
class Job:
    """One job: a validated run config, repeated ``repeats`` times, and its watched figures."""

    name: str
    run: RunConfig
    repeats: int
    watch: tuple[Watch, ...]


@dataclass(frozen=True)
class BenchConfig:
    """A whole bench file."""

    name: str
    path: str
    sha256: str
    jobs: tuple[Job, ...]

    def job(self, name: str) -> Job:
        for job in self.jobs:
            if job.name == name:
                return job
        raise BenchError(f"{self.path}: no job {name!r}; jobs: {', '.join(j.name for j in self.jobs)}")


def _keys(table: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise BenchError(f"{where}: expected a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise BenchError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    return table


def _number(value: Any, where: str, lo: float, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value < hi:
        raise BenchError(f"{where}: {value!r} is not a number in [{lo:g}, {hi:g})")
    return float(value)


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BenchError(f"{where}: {value!r} is not an integer >= 1")
    return value


def _watch(item: Any, workload: str, tolerance: float, where: str) -> Watch:
    item = _keys(item, _WATCH, where)
    try:
        metric, stat = figure_of(item.get("metric"), item.get("stat"), workload)
    except ValueError as exc:
        raise BenchError(f"{where}: {exc}") from None
    direction = item.get("direction")
    if direction is not None and direction not in DIRECTIONS:
        raise BenchError(f"{where}: direction {direction!r}: expected higher or lower (is better)")
    better = metric.higher_is_better if direction is None else direction == "higher"
    tol = _number(item.get("tolerance", tolerance), f"{where}: tolerance", 0.0, 10.0)
    return Watch(metric.name, stat, tol, better)


def headline_watches(workload: str, tolerance: float) -> tuple[Watch, ...]:
    """The registry's headline figures of a workload, watched with ``tolerance`` in their own direction."""
    return tuple(Watch(m.name, stat if m.described else None, tolerance, m.higher_is_better)
                 for m in REGISTRY if m.headline and applies(m, workload)
                 for stat in (m.headline if m.described else (None,)))


def _run_config(job: dict[str, Any], where: str, timeout: float) -> RunConfig:
    command, workload = job.get("command"), job.get("workload")
    if (command is None) == (workload is None):
        raise BenchError(f"{where}: give a workload or a command, not both or neither")
    try:
        if command is not None:
            if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
                raise BenchError(f"{where}: command: expected a list of strings")
            if "options" in job:
                raise BenchError(f"{where}: options belong to a workload job; a command takes its own arguments")
            env = job.get("env", {})
            if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
                raise BenchError(f"{where}: env: expected a table of strings")
            cmd = Command(tuple(command), cwd=job.get("cwd"), env=env, parse=job.get("parse"))
            return command_config(cmd, timeout=timeout)
        if any(k in job for k in ("cwd", "env", "parse")):
            raise BenchError(f"{where}: cwd, env and parse belong to a command job")
        options = job.get("options", {})
        if not isinstance(options, dict):
            raise BenchError(f"{where}: options: expected a table")
        return build_config(str(workload), options, timeout=timeout)
    except (OptionError, LaunchError, CommandError) as exc:
        raise BenchError(f"{where}: {exc}") from None


def parse(doc: dict[str, Any], path: str = "<bench>", sha256: str = "") -> BenchConfig:
    """A checked BenchConfig from a parsed TOML document (BenchError, one line, at the first problem)."""
    doc = _keys(doc, _TOP, path)
    name = doc.get("name", Path(path).stem)
    if not isinstance(name, str) or not name:
        raise BenchError(f"{path}: name: expected a string")
    repeats = _count(doc.get("repeats", 1), f"{path}: repeats")
    tolerance = _number(doc.get("tolerance", DEFAULT_TOLERANCE), f"{path}: tolerance", 0.0, 10.0)
    timeout = _number(doc.get("timeout", 0.0), f"{path}: timeout", 0.0)
    raw_jobs = doc.get("job", [])
    if not isinstance(raw_jobs, list) or not raw_jobs:
        raise BenchError(f"{path}: no [[job]]")
    jobs: list[Job] = []
    for i, raw in enumerate(raw_jobs, 1):
        jname = raw.get("name") if isinstance(raw, dict) else None
        if not isinstance(jname, str) or not jname:
            raise BenchError(f"{path}: job {i}: name: expected a string")
        where = f"{path}: job {jname!r}"
        raw = _keys(raw, _JOB, where)
        if any(j.name == jname for j in jobs):
            raise BenchError(f"{where}: the name is used twice")
        config = _run_config(raw, where, _number(raw.get("timeout", timeout), f"{where}: timeout", 0.0))
        watches = raw.get("watch", [])
        if not isinstance(watches, list):
            raise BenchError(f"{where}: watch: expected a list of tables")
        watch = tuple(_watch(w, config.workload, tolerance, f"{where}: watch {n}") for n, w in enumerate(watches, 1))
        if not watches:  # the workload's headline figures (a sweep table's columns)
            watch = headline_watches(config.workload, tolerance)
        jobs.append(Job(jname, config, _count(raw.get("repeats", repeats), f"{where}: repeats"), watch))
    return BenchConfig(name, path, sha256, tuple(jobs))


def load(path: str | Path) -> BenchConfig:
    """Read and check a bench file (BenchError, one line, when it is unreadable or wrong)."""
    try:
        data = Path(path).read_bytes()
        doc = tomllib.loads(data.decode())
    except OSError as exc:
        raise BenchError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BenchError(f"{path}: not TOML: {exc}") from None
    return parse(doc, str(path), hashlib.sha256(data).hexdigest())


__all__ = ["BenchConfig", "Job", "Watch", "headline_watches", "load", "parse"]
