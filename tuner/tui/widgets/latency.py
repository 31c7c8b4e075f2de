"""Latency panel (serving): the registry's serving block (TTFT, TPOT, ITL, E2E by p50/p90/p99, throughputs and
goodput beside them), laid out to fit 80 columns.

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
from tuner.metrics import Figure
from tuner.report import figure_value, fmt
from tuner.tui.widgets.panel import Panel, block_figures, figure_rows, pack, stats_table

COLUMNS = ("p50", "p90", "p99", "mean")
CELL = 9  # columns per statistic
SIDE_WIDTH = 22  # the scalar figures' column
WIDE = 12 + 4 * CELL + 3 + SIDE_WIDTH  # from this width the mean column fits beside the scalar figures
#: The scalar serving figures beside the table, by metric name, with their short labels (in this order).
SIDE = {"goodput": "goodput", "request_throughput": "requests", "output_tokens_per_s": "output",
        "total_tokens_per_s": "total", "load_duration": "load"}
#: Counts said in the closing line instead.
COUNTS = ("requests_finished", "requests_unfinished", "requests_failed")
#: The engine's MBU and bytes moved: the throughput panel's MBU line says them.
ELSEWHERE = ("engine_mbu", "engine_bandwidth")
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
        figs = [f for f in block_figures(summary or {}, "serve", "serving") if f.metric.name not in ELSEWHERE]
        described = [f for f in figs if f.stat is not None]
        columns = COLUMNS if width >= WIDE else COLUMNS[:3]
        table = stats_table(described, columns, cell=CELL, unit="ms")
        by_name = {f.metric.name: f for f in figs if f.stat is None}
        side = [short_figure(by_name[name]) for name in SIDE if name in by_name]
        rest = [f for f in figs if f.stat is None and f.metric.name not in SIDE and f.metric.name not in COUNTS]
        counts = {f.metric.name: f.value for f in figs if f.metric.name in COUNTS}
        table_width = max((len(t.plain) for t in table), default=0)
        lines: list[Text]
        if table and width - table_width - 3 >= SIDE_WIDTH:  # the scalar figures in a column beside the table
            lines = [t.copy() for t in table]
            for i, item in enumerate(side):
                if i >= len(lines):
                    lines.append(Text(" " * table_width))
                lines[i].pad_right(table_width - len(lines[i].plain))
                lines[i].append(" │ ", style="dim").append(item)
        else:
            lines = table + pack(side, width)
        lines += figure_rows(rest, width)
        lines += curve_lines(((summary or {}).get("serving") or {}).get("curve"), width)
        slo = (summary or {}).get("serving", {}) or {}
        slo = slo.get("slo") or {}
        window = len(view.requests)
        scope = "the run" if final else "all requests" if window == view.requests_seen else f"the last {window:,}"
        left = ", ".join(f"{fmt(counts[name])} {word}" for name, word in (("requests_failed", "failed"),
                                                                           ("requests_unfinished", "unfinished"))
                         if counts.get(name))
        left = f" ({left})" if left else ""
        self.border_subtitle = (f"{view.requests_seen:,} requests{left} · over {scope} · SLOs TTFT <= "
                                f"{slo.get('ttft_ms')} ms, TPOT <= {slo.get('tpot_ms')} ms")
        return lines


def short_figure(f: Figure) -> str:
    """A scalar serving figure with the panel's short label."""
    return f"{SIDE[f.metric.name]} {figure_value(f)}"


def curve_lines(points: Any, width: int) -> list[Text]:
    """A rate sweep's or --find-max-rate's curve (``serving.curve``) as a bar chart: one row per load, its offered
    rate, a bar of its request throughput (green: >= 99% of its requests within the SLOs, red: fewer), the
    throughput, the fraction within the SLOs and TTFT p99; no rows without a curve."""
    rows = [p for p in points if isinstance(p, dict)] if isinstance(points, list) else []
    if not rows:
        return []
    top = max((p.get("request_throughput") or 0.0 for p in rows), default=0.0) or 1.0
    labels = [(f"{fmt(p.get('rate'))}/s" if isinstance(p.get("rate"), (int, float)) else "inf",
               f" {fmt(p.get('request_throughput'))} req/s · {fmt(p.get('good_fraction'), '%')} within SLOs · "
               f"TTFT p99 {fmt((p.get('ttft_ms') or {}).get('p99'))} ms") for p in rows]
    left = max(len(rate) for rate, _ in labels) + 1
    bar_width = max(4, min(40, width - left - max(len(tail) for _, tail in labels)))
    out = [Text("throughput by offered rate (green: >= 99% within the SLOs)", style="dim")]
    for p, (rate, tail) in zip(rows, labels, strict=True):
        n = round((p.get("request_throughput") or 0.0) / top * bar_width)
        line = Text(rate.rjust(left - 1) + " ")
        line.append("█" * n, style="green" if p.get("passed") else "red").append(" " * (bar_width - n))
        out.append(line.append(tail))
    return out
