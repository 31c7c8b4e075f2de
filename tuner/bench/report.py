"""A round's report: markdown (printed and written) and JSON, from its runs and findings."""

from __future__ import annotations

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
