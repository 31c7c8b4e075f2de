"""Latency panel (serving): the registry's serving block (TTFT, TPOT, ITL, E2E by p50/p90/p99, throughputs and
goodput beside them), laid out to fit 80 columns.

Shown once ``request`` events arrive. Live, the block is tuner.results.serving over the requests the feed
keeps (under the run's SLOs), recomputed at most once a second; once the run has ended it is the summary's.

A rate sweep's or --find-max-rate's block has a curve (``serving.curve``: one point per load): under the table
two charts against the offered rate, request throughput (achieved, and offered as the diagonal) and TTFT/TPOT
p99, each load marked by whether it kept 99% of its requests within the SLOs, the max rate found as a rule,
then a row per load. Too narrow for two charts, the curve is rows of bars instead. Without a curve there is
neither. Live, the curve has the loads that have finished (every one but the newest).
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Static

from tuner import results
from tuner.feed import FeedView
from tuner.metrics import Figure, number
from tuner.report import figure_value, fmt
from tuner.serving import max_rate
from tuner.tui.widgets.chart import MARGIN_LEFT, Marks, Series, XYChart
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
#: From this width the curve is two charts side by side (each with room for about 20 columns of plot).
CURVE_WIDTH = 2 * (MARGIN_LEFT + 2 + 20)
#: The curve's styles: a load within the SLOs (>= 99% of its requests) and one not, the max rate's rule.
PASS, FAIL, RULE = ("green", "●"), ("red", "×"), "blue"
#: The lines: achieved and offered request throughput, TTFT and TPOT p99.
ACHIEVED, OFFERED, TTFT, TPOT = "cyan", "grey50", "yellow", "magenta"


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
        #: The curve's charts: request throughput, and TTFT/TPOT p99, against the offered rate.
        self.curve_charts = {"rps": XYChart("req/s", x_suffix="/s", classes="curve-rps"),
                             "ms": XYChart("ms", x_suffix="/s", classes="curve-ms")}
        self.curve_box = Horizontal(*self.curve_charts.values(), classes="curve")
        self.curve_rows = Static("", classes="figures curve-rows")
        self.curve_box.display = self.curve_rows.display = False
        self._curve: tuple[list[dict[str, Any]], dict[str, Any], bool] = ([], {}, False)

    def compose(self) -> ComposeResult:
        yield self.figures
        yield self.curve_box
        yield self.curve_rows

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
        block = (summary or {}).get("serving") or {}
        points = curve_points(block.get("curve"))
        if not final and points:  # live: the newest load is still running (its unfinished requests would fail it)
            points = points[:-1]
            block = {**block, **({"max_rate": max_rate(points)} if "max_rate" in block else {})}
        charted = bool(points) and width >= CURVE_WIDTH
        self._curve = (points, block, charted)
        if charted:  # the charts and the rows under them: draw_charts
            lines += curve_legend(block, width)
        elif points:
            lines += curve_lines(points, width) + max_rate_line(block)
        slo = block.get("slo") or {}
        window = len(view.requests)
        scope = "the run" if final else "all requests" if window == view.requests_seen else f"the last {window:,}"
        left = ", ".join(f"{fmt(counts[name])} {word}" for name, word in (("requests_failed", "failed"),
                                                                           ("requests_unfinished", "unfinished"))
                         if counts.get(name))
        left = f" ({left})" if left else ""
        self.border_subtitle = (f"{view.requests_seen:,} requests{left} · over {scope} · SLOs TTFT <= "
                                f"{slo.get('ttft_ms')} ms, TPOT <= {slo.get('tpot_ms')} ms")
        return lines

    def draw_charts(self, view: FeedView) -> None:
        """The curve's charts and rows, when render_view found a curve and room for them (else hidden)."""
        points, block, charted = self._curve
        if self.curve_box.display != charted:
            self.curve_box.display = self.curve_rows.display = charted
        if not charted:
            return
        self.curve_rows.update(Text("\n").join(curve_rows(points, self.inner_width)))
        rps, ms = curve_series(points, block.get("max_rate"))
        self.curve_charts["rps"].set_data(*rps)
        self.curve_charts["ms"].set_data(*ms)


def short_figure(f: Figure) -> str:
    """A scalar serving figure with the panel's short label."""
    return f"{SIDE[f.metric.name]} {figure_value(f)}"


def curve_lines(points: Any, width: int) -> list[Text]:
    """A rate sweep's or --find-max-rate's curve (``serving.curve``) as a bar chart (the panel's curve when it is
    too narrow for the charts): one row per load, its offered rate, a bar of its request throughput (green: >= 99%
    of its requests within the SLOs, red: fewer), the throughput, the fraction within the SLOs and TTFT p99; no
    rows without a curve."""
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



def curve_points(points: Any) -> list[dict[str, Any]]:
    """The points of a curve (``serving.curve``); none for anything else."""
    return [p for p in points if isinstance(p, dict)] if isinstance(points, list) else []


