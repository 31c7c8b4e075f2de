"""Latency panel (serving): the registry's serving block (TTFT, TPOT, ITL, E2E, throughputs, goodput).

Shown once ``request`` events arrive. Live, the block is tuner.results.serving over the requests the feed
keeps (under the run's SLOs), recomputed at most once a second; once the run has ended it is the summary's.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Any

from rich.text import Text

from tuner import results
from tuner.feed import FeedView
from tuner.tui.widgets.panel import Panel, block_figures, dim, figure_rows, stats_table

COLUMNS = ("p50", "p90", "p99", "mean")
PERIOD_S = 1.0  # the live block is recomputed at most once a second


def live_block(view: FeedView) -> dict[str, Any] | None:
    """The serving block of the requests the feed keeps: over the span they cover when older ones were
    dropped, else from the start of the load."""
    options = (view.meta or {}).get("options") or {}
    reqs = [dict(r, type="request") for r in view.requests]
    workload: dict[str, Any] = {}
    if reqs and len(view.requests) < view.requests_seen:
        arrivals = [r["arrival_s"] for r in reqs if isinstance(r.get("arrival_s"), (int, float))]
        ends = [r["finish_s"] for r in reqs if isinstance(r.get("finish_s"), (int, float))]
        if arrivals and ends and max(ends) > min(arrivals):
            workload["load_duration_s"] = max(ends) - min(arrivals)
    return results.serving(reqs, options if isinstance(options, dict) else {}, workload)


class LatencyPanel(Panel):
    """Serving latency percentiles, throughputs and goodput."""

    TITLE = "serving"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._computed_at = -PERIOD_S

    def changes(self, view: FeedView) -> Hashable:
        """New requests, at most once per PERIOD_S (and always once the run has ended)."""
        now = time.monotonic()
        if view.summary is None and now - self._computed_at < PERIOD_S:
            return self._seen[0] if self._seen else None
        self._computed_at = now
        return view.requests_seen

    def show(self, view: FeedView) -> None:
        if self.show_if(view.requests_seen > 0):
            super().show(view)

    def render_view(self, view: FeedView, width: int) -> list[Text]:
        final = view.summary is not None and isinstance(view.summary.get("serving"), dict)
        summary = view.summary if final else {"serving": live_block(view)}
        figs = block_figures(summary or {}, "serve", "serving")
        lines = stats_table([f for f in figs if f.stat is not None], COLUMNS)
        lines += figure_rows([f for f in figs if f.stat is None], width)
        slo = (summary or {}).get("serving", {}) or {}
        slo = slo.get("slo") or {}
        window = len(view.requests)
        scope = "the run" if final else "all requests" if window == view.requests_seen else f"the last {window:,}"
        lines.append(dim(f"{view.requests_seen:,} requests; figures over {scope}; SLOs TTFT <= "
                         f"{slo.get('ttft_ms')} ms, TPOT <= {slo.get('tpot_ms')} ms"))
        return lines
