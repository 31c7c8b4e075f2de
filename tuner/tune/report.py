"""A study's results from its trial rows (tuner.tune.store): the best setting and its exact command, the Pareto
front, what was pruned and why, each knob's effect, and how good the memory estimate was. Works on a finished,
running or interrupted study alike (``btune tune --show``, the app's Tune screen)."""

from __future__ import annotations

import math
import shlex
from typing import Any

from tuner import catalog
from tuner.stats import run_level
from tuner.tune.space import describe, key

MIB = 1024 * 1024
#: The front's dimensions when one objective is tuned: (figure, larger is better, label).
FRONT = (("tokens_per_s", True, "tokens/s"), ("peak_bytes", False, "peak memory"),
         ("joules_per_token", False, "J/token"))


def _ok(t: dict[str, Any]) -> bool:
    vals = t.get("objective_values")
    return t["state"] == "ok" and isinstance(vals, list) and all(isinstance(v, (int, float)) for v in vals)


def ranking(trials: list[dict[str, Any]], maximize: list[bool]) -> list[dict[str, Any]]:
    """Settings measured ok, best first by the first objective: each with its runs' values at the highest rung it
    reached (rung 1 outranks rung 0: longer, repeated), their mean, its trials and the mean of the figures they
    all report (tokens/s, peak bytes, J/token)."""
    groups: dict[tuple, dict[str, Any]] = {}
    for t in trials:
        if not _ok(t):
            continue
        g = groups.setdefault(key(t["setting"]), {"setting": t["setting"], "rung": -1, "values": [], "trials": [],
                                                  "figure_runs": []})
        if t["rung"] > g["rung"]:
            g["rung"], g["values"], g["trials"], g["figure_runs"] = t["rung"], [], [], []
        if t["rung"] == g["rung"]:
            g["values"].append(t["objective_values"])
            g["trials"].append(t["number"])
            g["figure_runs"].append(t.get("figures") or {})
    out = list(groups.values())
    for g in out:
        g["mean"] = [math.fsum(v[i] for v in g["values"]) / len(g["values"]) for i in range(len(maximize))]
        names = set.intersection(*(set(f) for f in g["figure_runs"])) if g["figure_runs"] else set()
        g["figures"] = {n: math.fsum(f[n] for f in g["figure_runs"]) / len(g["figure_runs"]) for n in names}
    sign = 1 if maximize[0] else -1
    out.sort(key=lambda g: (g["rung"], sign * g["mean"][0]), reverse=True)
    return out


def front(trials: list[dict[str, Any]], objectives: list[str], maximize: list[bool]) -> dict[str, Any]:
    """The non-dominated settings (each at its highest rung's mean): over the objectives when several, else over
    tokens/s, peak memory and J/token where the trials report them."""
    rows = ranking(trials, maximize)
    if len(objectives) > 1:
        dims = [(i, m, n) for i, (n, m) in enumerate(zip(objectives, maximize, strict=True))]
        points = [(g, [g["mean"][i] for i, _, _ in dims]) for g in rows]
    else:  # each setting's figures: the mean over its runs at its highest rung
        dims = [d for d in FRONT if rows and all(d[0] in g["figures"] for g in rows)]
        points = [(g, [g["figures"][n] for n, _, _ in dims]) for g in rows]
    signs = [1 if m else -1 for _, m, _ in dims]
    scored = [(g, tuple(s * v for s, v in zip(signs, p, strict=True)), p) for g, p in points]
    members = [(g, p) for g, s, p in scored
               if not any(all(a >= b for a, b in zip(o, s, strict=True)) and o != s for _, o, _ in scored)]
    return {"dimensions": [label for _, _, label in dims],
            "members": [{"setting": g["setting"], "values": p} for g, p in members]}


def sensitivity(trials: list[dict[str, Any]], knobs: dict[str, list[Any]], maximize: bool) -> list[dict[str, Any]]:
    """Each knob's effect on the first objective at rung 0: the mean per value, and the spread of those means over
    the best mean (which knob mattered), largest first."""
    ok = [t for t in trials if _ok(t) and t["rung"] == 0]
    if not ok:
        return []
    best = max((t["objective_values"][0] for t in ok), key=lambda v: v if maximize else -v)
    out = []
    for name in knobs:
        groups: dict[Any, list[float]] = {}
        for t in ok:
            if name in t["setting"]:
                groups.setdefault(t["setting"][name], []).append(t["objective_values"][0])
        if len(groups) < 2:
            continue
        means = {v: math.fsum(xs) / len(xs) for v, xs in groups.items()}
        effect = (max(means.values()) - min(means.values())) / abs(best) if best else None
        ordered = sorted(means, key=lambda v: means[v], reverse=maximize)
        out.append({"knob": name, "effect": effect, "best_value": ordered[0],
                    "means": [{"value": v, "mean": means[v], "trials": len(groups[v])} for v in ordered]})
    out.sort(key=lambda r: r["effect"] or 0.0, reverse=True)
    return out


