"""Latency panel (serving): TTFT, TPOT and E2E percentiles from request events, via tuner.stats.describe.

Shown only once ``request`` events arrive; the percentiles cover the most recent requests kept by the feed.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text

from tuner.report import fmt
from tuner.stats import describe
from tuner.widgets.feed import FeedView
from tuner.widgets.panel import Panel, row

COLUMNS = ("n", "p50", "p90", "p99", "mean")
METRICS = (("TTFT ms", 0), ("TPOT ms", 1), ("E2E ms", 2))


class LatencyPanel(Panel):
    """Request latency percentiles."""

    TITLE = "latency"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cache: tuple[int, list[dict[str, Any]]] | None = None

    def show(self, view: FeedView) -> None:
        self.display = view.requests_seen > 0
        if self.display:
            super().show(view)

    def stats(self, view: FeedView) -> list[dict[str, Any]]:
        """describe() of each metric, recomputed only when new requests arrived."""
        if self._cache is None or self._cache[0] != view.requests_seen:
            self._cache = (view.requests_seen, [describe(r[i] for r in view.requests) for _, i in METRICS])
        return self._cache[1]

    def render_view(self, view: FeedView, width: int) -> list[Text]:
        lines: list[Text] = [row(Text(f"{'':8}" + "".join(f"{c:>10}" for c in COLUMNS), style="bold"))]
        for (name, _), d in zip(METRICS, self.stats(view), strict=True):
            cells = [f"{d['n']:>10}"] + [f"{fmt(d[c]):>10}" for c in COLUMNS[1:]]
            lines.append(row(f"{name:<8}" + "".join(cells)))
        window = len(view.requests)
        scope = "all" if window == view.requests_seen else f"last {window:,}"
        lines.append(row(Text(f"{view.requests_seen:,} requests (percentiles over {scope})", style="dim")))
        return lines
