"""Plain-text views of run records: one run (``btune show``) and several side by side (``btune compare``)."""

from __future__ import annotations

from typing import Any

from tuner.metrics import Figure, dig, figures, number
from tuner.stats import relative_delta, run_level


def fmt(value: Any, unit: str = "") -> str:
    """A number for a table: percentages scaled, large numbers grouped, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if unit == "%":
        return f"{value * 100:.1f}%"
    if isinstance(value, int):
        return f"{value:,}"
    mag = abs(value)
    if mag >= 1e5:
        return f"{value:,.0f}"
    if mag >= 100:
        return f"{value:,.1f}"
    if mag >= 1:
        return f"{value:.3f}"
    return f"{value:.4g}"


def table(rows: list[list[str]], header: list[str]) -> str:
    """A left-aligned first column and right-aligned others, padded to fit."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for n, r in enumerate([header, *rows]):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def key_options(rec: dict[str, Any]) -> str:
    """The options that differ from the workload's defaults, as ``k=v`` text."""
    opts = dig(rec, ("config", "options")) or {}
    defaults = dig(rec, ("config", "defaults")) or {}
    parts = [f"{k}={v}" for k, v in opts.items() if k in ("preset",) or defaults.get(k, object()) != v]
    return " ".join(parts)


def blocks(summary: dict[str, Any], workload: Any) -> str:
    """The registry's figures of one run, block by block (a block with no value is left out)."""
    out: list[str] = []
    by_block: dict[str, list[Figure]] = {}
    for f in figures(summary, workload):
        if number(f.value):
            by_block.setdefault(f.metric.block, []).append(f)
    for block, figs in by_block.items():
        rows = [[f.label, fmt(f.value, f.unit), f.unit if f.unit != "%" else ""] for f in figs]
        if block == "serving":
            slo = dig(summary, ("serving", "slo")) or {}
            block += f" (SLOs: TTFT <= {fmt(slo.get('ttft_ms'))} ms, TPOT <= {fmt(slo.get('tpot_ms'))} ms)"
        if block == "engine steps":
            block += " (the engine's own steps, not requests)"
        out.append(table(rows, [block, "value", "unit"]))
    return "\n\n".join(out)


def show(rec: dict[str, Any]) -> str:
    """A human summary of one run."""
    s = rec["summary"]
    env = rec.get("environment", {})
    gpus = ", ".join(g.get("name", "?") for g in env.get("gpus", [])) or "none"
    lines = [
        f"run       {rec['id']}",
        f"status    {rec['status']} (exit {rec['exit_code']})",
        f"workload  {dig(rec, ('config', 'workload'))}  {key_options(rec)}",
        f"started   {rec['started']}   ended {rec['ended']}   ({fmt(s.get('duration_s'))} s)",
        f"host      {env.get('host')}   GPUs: {gpus}   torch {dig(env, ('versions', 'torch'))}",
        f"steps     {dig(s, ('steps', 'total'))} total, {dig(s, ('steps', 'warmup'))} warm-up, "
        f"{dig(s, ('steps', 'steady'))} steady",
        "",
    ]
    lines.append(blocks(s, dig(rec, ("config", "workload"))))
    stepped = bool(dig(s, ("steps", "total")))
    for precision in ("bf16", "fp8"):
        reason = dig(s, ("mfu", precision, "reason"))
        if (reason and stepped and dig(s, ("mfu", precision, "value")) is None
                and dig(rec, ("config", "workload")) != "serve"):
            lines.append(f"MFU ({precision}): n/a ({reason})")
    mbu = s.get("mbu") if isinstance(s.get("mbu"), dict) else {}
    if mbu.get("value") is None and mbu.get("achieved_tb_s") is not None:
        lines.append(f"MBU: n/a ({mbu.get('reason')})")
    for gpu, g in (s.get("gpu") or {}).items():
        lines.append(
            f"gpu {gpu}: power mean {fmt(dig(g, ('power_w', 'mean')))} W, max mem {fmt(g.get('mem_used_mb_max'))} MiB, "
            f"util {fmt(g.get('util_gpu_mean'))}%, max temp {fmt(g.get('temp_c_max'))} C"
        )
    wl = s.get("workload") or {}
    if "passed" in wl:
        bad = wl.get("mismatches") or []
        more = " ..." if len(bad) > 5 else ""
        detail = f" ({len(bad)} mismatched: {', '.join(bad[:5])}{more})" if bad else ""
        lines.append(f"validation: {'PASS' if wl['passed'] else 'FAIL'}{detail}")
        worst = max((t.get("max_rel") or 0.0 for t in wl.get("tensors") or []), default=None)
        if worst is not None:
            lines.append(f"  worst relative error {worst:.3e} (tolerance {wl.get('tolerance')})")
    for note in s.get("notes") or []:
        lines.append(f"note: {note}")
    err = rec.get("error")
    if err:
        lines.append(f"error: {err.get('message')}")
        tail = (err.get("stderr_tail") or "").strip().splitlines()[-8:]
        lines += [f"  | {ln}" for ln in tail]
    return "\n".join(lines)


