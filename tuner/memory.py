"""A run's memory profile, ``summary["memory_profile"]``, from its ``memory`` event (``workloads.memprofile``).

The workload (or a script through the reporting API) sends one ``memory`` event: the snapshot's path, the steps
it covers, the peak of live bytes replayed from the allocator's trace, torch's own peak over the same window and
the top allocation sites at the peak. Beside them the summary puts what the run said of its memory otherwise:
the dry-run estimate (btune's own workloads' ``memory_estimate_bytes``) and torch's peak over the whole run.
"""

from __future__ import annotations

from typing import Any

MIB = 1024 * 1024


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def profile(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``summary["memory_profile"]``: the lowest rank's first ``memory`` event with the run's memory estimate and
    peak beside it; None when the run sent none."""
    found = [e for e in events if e.get("type") == "memory"]
    if not found:
        return None
    ev = min(found, key=lambda e: e.get("rank", 0))
    wl = next((e for e in sorted(events, key=lambda e: e.get("rank", 0)) if e.get("type") == "summary"), {})
    peak, torch_peak = ev.get("peak_bytes"), ev.get("max_memory_allocated")
    estimate = wl.get("memory_estimate_bytes")
    total = estimate.get("total") if isinstance(estimate, dict) else estimate
    sites = [s for s in ev.get("top_sites") or [] if isinstance(s, dict)]
    return {
        "snapshot": ev.get("snapshot"),
        "window": ev.get("window"),
        "rank": ev.get("rank", 0),
        "peak_bytes": peak if _num(peak) else None,
        "peak_mb": peak / MIB if _num(peak) else None,
        "max_memory_allocated": torch_peak if _num(torch_peak) else None,
        "estimate_bytes": total if _num(total) else None,
        "run_peak_bytes": wl.get("torch_mem_peak_bytes") if _num(wl.get("torch_mem_peak_bytes")) else None,
        "top_sites": sites,
        "note": ev.get("note"),
    }
