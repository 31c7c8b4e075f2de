"""The serving SLO predicate, one implementation: the console's goodput (tuner.serving) and the workload's
--find-max-rate search both decide with it. Torch-free, standard library only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: A load meets its SLOs when at least this fraction of its requests does (--find-max-rate's pass mark).
GOOD_FRACTION = 0.99


def meets_slo(record: dict[str, Any], slo_ttft_ms: float, slo_tpot_ms: float) -> bool:
    """A finished request whose TTFT and TPOT are within the SLOs (one output token: no TPOT to miss)."""
    if not record.get("finished"):
        return False
    tpot = record.get("tpot_ms")
    return record["ttft_ms"] <= slo_ttft_ms and (tpot is None or tpot <= slo_tpot_ms)


def good_fraction(records: Iterable[dict[str, Any]], slo_ttft_ms: float, slo_tpot_ms: float) -> float | None:
    """The fraction of all requests (failed and unfinished ones included) that meet the SLOs; None without any."""
    recs = list(records)
    if not recs:
        return None
    return sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in recs) / len(recs)


def passes(records: Iterable[dict[str, Any]], slo_ttft_ms: float, slo_tpot_ms: float) -> bool:
    """Whether a load's requests meet the SLOs: at least ``GOOD_FRACTION`` of them do (no requests: no)."""
    frac = good_fraction(records, slo_ttft_ms, slo_tpot_ms)
    return frac is not None and frac >= GOOD_FRACTION
