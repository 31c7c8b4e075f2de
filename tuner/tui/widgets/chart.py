"""TimeChart: a time-axis line chart for the live panels, drawn by textual-plot's PlotWidget.

A chart shows one or more series against seconds since the run's first event, with the y unit written
under the y-axis labels and time ticks (``30s``, ``2m``, ``1h30``) along the x axis. It is redrawn only when
``set_series`` is given different data (the panels call it only when their data changed), each series
thinned to about two points per braille column, so a redraw costs the same whatever the run's length.
Ticks are chosen here, not by the plot, so they never crowd a short chart. The chart takes no focus and
no zoom: scrolling the mouse over it scrolls the dashboard around it.

XYChart is the same kind of chart against a numeric x axis instead of time (the serving panel's rate curve):
lines, points marked by a character each, vertical rules, and a legend across its top row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.markup import escape
from textual import events
from textual.widget import Widget
from textual_hires_canvas import Canvas, TextAlign
from textual_plot import HiResMode, PlotWidget
from textual_plot.axis_formatter import AxisFormatter

MARGIN_LEFT = 7  # y tick labels up to 6 characters; the unit (up to 5) sits under them
#: Seconds between time ticks, smallest first.
TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


@dataclass(frozen=True)
class Series:
    """One line: x in seconds since the run's start, y in the chart's unit, a Rich style."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]
    style: str = "green"


@dataclass(frozen=True)
class Marks:
    """Points drawn as one character each, not joined (an XYChart's): x, y in the chart's units, a Rich style."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]
    style: str = "green"
    char: str = "●"


def time_label(seconds: float) -> str:
    """``45s``, ``2m``, ``2m30``, ``1h``, ``1h30`` (seconds on a tick, so whole numbers)."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        m, r = divmod(s, 60)
        return f"{m}m{r:02d}" if r else f"{m}m"
    h, r = divmod(s, 3600)
    return f"{h}h{r // 60:02d}" if r else f"{h}h"


def si_label(value: float) -> str:
    """A tick value in at most 6 characters: ``0``, ``0.25``, ``950``, ``47.5k``, ``1.2M``."""
    if value == 0:
        return "0"
    a = abs(value)
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}" if a >= 0.01 else f"{value:.0e}"


def nice_step(span: float, max_ticks: int) -> float:
    """The smallest 1/2/5×10^k step that puts at most ``max_ticks`` intervals over ``span``."""
    if span <= 0:
        return 1.0
    raw = span / max(1, max_ticks)
    power = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * power >= raw:
            return m * power
    return 10 * power


def value_ticks(lo: float, hi: float, max_ticks: int) -> tuple[float, float, list[float]]:
    """Y limits widened to whole steps, and the ticks between them (``max_ticks`` 1: the two ends only, the top
    rounded up to two significant digits)."""
    if max_ticks <= 1:
        span = hi - lo
        unit = 10 ** (math.floor(math.log10(span)) - 1) if span > 0 else 1.0
        top = lo + math.ceil(span / unit - 1e-9) * unit
        return lo, top, [lo, top]
    step = nice_step(hi - lo, max_ticks)
    lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    if hi <= lo:
        hi = lo + step
    n = round((hi - lo) / step)
    return lo, hi, [lo + i * step for i in range(n + 1)]


def y_tick_count(rows: int) -> int:
    """How many y intervals a plot ``rows`` high takes (one tick every other row; two rows or fewer: the ends)."""
    return 1 if rows <= 2 else (rows + 1) // 2 + 1


def time_ticks(t_min: float, t_max: float, max_ticks: int) -> tuple[float, float, list[float]]:
    """The time axis' ends (at least a second apart) and its ticks (whole steps between them)."""
    t_max = max(t_max, t_min + 1.0)
    step = next((s for s in TIME_STEPS if (t_max - t_min) / s <= max(1, max_ticks)), TIME_STEPS[-1])
    first, last = math.ceil(t_min / step - 1e-9), math.floor(t_max / step + 1e-9)
    return t_min, t_max, [i * step for i in range(first, last + 1)]


