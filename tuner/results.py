"""Workload results the console computes from a record's raw events: the serving block (from ``request``
events) and expert balance over the whole run (from ``experts`` events).

The arithmetic is the one implementation each (tuner.serving, tuner.balance); this module only picks the raw
data out of the record, checking each value, so any record that loads gives a block or none, never an error.
"""

from __future__ import annotations

import math
from typing import Any

from tuner import balance
from tuner.serving import serving_summary


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def usable_request(r: dict[str, Any]) -> bool:
    """A request event with what the serving block needs, each of the right kind."""
    if not (_num(r.get("arrival_s")) and _int(r.get("output_tokens")) and _int(r.get("prompt_len"))
            and isinstance(r.get("finished"), bool)):
        return False
    if r["finished"] and not (_num(r.get("ttft_ms")) and _num(r.get("e2e_ms"))):
        return False
    if r.get("finish_s") is not None and not _num(r.get("finish_s")):
        return False
    tpot, tokens = r.get("tpot_ms"), r.get("token_s")
    return (tpot is None or _num(tpot)) and (tokens is None or (isinstance(tokens, list) and all(map(_num, tokens))))


def serving(events: list[dict[str, Any]], options: dict[str, Any], workload: dict[str, Any]) -> dict[str, Any] | None:
    """The serving block: requests, latencies (TTFT, TPOT, ITL, E2E), throughputs and goodput; None without
    requests. The load's duration and the SLOs are the run's own (the workload's summary, the options)."""
    reqs = [e for e in events if e.get("type") == "request" and usable_request(e)]
    if not reqs:
        return None
    given = workload.get("serving") if isinstance(workload.get("serving"), dict) else {}
    duration = workload.get("load_duration_s", given.get("duration_s"))
    if not _num(duration) or duration <= 0:
        ends = [r.get("finish_s") or (r.get("token_s") or [r["arrival_s"]])[-1] for r in reqs]
        duration = max(ends) if ends else 0.0
    slo = next((v for v in (workload.get("slo"), given.get("slo")) if isinstance(v, dict)), {})
    ttft = next((v for v in (options.get("slo_ttft_ms"), slo.get("ttft_ms")) if _num(v)), math.inf)
    tpot = next((v for v in (options.get("slo_tpot_ms"), slo.get("tpot_ms")) if _num(v)), math.inf)
    out = serving_summary(sorted(reqs, key=lambda r: r["arrival_s"]), float(duration), ttft, tpot)
    out["slo"] = {"ttft_ms": ttft if math.isfinite(ttft) else None, "tpot_ms": tpot if math.isfinite(tpot) else None}
    return out


def experts(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Expert balance over every window the run reported: each layer's token counts summed across windows,
    then the balance figures (CV, MaxVio, Gini, load entropy, dead experts, dropped fraction) per layer, and
    their mean and worst layer; router entropy is the token-weighted mean of the windows'."""
    sums: list[list[float]] | None = None
    dropped: list[float] = []
    entropy: list[list[tuple[float, float]]] = []
    windows = 0
    for ev in events:
        counts = ev.get("counts") if ev.get("type") == "experts" else None
        if not isinstance(counts, list) or not counts or not all(
                isinstance(c, list) and c and all(_num(x) and x >= 0 for x in c) for c in counts):
            continue
        if sums is None:
            sums = [[0.0] * len(c) for c in counts]
            dropped = [0.0] * len(counts)
            entropy = [[] for _ in counts]
        if len(counts) != len(sums) or any(len(c) != len(s) for c, s in zip(counts, sums, strict=True)):
            continue  # another shape than the first window's: not the same model
        windows += 1
        for s, c in zip(sums, counts, strict=True):
            for i, x in enumerate(c):
                s[i] += x
        d = ev.get("dropped")
        if isinstance(d, list) and len(d) == len(sums):
            for i, x in enumerate(d):
                dropped[i] += x if _num(x) else 0.0
        h, tokens = ev.get("router_entropy"), ev.get("tokens")
        if isinstance(h, list) and len(h) == len(sums):
            for i, x in enumerate(h):
                if _num(x):
                    entropy[i].append((x, float(tokens) if _num(tokens) and tokens > 0 else 1.0))
    if sums is None:
        return None
    router = [sum(x * w for x, w in e) / sum(w for _, w in e) if e else None for e in entropy]
    figs = balance.window_figures(sums, dropped, {"router_entropy": router})
    return {"windows": windows, "layers": len(sums), "experts": len(sums[0]), "mean": figs["mean"],
            "max": figs["max"]}