def calibration(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The memory estimate against each trial's measured peak: error of the raw estimate and of the calibrated
    prediction the tuner made before launching it."""
    rows = []
    for t in trials:
        est, measured = t.get("estimate_bytes"), t.get("measured_bytes")
        if t["state"] in ("pruned", "lost", "running") or not est:
            continue
        rows.append({"trial": t["number"], "setting": t["setting"], "state": t["state"], "estimate_bytes": est,
                     "predicted_bytes": t.get("predicted_bytes"), "measured_bytes": measured,
                     "estimate_error": measured / est - 1 if measured else None,
                     "prediction_error": measured / t["predicted_bytes"] - 1
                     if measured and t.get("predicted_bytes") else None})
    errs = [abs(r["estimate_error"]) for r in rows if r["estimate_error"] is not None]
    perrs = [abs(r["prediction_error"]) for r in rows if r["prediction_error"] is not None]
    return {"trials": rows, "measured": len(errs),
            "mean_abs_estimate_error": math.fsum(errs) / len(errs) if errs else None,
            "mean_abs_prediction_error": math.fsum(perrs) / len(perrs) if perrs else None}


def command(workload: str, fixed: dict[str, Any], setting: dict[str, Any]) -> str:
    """The ``btune run`` line that runs a setting."""
    spec = catalog.get(workload)
    return shlex.join(["btune", "run", workload, *catalog.to_argv(spec, catalog.validate(spec, {**fixed, **setting}))])


def summarize(study: dict[str, Any], trials: list[dict[str, Any]]) -> dict[str, Any]:
    """study.json: the plan, every trial, the best and the runner-up (with Welch's test when both repeated), the
    front, what was pruned, each knob's effect, the memory calibration."""
    plan = study["plan"]
    maximize = [_maximize(n, plan["workload"]) for n in plan["objectives"]]
    ranked = ranking(trials, maximize)
    best = ranked[0] if ranked else None
    out: dict[str, Any] = {"study": {k: study[k] for k in ("id", "name", "created", "workload", "state", "spent_s",
                                                           "result_dir") if k in study},
                           "plan": plan, "trials": trials, "best": None}
    if best is not None:
        out["best"] = {"setting": best["setting"], "rung": best["rung"], "values": best["mean"],
                       "runs": len(best["values"]), "trials": best["trials"],
                       "command": command(plan["workload"], plan["fixed"], best["setting"])}
        if len(ranked) > 1:
            second = ranked[1]
            test = None
            if second["rung"] == best["rung"] and len(best["values"]) > 1 and len(second["values"]) > 1:
                test = run_level([v[0] for v in second["values"]], [v[0] for v in best["values"]], min_effect=0.0)
            out["runner_up"] = {"setting": second["setting"], "rung": second["rung"], "values": second["mean"],
                                "runs": len(second["values"]), "test": test}
    out["front"] = front(trials, plan["objectives"], maximize)
    out["pruned"] = [{"setting": t["setting"], "reason": t["reason"]} for t in trials if t["state"] == "pruned"]
    out["sensitivity"] = sensitivity(trials, plan["space"], maximize[0])
    out["calibration"] = calibration(trials)
    return out


def _maximize(name: str, workload: str) -> bool:
    from tuner.tune.objective import figure

    return figure(name, workload, gpu=True).maximize


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def _bytes(v: Any) -> str:
    from tuner.tune.search import size

    return size(v) if isinstance(v, (int, float)) else "-"


def pruned_lines(pruned: list[dict[str, Any]], examples: int = 2) -> list[str]:
    """The settings never launched, grouped by reason (most first), with a few examples each."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in pruned:
        groups.setdefault(str(p["reason"]), []).append(p["setting"])
    out = []
    for reason, settings in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        shown = "; ".join(describe(s) or "(defaults)" for s in settings[:examples])
        more = f"; and {len(settings) - examples} more" if len(settings) > examples else ""
        out.append(f"- {len(settings)} x {reason} (e.g. {shown}{more})")
    return out


def text(summary: dict[str, Any]) -> str:
    """The study as markdown (printed at the end of ``btune tune``, and report.md)."""
    plan, study = summary["plan"], summary["study"]
    objs = plan["objectives"]
    lines = [f"# btune tune {study.get('name', '')} (study {study.get('id')}, {study.get('state')})", "",
             f"{plan['workload']}, objective {', '.join(objs)}, budget "
             f"{plan['budget']['amount']:g} {'trials' if plan['budget']['trials'] else 's'}, "
             f"{study.get('spent_s', 0):.0f} s spent; space: "
             + "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in plan["space"].items()), ""]
    trials = [t for t in summary["trials"] if t["state"] != "pruned"]
    lines += ["| # | phase | rung | setting | state | " + " | ".join(objs) + " | tokens/s | peak | est. | est. err |",
              "|---:|---|---:|---|---|" + "---:|" * len(objs) + "---:|---:|---:|---:|"]
    for t in trials:
        vals = t.get("objective_values") or [None] * len(objs)
        figs = t.get("figures") or {}
        est, meas = t.get("estimate_bytes"), t.get("measured_bytes")
        err = f"{meas / est - 1:+.1%}" if est and meas else "-"
        state = t["state"] + (f" ({t['reason']})" if t.get("reason") and t["state"] != "ok" else "")
        lines.append(f"| {t['number']} | {t['phase']} | {t['rung']} | {describe(t['setting']) or '(defaults)'} | "
                     f"{state} | " + " | ".join(_fmt(v) if v is not None else "-" for v in vals) +
                     f" | {_fmt(figs.get('tokens_per_s')) if figs.get('tokens_per_s') else '-'} | "
                     f"{_bytes(meas)} | {_bytes(est) if est else '-'} | {err} |")
    best = summary.get("best")
    lines.append("")
    if best:
        lines += [f"**Best**: {describe(best['setting']) or '(defaults)'}: "
                  + ", ".join(f"{n} {_fmt(v)}" for n, v in zip(objs, best["values"], strict=True))
                  + f" (rung {best['rung']}, mean of {best['runs']} run{'s' * (best['runs'] > 1)})", "",
                  f"    {best['command']}", ""]
        ru = summary.get("runner_up")
        if ru:
            test = ru.get("test")
            verdict = ("not tested (each needs two runs at the same rung)" if not test else
                       f"Welch p = {test['p']:.3g}: " + ("the best is better beyond run-to-run noise" if test["real"]
                                                        else "a tie within run-to-run noise"))
            lines += [f"Runner-up: {describe(ru['setting']) or '(defaults)'}: "
                      + ", ".join(f"{n} {_fmt(v)}" for n, v in zip(objs, ru["values"], strict=True))
                      + f"; {verdict}", ""]
    else:
        lines += ["No trial finished with every objective measured.", ""]
    fr = summary["front"]
    if fr["members"]:
        lines += [f"Pareto front ({', '.join(fr['dimensions'])}):", ""]
        for m in fr["members"]:
            shown = ", ".join(_bytes(v) if d == "peak memory" else _fmt(v)
                              for d, v in zip(fr["dimensions"], m["values"], strict=True))
            lines.append(f"- {describe(m['setting']) or '(defaults)'}: {shown}")
        lines.append("")
    if summary["pruned"]:
        lines += [f"Never launched ({len(summary['pruned'])} settings):", ""]
        lines += pruned_lines(summary["pruned"])
        lines.append("")
    if summary["sensitivity"]:
        lines += [f"Which knob mattered ({objs[0]}, rung 0, mean per value):", ""]
        for s in summary["sensitivity"]:
            eff = f"{s['effect']:.1%}" if s["effect"] is not None else "-"
            lines.append(f"- {s['knob']}: {eff} — " + ", ".join(f"{m['value']} {_fmt(m['mean'])} ({m['trials']})"
                                                              for m in s["means"]))
        lines.append("")
    cal = summary["calibration"]
    if cal["measured"]:
        lines.append(f"Memory estimate vs measured peak over {cal['measured']} trials: mean |error| "
                     f"{cal['mean_abs_estimate_error']:.1%} raw"
                     + (f", {cal['mean_abs_prediction_error']:.1%} calibrated" if cal["mean_abs_prediction_error"]
                        is not None else ""))
    else:
        lines.append("Memory estimate: no trial measured a device peak (CPU runs report none).")
    return "\n".join(lines).rstrip() + "\n"
