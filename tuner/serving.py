"""The serving summary, from request records (design.md, "Metric definitions"): the one implementation.

Percentiles are tuner.stats'. Latency statistics cover the finished requests; requests still
unfinished when the run stopped are counted and never meet an SLO. Throughputs divide by the duration
from the start of the load to the moment the engine stopped (the last finish when every request
finished), as vLLM's bench serve does. Requests whose ``status`` is ``failed`` (an endpoint's errors) are
counted by reason under ``failures``.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise
from typing import Any

from tuner.stats import describe


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


def meets_slo(record: dict[str, Any], slo_ttft_ms: float, slo_tpot_ms: float) -> bool:
    """A finished request whose TTFT and TPOT are within the SLOs (one output token: no TPOT to miss)."""
    if not record.get("finished"):
        return False
    tpot = record.get("tpot_ms")
    return record["ttft_ms"] <= slo_ttft_ms and (tpot is None or tpot <= slo_tpot_ms)


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
    }
