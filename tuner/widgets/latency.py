"""Latency panel (serving): TTFT, TPOT and E2E percentiles from request events, via tuner.stats.describe.

Shown only once ``request`` events arrive; the percentiles cover the most recent requests kept by the feed
and are recomputed at most once a second.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Any

from rich.text import Text

from tuner.report import fmt
from tuner.stats import describe
from tuner.widgets.feed import FeedView
from tuner.widgets.panel import Panel, row

COLUMNS = ("n", "p50", "p90", "p99", "mean")
PERIOD_S = 1.0  # percentiles are recomputed at most once a second
METRICS = (("TTFT ms", 0), ("TPOT ms", 1), ("E2E ms", 2))


class LatencyPanel(Panel):
    """Request latency percentiles."""

    TITLE = "latency"

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

    @staticmethod
    def stats(view: FeedView) -> list[dict[str, Any]]:
        """describe() of each metric over the requests the feed keeps."""
        return [describe(r[i] for r in view.requests) for _, i in METRICS]

    def render_view(self, view: FeedView, width: int) -> list[Text]:
        lines: list[Text] = [row(Text(f"{'':8}" + "".join(f"{c:>10}" for c in COLUMNS), style="bold"))]
        for (name, _), d in zip(METRICS, self.stats(view), strict=True):
            cells = [f"{d['n']:>10}"] + [f"{fmt(d[c]):>10}" for c in COLUMNS[1:]]
            lines.append(row(f"{name:<8}" + "".join(cells)))
        window = len(view.requests)
        scope = "all" if window == view.requests_seen else f"last {window:,}"
        lines.append(row(Text(f"{view.requests_seen:,} requests (percentiles over {scope})", style="dim")))
        return lines
