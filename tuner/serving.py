"""The serving summary, from request records (design.md, "Metric definitions"): the one implementation.

Percentiles are tuner.stats'. Latency statistics cover the finished requests; requests still
unfinished when the run stopped are counted and never meet an SLO. Throughputs divide by the duration
from the start of the load to the moment the engine stopped (the last finish when every request
finished), as vLLM's bench serve does. Requests whose ``status`` is ``failed`` (an endpoint's errors) are
counted by reason under ``failures``.

Requests of a rate sweep or a --find-max-rate search carry a ``segment`` (one load each) and its offered
``rate``: ``curve`` summarises each segment, and a search's ``max_rate`` is the highest rate whose segment met
the SLOs (``workloads.slo``: the same predicate the search decided with).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise
from typing import Any

from tuner.stats import describe
from workloads.slo import GOOD_FRACTION, good_fraction, meets_slo


def itl_ms(record: dict[str, Any]) -> list[float]:
    """The gaps between consecutive tokens of a request record, in ms."""
    ts = record.get("token_s") or []
    return [(b - a) * 1000.0 for a, b in pairwise(ts)]


def failed(record: dict[str, Any]) -> bool:
    """A request that ended in an error (an endpoint's refusal, timeout, HTTP error, cut or malformed stream)."""
    return record.get("status") == "failed"


def failure_reason(record: dict[str, Any]) -> str:
    """A failed request's reason: its error up to the first colon (``HTTP 500``, ``timeout``, ...)."""
    return str(record.get("error") or "unknown").split(":", 1)[0].strip() or "unknown"


def peak_concurrency(records: Iterable[dict[str, Any]]) -> int:
    """The most requests in the system (arrived, not finished) at any moment; a finish and an arrival at
    the same instant (a closed-loop client's next request) do not overlap."""
    events = []
    for r in records:
        events.append((r["arrival_s"], 1))
        if r.get("finish_s") is not None:
            events.append((r["finish_s"], -1))
    peak = level = 0
    for _, delta in sorted(events):  # at equal times -1 sorts before +1
        level += delta
        peak = max(peak, level)
    return peak


def serving_summary(records: list[dict[str, Any]], duration_s: float, slo_ttft_ms: float,
                    slo_tpot_ms: float) -> dict[str, Any]:
    """TTFT, TPOT, ITL and E2E statistics, throughputs, goodput, peak concurrency, unfinished requests and failed
    ones (total and by reason; a failed request is neither finished nor unfinished)."""
    finished = [r for r in records if r.get("finished")]
    unfinished = [r for r in records if not r.get("finished") and not failed(r)]
    reasons: dict[str, int] = {}
    for r in records:
        if failed(r):
            reasons[failure_reason(r)] = reasons.get(failure_reason(r), 0) + 1
    good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in finished)
    out_tokens = sum(r["output_tokens"] for r in finished)
    prompt_tokens = sum(r["prompt_len"] for r in finished)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: None)
    return {
        "requests": {"total": len(records), "finished": len(finished), "unfinished": len(unfinished),
                     "unfinished_started": sum(1 for r in unfinished if r.get("output_tokens")),
                     "good": good},
        "duration_s": duration_s,
        "ttft_ms": describe(r["ttft_ms"] for r in finished),
        "tpot_ms": describe(r["tpot_ms"] for r in finished if r.get("tpot_ms") is not None),
        "itl_ms": describe(x for r in finished for x in itl_ms(r)),
        "e2e_ms": describe(r["e2e_ms"] for r in finished),
        "request_throughput": per_s(len(finished)),
        "output_tokens_per_s": per_s(out_tokens),
        "total_tokens_per_s": per_s(out_tokens + prompt_tokens),
        "goodput": per_s(good),
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "tokens_generated": sum(r["output_tokens"] for r in records),
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "peak_concurrency": peak_concurrency(records),
        "failures": {"total": sum(reasons.values()), "by_reason": dict(sorted(reasons.items()))},
        **_segments(records, slo_ttft_ms, slo_tpot_ms),
    }


def _segments(records: list[dict[str, Any]], slo_ttft_ms: float, slo_tpot_ms: float) -> dict[str, Any]:
    """``curve`` when requests carry segments, and ``max_rate`` when they were --find-max-rate's probes."""
    points = curve(records, slo_ttft_ms, slo_tpot_ms)
    if not points:
        return {}
    searched = any(r.get("search") is True for r in records)
    return {"curve": points, **({"max_rate": max_rate(points)} if searched else {})}


def _end(record: dict[str, Any]) -> float:
    """When a request left the system: its finish, else its last token, else its arrival."""
    if record.get("finish_s") is not None:
        return record["finish_s"]
    return (record.get("token_s") or [record["arrival_s"]])[-1]


def segment_summary(records: list[dict[str, Any]], slo_ttft_ms: float, slo_tpot_ms: float) -> dict[str, Any]:
    """One segment (one load of a sweep or a search): its offered rate, throughputs over its span (its first
    arrival, when its load began, to its last request's end), the fraction of its requests meeting the SLOs and
    whether that reaches ``GOOD_FRACTION``, TTFT and TPOT p50/p99, unfinished and failed requests."""
    finished = [r for r in records if r.get("finished")]
    span = max(map(_end, records)) - min(r["arrival_s"] for r in records) if records else 0.0
    per_s = (lambda x: x / span) if span > 0 else (lambda x: None)
    ttft = describe(r["ttft_ms"] for r in finished)
    tpot = describe(r["tpot_ms"] for r in finished if r.get("tpot_ms") is not None)
    frac = good_fraction(records, slo_ttft_ms, slo_tpot_ms)
    return {
        "segment": records[0].get("segment") if records else None,
        "rate": next((r.get("rate") for r in records), None),
        "requests": len(records),
        "finished": len(finished),
        "unfinished": sum(1 for r in records if not r.get("finished") and not failed(r)),
        "failed": sum(1 for r in records if failed(r)),
        "duration_s": span,
        "request_throughput": per_s(len(finished)),
        "output_tokens_per_s": per_s(sum(r["output_tokens"] for r in finished)),
        "good_fraction": frac,
        "passed": frac is not None and frac >= GOOD_FRACTION,
        "ttft_ms": {"p50": ttft["p50"], "p99": ttft["p99"]},
        "tpot_ms": {"p50": tpot["p50"], "p99": tpot["p99"]},
    }


def curve(records: list[dict[str, Any]], slo_ttft_ms: float, slo_tpot_ms: float) -> list[dict[str, Any]]:
    """Each segment's summary (``segment_summary``), in segment order; empty when no request has a segment."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        if isinstance(r.get("segment"), int):
            groups.setdefault(r["segment"], []).append(r)
    return [segment_summary(groups[k], slo_ttft_ms, slo_tpot_ms) for k in sorted(groups)]


def max_rate(points: list[dict[str, Any]]) -> float | None:
    """The highest finite offered rate among segments that met the SLOs; None when none did."""
    return max((p["rate"] for p in points if p["passed"] and p["rate"] is not None), default=None)
