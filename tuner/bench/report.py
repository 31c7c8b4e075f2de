"""A round's report: markdown (printed and written) and JSON, from its runs and findings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuner.bench.detect import Finding
from tuner.report import fmt


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def markdown(summary: dict[str, Any], findings: list[Finding]) -> str:
    """The report as markdown: the round, each job's figures (mean of its runs), then every verdict."""
    rnd = summary["round"]
    lines = [f"# btune bench {summary['config']['name']}: round {rnd['id']}", "",
             f"- started {rnd['started']}, commit {rnd.get('commit') or '-'}, GPU {rnd.get('gpu') or '-'}, "
             f"host {rnd.get('host') or '-'}",
             f"- results: {summary['result_dir']}", ""]
    regressions = [f for f in findings if f.regression]
    lines.append(f"**{len(regressions)} alert{'s' if len(regressions) != 1 else ''}**" if regressions
                 else "**no regression, no missing data**")
    lines += ["", "| job | figure | runs | mean | unit |", "|---|---|---|---|---|"]
    for job in summary["jobs"]:
        statuses = [r["status"] for r in job["runs"]]
        ok = sum(s == "ok" for s in statuses)
        for key, fig in job["figures"].items():
            lines.append(f"| {_cell(job['name'])} | {key} | {ok}/{len(statuses)} ok | {fmt(fig['mean'])} | "
                         f"{fig['unit']} |")
        if not job["figures"]:
            lines.append(f"| {_cell(job['name'])} | - | {ok}/{len(statuses)} ok | - | |")
    lines += ["", "| job | figure | rule | verdict |", "|---|---|---|---|"]
    for f in sorted(findings, key=lambda f: (not f.regression, f.job, f.metric)):
        lines.append(f"| {_cell(f.job)} | {f.metric} | {f.rule} | {_cell(f.message)} |")
    if not findings:
        lines.append("| - | - | - | no earlier round to compare against |")
    return "\n".join(lines) + "\n"


def as_json(summary: dict[str, Any], findings: list[Finding]) -> dict[str, Any]:
    """The report as one JSON document: the summary and every finding."""
    return {**summary, "findings": [f.as_dict() for f in findings],
            "regression": any(f.regression for f in findings)}


@dataclass(frozen=True)
class HistorySeries:
    """One (job, figure) series of the history: the mean of its runs per round, and the rounds where the
    change-point rule found a significant change (``Finding.message`` says which way, ``REGRESSION`` where it
    would alert). ``rows``: the series' flat rows (one per run), oldest round first."""

    job: str
    metric: str
    unit: str
    rounds: tuple[int, ...]
    means: tuple[float, ...]
    changes: dict[int, Finding]
    rows: tuple[dict[str, Any], ...]


#: The smallest change the history views mark for a figure no watch gave a tolerance.
DEFAULT_TOLERANCE = 0.05


def history_series(rows: list[dict[str, Any]], job: str | None = None, metric: str | None = None,
                   tolerance: float | None = None) -> list[HistorySeries]:
    """Each (job, figure) series of the history's flat rows (History.rows), of one job and figure when given,
    sorted by job and figure, each with its change points (tuner.bench.detect.change_rule): in the direction and
    with the tolerance its bench config's watch declared (the latest round's), else the registry's direction and
    ``tolerance`` (default DEFAULT_TOLERANCE); a ``tolerance`` given overrides the watches'."""
    from tuner.bench.detect import change_rule, round_means
    from tuner.metrics import REGISTRY

    better = {m.name: m.higher_is_better for m in REGISTRY}
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if (job and row["job"] != job) or (metric and row["metric"] != metric):
            continue
        grouped.setdefault((row["job"], row["metric"]), []).append(row)
    out: list[HistorySeries] = []
    for (jname, key), own in sorted(grouped.items()):
        by_round: dict[int, list[float]] = {}
        for row in own:
            by_round.setdefault(row["round"], []).append(row["value"])
        ids, means = round_means(by_round)
        watched = [r for r in own if r.get("better") is not None]
        higher = watched[-1]["better"] if watched else better.get(key.split(".")[0], True)
        declared = [r["tolerance"] for r in own if r.get("tolerance") is not None]
        tol = tolerance if tolerance is not None else (declared[-1] if declared else DEFAULT_TOLERANCE)
        changes = {f.baseline: f for f in change_rule(jname, key, ids, means, tol, higher)
                   if f.baseline is not None}
        out.append(HistorySeries(jname, key, own[0]["unit"] or "", tuple(ids), tuple(means), changes,
                                 tuple(sorted(own, key=lambda r: r["round"]))))
    return out


def history_chart(rows: list[dict[str, Any]], job: str | None = None, metric: str | None = None,
                  tolerance: float | None = None, width: int = 30) -> str:
    """Each (job, figure) series of the history as text, a row per round with a bar, and its significant
    changes marked (the change-point rule; ``REGRESSION`` where it would alert)."""
    meta = {row["round"]: row for row in rows
            if not ((job and row["job"] != job) or (metric and row["metric"] != metric))}
    series = history_series(rows, job, metric, tolerance)
    if not series:
        return "no values" + (f" of job {job!r}" if job else "") + (f", figure {metric!r}" if metric else "")
    out: list[str] = []
    for s in series:
        marks = {i: f.message for i, f in s.changes.items()}
        lo, hi = min(s.means), max(s.means)
        out.append(f"{s.job} {s.metric}" + (f" ({s.unit})" if s.unit else ""))
        for i, mean in zip(s.rounds, s.means, strict=True):
            bar = "#" * (1 + round((width - 1) * (mean - lo) / (hi - lo))) if hi > lo else "#" * (width // 2)
            mark = f"  <- {marks[i]}" if i in marks else ""
            info = meta[i]
            out.append(f"  round {i:>4}  {info['started']}  {str(info.get('commit') or '-')[:10]:<10}  "
                       f"{fmt(mean):>10}  {bar:<{width}}{mark}".rstrip())
        out.append("")
    return "\n".join(out).rstrip() + "\n"


EXPORT_COLUMNS = ("round", "started", "commit", "gpu", "job", "metric", "value", "unit", "run_id")


def export_rows(rows: list[dict[str, Any]], format_: str) -> bytes:
    """The history's flat rows (EXPORT_COLUMNS) as CSV or a JSON list."""
    if format_ == "json":
        from tuner.runs import dumps

        return dumps([{k: r[k] for k in EXPORT_COLUMNS} for r in rows]) + b"\n"
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    writer.writerows([r[k] for k in EXPORT_COLUMNS] for r in rows)
    return buf.getvalue().encode()
