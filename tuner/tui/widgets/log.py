"""Log panel: the tail of the run's stdout/stderr, errors and telemetry notes."""

from __future__ import annotations

from textual.widgets import Log

from tuner.feed import FeedView

PREFIX = {"stderr": "", "stdout": "", "error": "!! ", "note": "-- "}


class LogPanel(Log):
    """Appends the lines that arrived since the last refresh (the feed keeps the last few hundred)."""

    def __init__(self, *, id: str | None = None, max_lines: int = 500) -> None:
        super().__init__(id=id, max_lines=max_lines, auto_scroll=True)
        self.border_title = "log / stderr"
        self._last = 0

    def show(self, view: FeedView) -> None:
        """Write the new lines of ``view``."""
        new = [f"{PREFIX.get(kind, '')}{text}" for seq, kind, text in view.logs if seq > self._last]
        if new:
            self.write_lines(new)
            self._last = view.log_seq
