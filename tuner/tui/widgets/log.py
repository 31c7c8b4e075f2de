"""Log panel: the tail of the run's stdout/stderr, errors and telemetry notes, sized to what it holds.

While it has only notes (or nothing) it keeps to a few lines; once the program writes to stdout or stderr, or
an error arrives, it grows to a quarter of the screen. It never takes rows it has no lines for.
"""

from __future__ import annotations

from textual.widgets import Log

from tuner.feed import FeedView

PREFIX = {"stderr": "", "stdout": "", "error": "!! ", "note": "-- "}
GROW = frozenset({"stderr", "stdout", "error"})  # kinds of line that make the log grow
COLLAPSED = 1  # lines shown while the log has only notes


class LogPanel(Log):
    """Appends the lines that arrived since the last refresh (the feed keeps the last few hundred)."""

    def __init__(self, *, id: str | None = None, max_lines: int = 500) -> None:
        super().__init__(id=id, max_lines=max_lines, auto_scroll=True)
        self.border_title = "log / stderr"
        self._last = 0
        self.grown = False  #: the program wrote or failed: the log has room for more than notes

    def show(self, view: FeedView) -> None:
        """Write the new lines of ``view``, and fit the height to them."""
        fresh = [(kind, text) for seq, kind, text in view.logs if seq > self._last]
        if fresh:
            self.write_lines([f"{PREFIX.get(kind, '')}{text}" for kind, text in fresh])
            self._last = view.log_seq
            self.grown = self.grown or any(kind in GROW for kind, _ in fresh)
        self.fit()

    def fit(self) -> None:
        """One row of border and as many rows as lines, up to the cap (collapsed or grown)."""
        cap = max(COLLAPSED + 1, self.screen.size.height // 4) if self.grown else COLLAPSED
        height = 1 + max(1, min(self.line_count, cap))
        if self.styles.height is None or self.styles.height.value != height:
            self.styles.height = height
            # the write scrolled to the end of the old height: the newest line stays in view at the new one
            self.scroll_end(animate=False)