def rate_x(p: dict[str, Any]) -> float:
    """A point's offered rate as an x: ``math.inf`` for a load offered all at once (no rate)."""
    return float(p["rate"]) if number(p.get("rate")) else math.inf


def rate_label(p: dict[str, Any]) -> str:
    return f"{fmt(p.get('rate'))}/s" if number(p.get("rate")) else "inf"


def max_rate_line(block: dict[str, Any]) -> list[Text]:
    """A search's max rate (``serving.max_rate``), when the block has one (a sweep's has not)."""
    if "max_rate" not in block:
        return []
    best = block["max_rate"]
    return [Text(f"max rate {fmt(best)} req/s (>= 99% of requests within the SLOs)" if number(best)
                 else "max rate: none (no rate tried kept 99% of requests within the SLOs)")]


def curve_legend(block: dict[str, Any], width: int) -> list[Text]:
    """The line above the curve's charts: what the marks and the rule say."""
    items = [Text("rate curve", style="bold"),
             Text.assemble((PASS[1], PASS[0]), " >= 99% within the SLOs"),
             Text.assemble((FAIL[1], FAIL[0]), " fewer")]
    if "max_rate" in block:
        best = block["max_rate"]
        items.append(Text.assemble(("⡇", RULE), f" max rate {fmt(best)} req/s") if number(best)
                     else Text("max rate: none within the SLOs"))
    lines = [Text()]
    for item in items:
        if lines[-1].plain and len(lines[-1].plain) + 3 + len(item.plain) > width:
            lines.append(Text())
        lines[-1].append(" · " if lines[-1].plain else "").append_text(item)
    return lines


def ttft_p99(p: dict[str, Any]) -> Any:
    return (p.get("ttft_ms") or {}).get("p99")


def tpot_p99(p: dict[str, Any]) -> Any:
    return (p.get("tpot_ms") or {}).get("p99")


def achieved(p: dict[str, Any]) -> Any:
    return p.get("request_throughput")


def xy(points: list[dict[str, Any]], value: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The points' offered rates and their ``value(point)`` (points without one are left out)."""
    pairs = [(rate_x(p), float(v)) for p in points if number(v := value(p))]
    return tuple(x for x, _ in pairs), tuple(y for _, y in pairs)


def curve_series(points: list[dict[str, Any]], best: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The two charts' data (XYChart.set_data's lines, marks, rules and legend): request throughput achieved
    and offered (the diagonal), and TTFT and TPOT p99, against the offered rate; each load marked within the
    SLOs or not; the max rate as a rule."""
    ordered = sorted(points, key=rate_x)
    passed = [p for p in ordered if p.get("passed")]
    failed = [p for p in ordered if not p.get("passed")]

    def marks(value: Any) -> list[Marks]:
        return [Marks(*xy(passed, value), *PASS), Marks(*xy(failed, value), *FAIL)]

    finite = [x for x in map(rate_x, ordered) if math.isfinite(x)]
    offered = [Series((0.0, max(finite)), (0.0, max(finite)), OFFERED)] if finite else []
    rules = [(float(best), RULE)] if number(best) else []
    return (([*offered, Series(*xy(ordered, achieved), ACHIEVED)], marks(achieved), rules,
             [("━ achieved", ACHIEVED), ("━ offered", OFFERED)]),
            ([Series(*xy(ordered, ttft_p99), TTFT), Series(*xy(ordered, tpot_p99), TPOT)],
             marks(ttft_p99) + marks(tpot_p99), rules, [("━ TTFT p99", TTFT), ("━ TPOT p99", TPOT)]))


def curve_rows(points: list[dict[str, Any]], width: int) -> list[Text]:
    """The curve as a small table, a row per load in the order they ran: the offered rate and its mark, request
    and output-token throughput (when the width holds it), the fraction within the SLOs, TTFT and TPOT p99."""
    columns = [("req/s", lambda p: fmt(achieved(p))),
               ("out tok/s", lambda p: fmt(p.get("output_tokens_per_s"))),
               ("within SLOs", lambda p: fmt(p.get("good_fraction"), "%")),
               ("TTFT p99 ms", lambda p: fmt(ttft_p99(p))),
               ("TPOT p99 ms", lambda p: fmt(tpot_p99(p)))]
    left = max(len("rate"), *(len(rate_label(p)) for p in points)) + 3  # the rate, its mark
    if left + 12 * len(columns) > width:
        columns.pop(1)
    cell = max(12, min(13, (width - left) // len(columns)))
    out = [Text(f"{'rate':>{left - 3}}   " + "".join(f"{name:>{cell}}" for name, _ in columns), style="bold")]
    for p in points:
        style, char = PASS if p.get("passed") else FAIL
        row = Text(f"{rate_label(p):>{left - 3}} ").append(char, style=style).append(" ")
        out.append(row.append("".join(f"{value(p):>{cell}}" for _, value in columns)))
    return out
