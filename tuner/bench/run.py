"""One bench round: run every job's repeats (as a sweep runs its configs), append them to the history, detect
regressions and write the report. Exit status 0 ok, 1 on a regression, missing data or a failed run.
With a live endpoint (``btune bench --metrics-port``), one endpoint serves the whole round: it follows each run
as it starts (labels run and workload say which)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tuner import runs
from tuner.bench import BenchError
from tuner.bench.config import BenchConfig, Job
from tuner.bench.detect import Finding, baseline_rule, change_rule, missing, round_means
from tuner.bench.history import History
from tuner.bench.report import as_json, markdown
from tuner.console import ConsoleSignals
from tuner.launch import make_runner
from tuner.metrics import REGISTRY, Figure, dig, headline_figures, number
from tuner.runner import Runner
from tuner.sweep import run_to_end

_METRICS = {m.name: m for m in REGISTRY}


def figures_of(record: dict[str, Any], job: Job) -> list[tuple[str, float, str, bool, float | None]]:
    """A run's headline figures and watched figures as ``(key, value, unit, higher_is_better, tolerance)``,
    numbers only: a headline figure in the registry's direction with no tolerance, a watched one as its watch
    declares (the history's views read both)."""
    summary = record.get("summary") or {}
    out: dict[str, tuple[float, str, bool, float | None]] = {}
    for fig in headline_figures(summary, job.run.workload):
        if number(fig.value) and math.isfinite(fig.value):
            out[fig.key] = (float(fig.value), fig.unit, fig.metric.higher_is_better, None)
    for w in job.watch:
        m = _METRICS[w.metric]
        value = dig(summary, m.path)
        if w.stat is not None:
            value = value.get(w.stat) if isinstance(value, dict) else None
        fig = Figure(m, w.stat, value)
        if number(value) and math.isfinite(value):
            out[fig.key] = (float(value), fig.unit, w.higher_is_better, w.tolerance)
    return [(k, *v) for k, v in out.items()]


def environment_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The round's environment from its first record that has one: GPU name, driver, torch, btune, host."""
    for rec in records:
        env = rec.get("environment")
        if isinstance(env, dict):
            gpus = env.get("gpus") or []
            names = sorted({str(g.get("name")) for g in gpus if isinstance(g, dict) and g.get("name")})
            return {"gpu": ", ".join(names) or "none", "driver": env.get("driver"),
                    "torch": (env.get("versions") or {}).get("torch"), "btune": env.get("btune"),
                    "host": env.get("host")}
    return {}


def _baseline_round(rounds: list[dict[str, Any]], runs_by_round: dict[int, set[str]], round_id: int, job: str,
                    pinned: int | None) -> int | None:
    if pinned is not None:
        return pinned
    earlier = [r["id"] for r in rounds if r["id"] < round_id and job in runs_by_round.get(r["id"], set())]
    return earlier[-1] if earlier else None


def analyse(history: History, config: BenchConfig, jobs: list[Job], round_id: int,
            pinned: int | None = None) -> list[Finding]:
    """Every verdict on this round: failed runs, the baseline rule, the change-point rule, missing data."""
    rounds = history.rounds(config.name)
    values = history.values(None if pinned is not None else config.name)
    runs_by_round = {r["id"]: set(history.job_runs(r["id"])) for r in rounds}
    findings: list[Finding] = []
    for job in jobs:
        statuses = history.job_runs(round_id).get(job.name, [])
        failed = [s for s in statuses if s != "ok"]
        if failed:
            kinds = ", ".join(sorted(set(failed)))
            findings.append(Finding(job.name, "-", "failed", True,
                                    f"FAILED: {len(failed)} of {len(statuses)} runs ({kinds})"))
        base = _baseline_round(rounds, runs_by_round, round_id, job.name, pinned)
        for w in job.watch:
            now = values.get((round_id, job.name, w.key), [])
            before = values.get((base, job.name, w.key), []) if base is not None else []
            if before and not now:
                findings.append(missing(job.name, w.key, base))
            elif before and now:
                findings.append(baseline_rule(job.name, w.key, before, now, w.tolerance, w.higher_is_better, base))
            ids, series = round_means({r["id"]: values.get((r["id"], job.name, w.key), []) for r in rounds})
            if now and ids:
                findings += change_rule(job.name, w.key, ids, series, w.tolerance, w.higher_is_better)
    return findings


def run_bench(config: BenchConfig, jobs: list[Job], out_base: Path, history: History, out: TextIO,
              commit: str | None = None, baseline: int | None = None, telemetry: bool = True,
              metrics: Any = None) -> int:
    """Run one round and report it (see the module docstring for the exit status). ``metrics``: a live endpoint
    (tuner.prom.MetricsServer) that serves each run while it runs."""
    if baseline is not None and baseline not in {r["id"] for r in history.rounds()}:
        raise BenchError(f"--baseline {baseline}: no such round in {history.path}")
    started = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    result_dir = out_base / "bench" / f"{runs.safe_id(config.name)}-{stamp}"
    n = 1
    while result_dir.exists():  # two rounds in one second
        n += 1
        result_dir = out_base / "bench" / f"{runs.safe_id(config.name)}-{stamp}-{n}"
    try:
        result_dir.mkdir(parents=True)
    except OSError as exc:
        raise BenchError(f"cannot create {result_dir}: {exc.strerror or exc}") from None
    round_id = history.start_round(config.name, config.sha256, commit, str(result_dir), started)
    total = sum(j.repeats for j in jobs)
    current: list[Runner] = []
    stopped: list[str] = []
    records: list[dict[str, Any]] = []
    job_docs: list[dict[str, Any]] = []

    def stop(reason: str) -> None:  # SIGTERM/SIGHUP: cancel this run, start no other
        stopped.append(reason)
        if current:
            current[-1].cancel(reason)

    print(f"btune bench {config.name}: round {round_id}, {len(jobs)} jobs, {total} runs -> {result_dir}",
          file=out, flush=True)
    done = 0
    with ConsoleSignals(stop):
        for job in jobs:
            rows: list[dict[str, Any]] = []
            for one in job.run.repeats(job.repeats):
                done += 1
                idx = one.repeat[0]
                if stopped:
                    rows.append({"repeat": idx, "status": "not run", "metrics": []})
                    continue
                print(f"[{done}/{total}] {job.name} {idx}/{job.repeats}: {one.command_line}", file=out, flush=True)
                t0 = time.monotonic()
                try:
                    runner = make_runner(one, result_dir, telemetry)
                    current.append(runner)
                    if metrics is not None:
                        metrics.follow(runner, one)
                    result = run_to_end(runner, stopped)
                except (OSError, RuntimeError) as exc:  # the run could not start: a failed row, the round goes on
                    print(f"  error: {exc}", file=out, flush=True)
                    rows.append({"repeat": idx, "status": "error", "metrics": []})
                    continue
                records.append(result.record)
                figs = figures_of(result.record, job) if result.status == "ok" else []
                rows.append({"repeat": idx, "run_id": result.run_id, "record_path": str(result.record_path),
                             "status": result.status, "metrics": figs})
                print(f"  {result.status} in {time.monotonic() - t0:.1f} s: {result.record_path}", file=out,
                      flush=True)
                if result.write_error:
                    print(f"error: {result.write_error}", file=sys.stderr)
            history.add_job(round_id, job.name, rows)
            figures: dict[str, dict[str, Any]] = {}
            for row in rows:
                for key, value, unit, *_ in row["metrics"]:
                    figures.setdefault(key, {"values": [], "unit": unit})["values"].append(value)
            for fig in figures.values():
                fig["mean"] = math.fsum(fig["values"]) / len(fig["values"])
            job_docs.append({"name": job.name, "workload": job.run.workload, "command_line": job.run.command_line,
                             "runs": [{k: v for k, v in r.items() if k != "metrics"} for r in rows],
                             "figures": figures})
    env = environment_of(records)
    history.end_round(round_id, env)
    findings = analyse(history, config, jobs, round_id, baseline)
    rnd = next(r for r in history.rounds() if r["id"] == round_id)
    summary = {"config": {"name": config.name, "path": config.path, "sha256": config.sha256},
               "round": {"id": rnd["id"], "started": rnd["started"], "ended": rnd["ended"],
                         "commit": rnd["git_commit"], **env},
               "baseline": baseline, "history": str(history.path), "result_dir": str(result_dir), "jobs": job_docs}
    text = markdown(summary, findings)
    try:
        runs.atomic_write(result_dir / "summary.json", runs.dumps(summary))
        runs.atomic_write(result_dir / "report.json", runs.dumps(as_json(summary, findings)))
        runs.atomic_write(result_dir / "report.md", text.encode())
    except OSError as exc:
        raise BenchError(f"cannot write the report in {result_dir}: {exc.strerror or exc}") from None
    print(file=out)
    print(text, file=out, end="")
    return 1 if any(f.regression for f in findings) or stopped else 0