def thin(xs: Sequence[float], ys: Sequence[float], points: int) -> tuple[list[float], list[float]]:
    """At most about ``points`` points, evenly strided, the last one always kept."""
    n = len(xs)
    if n <= points or points <= 0:
        return list(xs), list(ys)
    stride = math.ceil(n / points)
    idx = list(range(0, n, stride))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return [xs[i] for i in idx], [ys[i] for i in idx]


class _Labels(AxisFormatter):
    """Labels for ticks the chart chose (the plot asks only for labels: the ticks are set)."""

    def __init__(self, label: Any) -> None:
        self.label = label

    def get_ticks(self, min_: float, max_: float, max_ticks: int = 8) -> list[float]:
        return [min_, max_]

    def get_labels_for_ticks(self, ticks: Sequence[float]) -> list[str]:
        return [self.label(t) for t in ticks]


class PlotChart(PlotWidget, can_focus=False):
    """What the app's charts share: no focus and no zoom (the mouse wheel scrolls the dashboard), y tick labels
    in MARGIN_LEFT columns with the unit under them, one refresh per canvas per draw."""

    TOP: ClassVar[int] = 0  # rows above the plot

    def __init__(self, unit: str, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes, allow_pan_and_zoom=False)
        self.unit = unit

    def on_mount(self) -> None:
        self.margin_top, self.margin_bottom, self.margin_left = self.TOP, 1, MARGIN_LEFT
        self.set_y_formatter(_Labels(si_label))

    # -- drawing and events --------------------------------------------------------------------
    def _render_plot(self) -> None:
        """The plot's drawing, with each canvas refreshed once at the end instead of once per pixel drawn."""
        with ExitStack() as stack:
            for canvas in self.query(Canvas):
                stack.enter_context(canvas.batch_refresh())
            super()._render_plot()

    def _render_x_label(self) -> None:
        """The unit, under the y tick labels (the plot's own x label needs two more rows)."""
        margin = self.query_one("#margin-bottom", Canvas)
        margin.write_text(0, 0, f"[{self.get_component_rich_style('plot--tick')}]{self.unit[:MARGIN_LEFT - 2]}",
                          TextAlign.LEFT)

    def _on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        event.prevent_default()  # no zoom (nor the plot's event.stop): the dashboard scrolls
        _scroll_parent(self, 1)

    def _on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        event.prevent_default()
        _scroll_parent(self, -1)


