"""Panel: the base of every live panel: a bordered Static redrawn from a FeedView at the refresh rate."""

from __future__ import annotations

from collections.abc import Hashable

from rich.text import Text
from textual.widgets import Static

from tuner.widgets.feed import FeedView

DEFAULT_WIDTH = 60


def row(*parts: str | Text) -> Text:
    """One line that never wraps: too long, it ends in an ellipsis."""
    out = Text()
    for part in parts:
        out.append(part) if isinstance(part, Text) else out.append(str(part))
    return out


def dim(text: str) -> Text:
    return Text(text, style="dim")


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
