"""Panel: the base of every live panel: figure lines and time charts in a box, redrawn from a FeedView at the
refresh rate when what they draw from changed."""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Static

from tuner.feed import FeedView
from tuner.metrics import Figure, figures, number
from tuner.report import figure_value, fmt
from tuner.tui.widgets.chart import Series, TimeChart

DEFAULT_WIDTH = 60


def row(*parts: str | Text) -> Text:
    """One line that never wraps: too long, it ends in an ellipsis."""
    out = Text()
    for part in parts:
        out.append(part) if isinstance(part, Text) else out.append(str(part))
    return out


def dim(text: str) -> Text:
    return Text(text, style="dim")


def block_figures(summary: dict[str, Any], workload: Any, block: str) -> list[Figure]:
    """The registry's figures of one block (tuner.metrics) that have a value in ``summary``."""
    return [f for f in figures(summary, workload) if f.metric.block == block and number(f.value)]


def figure_text(f: Figure) -> str:
    return f"{f.label} {figure_value(f)}"


def figure_rows(figs: list[Figure], width: int, style: str = "") -> list[Text]:
    """Figures as ``label value unit`` items, as many to a line as ``width`` holds."""
    lines: list[Text] = []
    line = ""
    for item in map(figure_text, figs):
        if line and len(line) + 3 + len(item) > width:
            lines.append(Text(line, style=style))
            line = ""
        line = f"{line}  ·  {item}" if line else item
    if line:
        lines.append(Text(line, style=style))
    return lines


def pack(items: list[str], width: int, style: str = "") -> list[Text]:
    """Items as ``a · b · c`` lines of at most ``width`` columns (an item longer than that has its own line)."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 3 + len(item) <= width:
            lines[-1] += f" · {item}"
        else:
            lines.append(item)
    return [Text(line, style=style) for line in lines]


def stats_table(figs: list[Figure], columns: tuple[str, ...], cell: int = 10, unit: str = "") -> list[Text]:
    """Described figures (one metric per line, a statistic per column) as a small table; ``unit`` heads the
    names' column."""
    by_metric: dict[str, dict[str, Any]] = {}
    for f in figs:
        if f.stat is not None:
            by_metric.setdefault(f.metric.label, {})[f.stat] = f.value
    if not by_metric:
        return []
    width = max(len(name) for name in by_metric) + 1
    lines = [Text(f"{unit:{width}}" + "".join(f"{c:>{cell}}" for c in columns), style="bold")]
    for name, values in by_metric.items():
        lines.append(row(f"{name:<{width}}" + "".join(f"{fmt(values.get(c)):>{cell}}" for c in columns)))
    return lines


class Panel(Vertical):
    """A panel: a bordered box of figure lines (``render_view``) and, for some, time charts (``draw_charts``)
    beside them. ``show`` redraws both only when what the panel draws from (``changes``), its size or the
    per-GPU fold changed."""

    TITLE = ""
    #: The panel's charts: (name, unit, y floor); each is a TimeChart with class ``chart-NAME``.
    CHARTS: ClassVar[tuple[tuple[str, str, float | None], ...]] = ()

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.border_title = self.TITLE
        self.figures = Static("", classes="figures")
        self.charts = {name: TimeChart(unit, floor=floor, classes=f"chart-{name}") for name, unit, floor in self.CHARTS}
        self.gpu_rows = False  #: every GPU on its own row (else many GPUs fold into one line)
        self.compact = False  #: a short screen: the panel keeps to its figures
        self._seen: tuple[Hashable, ...] | None = None
        self._height = 0
        self._text = Text("")

    def compose(self) -> ComposeResult:
        yield self.figures
        if self.charts:
            with Horizontal(classes="charts"):
                yield from self.charts.values()

    def show_if(self, visible: bool) -> bool:
        """Show or hide the panel (only touching the style when it changes); returns ``visible``."""
        if self.display != visible:
            self.display = visible
        return visible

    @property
    def inner_width(self) -> int:
        """Columns available to the panel's text (a guess before the first layout)."""
        width = self.figures.content_size.width
        return width if width > 0 else DEFAULT_WIDTH

    @property
    def text(self) -> Text:
        """The figure lines as last drawn."""
        return self._text

    def changes(self, view: FeedView) -> Hashable:
        """What the panel draws from; it redraws only when this (or its width) changes."""
        return view.version

    def show(self, view: FeedView) -> None:
        """Redraw from ``view`` if what it draws from (or its width, or the fold) changed since the last draw."""
        key = (self.changes(view), view.summary is not None, self.inner_width, self.gpu_rows, self.compact)
        if key == self._seen:
            return
        self._seen = key
        lines = self.render_view(view, self.inner_width)
        text = Text("\n").join(lines) if lines else dim("waiting for data…")
        text.no_wrap, text.overflow, text.end = True, "ellipsis", ""
        height = max(1, len(lines))
        self.figures.update(text, layout=height != self._height)  # lines never wrap: same count, same size
        self._height, self._text = height, text
        self.draw_charts(view)

    def render_view(self, view: FeedView, width: int) -> list[Text]:
        """The panel's lines for ``view`` at ``width`` columns."""
        raise NotImplementedError

    def draw_charts(self, view: FeedView) -> None:
        """Give each chart its series (``TimeChart.set_series``; it redraws only what changed); called after
        ``render_view`` on every redraw."""


def since_start(view: FeedView, t: object) -> float | None:
    """Seconds from the run's first event to ``t`` (None when ``t`` is not a time)."""
    if not isinstance(t, (int, float)) or view.t_first is None:
        return None
    return float(t) - view.t_first


def run_seconds(view: FeedView) -> float:
    """Seconds from the run's first event to its last: the end of every chart's time axis."""
    if view.t_first is None or view.t_last is None:
        return 0.0
    return view.t_last - view.t_first


def window_start(kept: list[Series], dropped: bool) -> float:
    """Where a chart's time axis starts: 0, or once the feed has dropped older samples, the oldest one kept."""
    firsts = [s.xs[0] for s in kept if s.xs]
    return min(firsts) if dropped and firsts else 0.0


def series(view: FeedView, rows: list[dict[str, Any]], value: Any, style: str) -> Series:
    """A chart series of ``value(row)`` against each row's time (rows without either are left out)."""
    xs: list[float] = []
    ys: list[float] = []
    for r in rows:
        x, y = since_start(view, r.get("t")), value(r)
        if x is not None and isinstance(y, (int, float)) and not isinstance(y, bool) and math.isfinite(y):
            xs.append(x)
            ys.append(float(y))
    return Series(tuple(xs), tuple(ys), style)