class TimeChart(PlotChart):
    """A line chart of series against time, with its unit; ``set_series`` redraws it if the data changed."""

    DEFAULT_CSS = """
    TimeChart { height: 100%; width: 1fr; }
    TimeChart > .plot--axis { color: $foreground-darken-3; }
    TimeChart > .plot--tick { color: $foreground-muted; text-style: none; }
    """

    def __init__(self, unit: str, *, floor: float | None = 0.0, id: str | None = None,
                 classes: str | None = None) -> None:
        """``floor``: the y axis starts at or below it (None: at the data's minimum)."""
        super().__init__(unit, id=id, classes=classes)
        self.floor = floor
        self._data: tuple[Any, ...] | None = None
        self._drawn: tuple[Any, ...] | None = None
        self._picture: tuple[Any, ...] | None = None  # the dots last drawn

    def on_mount(self) -> None:
        self.set_x_formatter(_Labels(time_label))

    # -- data ----------------------------------------------------------------------------------
    def set_series(self, series: Sequence[Series], t_end: float, ceiling: float | None = None,
                   y_range: tuple[float, float] | None = None, t_start: float = 0.0) -> None:
        """Draw ``series`` over [``t_start``, ``t_end``] s (from 0, unless the feed has dropped older samples: then
        from the oldest it keeps). ``ceiling``: the y axis reaches at least it (a capacity);
        ``y_range``: the values the axis must cover (default: every point); points outside are clipped.
        Nothing is redrawn when the data, the unit and the size are what was drawn last."""
        self._data = (tuple(series), t_end, ceiling, y_range, self.unit, t_start)
        self._draw()

    def on_resize(self) -> None:
        self.call_after_refresh(self._draw)  # the same data at the new size

    def _draw(self) -> None:
        if self._data is None:
            return
        series, t_end, ceiling, y_range, _, t_start = self._data
        width, height = self.size.width - MARGIN_LEFT - 2, self.size.height - 3
        key = (self._data, width, height)
        if key == self._drawn or width < 4 or height < 1:
            return
        self._drawn = key
        ys_all = [y for s in series for y in s.ys]
        lo, hi = y_range if y_range is not None else ((min(ys_all), max(ys_all)) if ys_all else (0.0, 1.0))
        if self.floor is not None:
            lo = min(lo, self.floor)
        if ceiling is not None:
            hi = max(hi, ceiling)
        if hi <= lo:
            hi = lo + (abs(lo) or 1.0)
        y_lo, y_hi, y_ticks = value_ticks(lo, hi, y_tick_count(height))
        x_lo, x_hi, x_ticks = time_ticks(t_start, t_end, max(1, width // 8))
        lines = []
        for s in series:
            xs, ys = thin(s.xs, [min(max(y, y_lo), y_hi) for y in s.ys], 2 * width)
            if len(xs) == 1:  # one point: a dot, not a line of length zero
                xs, ys = [xs[0], xs[0]], [ys[0], ys[0]]
            lines.append((xs, ys, s.style))
        # what the chart would show, in braille dots (2 across, 4 down a cell): nothing new, no redraw
        def dot(x: float, y: float) -> tuple[int, int]:
            return round((x - x_lo) / (x_hi - x_lo) * 2 * width), round((y - y_lo) / (y_hi - y_lo) * 4 * height)

        picture = (self.unit, y_lo, y_hi, tuple(y_ticks), tuple(x_ticks), tuple(dot(t, y_lo)[0] for t in x_ticks),
                   width, height,
                   tuple((style, tuple(dot(x, y) for x, y in zip(xs, ys, strict=True))) for xs, ys, style in lines))
        if picture == self._picture:
            return
        self._picture = picture
        self.clear()
        for xs, ys, style in lines:
            if xs:
                self.plot(xs, ys, line_style=style, hires_mode=HiResMode.BRAILLE)
        self.set_xlimits(x_lo, x_hi)
        self.set_ylimits(y_lo, y_hi)
        self.set_xticks(x_ticks)
        self.set_yticks(y_ticks)


class XYChart(PlotChart):
    """Lines (``Series``), marked points (``Marks``) and vertical rules against a numeric x axis from 0, with
    the y unit under the y labels and a legend across the top row; ``set_data`` redraws it if the data
    changed. An x of ``math.inf`` (a load offered all at once) is drawn one tick step past the last finite
    tick, labelled ``inf``. Rules are drawn before the marks, so a mark on a rule stays visible."""

    DEFAULT_CSS = """
    XYChart { height: 100%; width: 1fr; }
    XYChart > .plot--axis { color: $foreground-darken-3; }
    XYChart > .plot--tick { color: $foreground-muted; text-style: none; }
    """
    TOP = 1  # the legend
    PAD = 1.05  # the axes reach past the largest value, so no point sits on the frame

    def __init__(self, unit: str, *, x_suffix: str = "", y_from_zero: bool = True, id: str | None = None,
                 classes: str | None = None) -> None:
        """``x_suffix``: written after each x tick label but 0 (``/s``: ``5/s``); ``y_from_zero`` False: the y
        axis spans the values (a history, where a few percent must show), not 0 to the largest."""
        super().__init__(unit, id=id, classes=classes)
        self.x_suffix = x_suffix
        self.y_from_zero = y_from_zero
        self.lines: tuple[Series, ...] = ()
        self.marks: tuple[Marks, ...] = ()
        self.rules: tuple[tuple[float, str], ...] = ()
        self.legend: tuple[tuple[str, str], ...] = ()
        self._drawn: tuple[Any, ...] | None = None

    def set_data(self, lines: Sequence[Series], marks: Sequence[Marks] = (),
                 rules: Sequence[tuple[float, str]] = (), legend: Sequence[tuple[str, str]] = ()) -> None:
        """Draw ``lines`` (joined in the order given), ``marks``, vertical ``rules`` (x, style) and a ``legend``
        ((text, style) items) across the top row. Nothing is redrawn when the data and the size are what was
        drawn last."""
        self.lines, self.marks, self.rules, self.legend = tuple(lines), tuple(marks), tuple(rules), tuple(legend)
        self._draw()

    def on_resize(self) -> None:
        self.call_after_refresh(self._draw)  # the same data at the new size

    def _draw(self) -> None:
        width, height = self.size.width - MARGIN_LEFT - 2, self.size.height - self.TOP - 3
        key = (self.lines, self.marks, self.rules, self.legend, self.unit, width, height)
        if key == self._drawn or width < 4 or height < 1:
            return
        self._drawn = key
        shown = (*self.lines, *self.marks)
        xs = [x for s in shown for x in s.xs] + [x for x, _ in self.rules]
        finite = [x for x in xs if math.isfinite(x)]
        x_lo, x_hi, x_ticks = value_ticks(0.0, max(finite, default=1.0) * self.PAD, max(1, width // 8))
        names = {t: si_label(t) + self.x_suffix if t else "0" for t in x_ticks}
        inf_x = math.inf
        if any(math.isinf(x) for x in xs):
            inf_x = x_hi + (x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else x_hi or 1.0)
            x_hi = inf_x * (1 + 1e-9)  # just past it: the point stays inside the frame
            x_ticks.append(inf_x)
            names[inf_x] = "inf"
        ys = [y for s in shown for y in s.ys if math.isfinite(y)]
        if self.y_from_zero or not ys:
            y_lo, y_hi, y_ticks = value_ticks(0.0, max(max(ys, default=0.0) * self.PAD, 1e-9), y_tick_count(height))
        else:
            lo, hi = min(ys), max(ys)
            pad = (hi - lo) * 0.1 or abs(hi) * 0.05 or 1.0
            y_lo, y_hi, y_ticks = value_ticks(lo - pad, hi + pad, y_tick_count(height))

        def at(values: tuple[float, ...]) -> list[float]:
            return [inf_x if math.isinf(x) else x for x in values]

        self.clear()
        for s in self.lines:
            if s.xs:
                self.plot(at(s.xs), list(s.ys), line_style=s.style, hires_mode=HiResMode.BRAILLE)
        for x, style in self.rules:
            rule_x = inf_x if math.isinf(x) else x
            self.plot([rule_x, rule_x], [y_lo, y_lo + (y_hi - y_lo) * 0.999], line_style=style,
                      hires_mode=HiResMode.BRAILLE)
        for m in self.marks:
            if m.xs:
                self.scatter(at(m.xs), list(m.ys), marker=m.char, marker_style=m.style)
        self.set_x_formatter(_Labels(lambda t: names.get(t, si_label(t))))
        self.set_xlimits(x_lo, x_hi)
        self.set_ylimits(y_lo, y_hi)
        self.set_xticks(x_ticks)
        self.set_yticks(y_ticks)

    def _render_y_label(self) -> None:
        """The legend, across the top row from the plot's left edge."""
        margin = self.query_one("#margin-top", Canvas)
        text = "  ".join(f"[{style}]{escape(label)}[/]" for label, style in self.legend)
        if text:
            margin.write_text(MARGIN_LEFT, 0, text, TextAlign.LEFT)


def _scroll_parent(widget: Widget, direction: int) -> None:
    for node in widget.ancestors:
        if isinstance(node, Widget) and node.allow_vertical_scroll:
            (node.scroll_down if direction > 0 else node.scroll_up)(animate=False)
            return