def compare(recs: list[dict[str, Any]], alpha: float = 0.05) -> str:
    """Runs side by side (every registry figure any of them has); deltas relative to the first; step-time
    differences tested against run-to-run noise."""
    header = ["metric"] + [r["id"] for r in recs]
    rows = [["workload"] + [str(dig(r, ("config", "workload"))) for r in recs],
            ["status"] + [r["status"] for r in recs],
            ["options"] + [key_options(r) or "-" for r in recs]]
    for fig, values in compared_rows(recs):
        unit = fig.unit
        cells = [fmt(values[0], unit)]
        for v in values[1:]:
            d = relative_delta(values[0], v) if number(values[0]) and number(v) else None
            cells.append(fmt(v, unit) + (f" ({d * 100:+.1f}%)" if d is not None else ""))
        rows.append([f"{fig.label} [{unit}]" if unit and unit != "%" else fig.label, *cells])
    rows.append([f"step time differs? (run-level, α={alpha:g}, ≥{MIN_EFFECT:.0%})", "baseline",
                 *[v["text"] for v in run_level_verdicts(recs, alpha)]])
    return table(rows, header)


def _compared(recs: list[dict[str, Any]]) -> dict[str, tuple[Figure, list[Any]]]:
    """Each registry figure of any of the runs, with every run's value (None where a run has none)."""
    out: dict[str, tuple[Figure, list[Any]]] = {}
    for n, r in enumerate(recs):
        for f in figures(r["summary"], dig(r, ("config", "workload"))):
            if f.key not in out:
                out[f.key] = (f, [None] * len(recs))
            out[f.key][1][n] = f.value
    return out


def compared_rows(recs: list[dict[str, Any]]) -> list[tuple[Figure, list[Any]]]:
    """The figures compare shows: those at least one of the runs has a number for."""
    return [(f, v) for f, v in _compared(recs).values() if any(number(x) for x in v)]


MIN_EFFECT = 0.05  #: the smallest relative difference of run-level step times that compare calls real


def config_key(rec: dict[str, Any]) -> str:
    """What makes two runs repeats of one config: the workload and its options, the seed aside."""
    import orjson

    opts = {k: v for k, v in (dig(rec, ("config", "options")) or {}).items() if k != "seed"}
    return orjson.dumps([dig(rec, ("config", "workload")), opts], option=orjson.OPT_SORT_KEYS, default=str).decode()


def run_level_verdicts(recs: list[dict[str, Any]], alpha: float = 0.05,
                       min_effect: float = MIN_EFFECT) -> list[dict[str, Any]]:
    """For each run after the first: whether its config's steady step time (one p50 per run, over every run
    of that config among ``recs``) differs from the first run's config's beyond run-to-run noise.

    Each verdict has ``text`` and ``real`` (True, False, or None when the noise is unknown or the config is
    the baseline's own).
    """
    groups: dict[str, list[float]] = {}
    for r in recs:
        p50 = dig(r, ("summary", "step_ms", "p50"))
        groups.setdefault(config_key(r), [])
        if isinstance(p50, (int, float)) and r.get("status") in ("ok", "cancelled", "timeout"):
            groups[config_key(r)].append(float(p50))
    base_key = config_key(recs[0])
    out: list[dict[str, Any]] = []
    for r in recs[1:]:
        key = config_key(r)
        if key == base_key:
            out.append({"text": "same config as base", "real": None})
            continue
        res = run_level(groups[base_key], groups[key], alpha, min_effect)
        na, nb = res["n"]
        d = res["delta"]
        delta = f"{d * 100:+.1f}%" if d is not None else "-"
        if res["p"] is None:
            text = f"noise unknown: {na} vs {nb} runs (use --repeat)"
        elif res["real"]:
            text = f"real {delta} (p={res['p']:.2g}, {na} vs {nb} runs)"
        else:
            text = f"noise {delta} (p={res['p']:.2g}, {na} vs {nb} runs)"
        out.append({"text": text, "real": res["real"]})
    return out
