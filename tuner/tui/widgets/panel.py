"""Panel: the base of every live panel: a bordered Static redrawn from a FeedView at the refresh rate."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from rich.text import Text
from textual.widgets import Static

from tuner.feed import FeedView
from tuner.metrics import Figure, figures, number
from tuner.report import fmt

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
    unit = f" {f.unit}" if f.unit and f.unit != "%" else ""
    return f"{f.label} {fmt(f.value, f.unit)}{unit}"


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


def stats_table(figs: list[Figure], columns: tuple[str, ...]) -> list[Text]:
    """Described figures (one metric per line, a statistic per column) as a small table."""
    by_metric: dict[str, dict[str, Any]] = {}
    for f in figs:
        if f.stat is not None:
            by_metric.setdefault(f.metric.label, {})[f.stat] = f.value
    if not by_metric:
        return []
    width = max(len(name) for name in by_metric) + 1
    lines = [Text(f"{'':{width}}" + "".join(f"{c:>10}" for c in columns), style="bold")]
    for name, values in by_metric.items():
        lines.append(row(f"{name:<{width}}" + "".join(f"{fmt(values.get(c)):>10}" for c in columns)))
    return lines


class Panel(Static):
    """A panel: ``render_view`` returns its lines; ``show`` redraws when the feed has changed."""

    TITLE = ""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__("", id=id, classes=classes)
        self.border_title = self.TITLE
        self._seen: tuple[Hashable, bool, int] | None = None
        self._height = 0

    def show_if(self, visible: bool) -> bool:
        """Show or hide the panel (only touching the style when it changes); returns ``visible``."""
        if self.display != visible:
            self.display = visible
        return visible

    @property
    def inner_width(self) -> int:
        """Columns available to the panel's text (a guess before the first layout)."""
        width = self.content_size.width
        return width if width > 0 else DEFAULT_WIDTH

    def changes(self, view: FeedView) -> Hashable:
        """What the panel draws from; it redraws only when this (or its width) changes."""
        return view.version

    def show(self, view: FeedView) -> None:
        """Redraw from ``view`` if what it draws from (or its width) changed since the last draw."""
        key = (self.changes(view), view.summary is not None, self.inner_width)
        if key == self._seen:
            return
        self._seen = key
        lines = self.render_view(view, self.inner_width)
        text = Text("\n").join(lines) if lines else dim("waiting for data…")
        text.no_wrap, text.overflow, text.end = True, "ellipsis", ""
        height = max(1, len(lines))
        self.update(text, layout=height != self._height)  # lines never wrap: same count, same size
        self._height = height

    def render_view(self, view: FeedView, width: int) -> list[Text]:
        """The panel's lines for ``view`` at ``width`` columns."""
        raise NotImplementedError
