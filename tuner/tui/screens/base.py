"""BtuneScreen: what every screen shares: the too-small message, help text, palette commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from textual.screen import Screen
from textual.widgets import Static

MIN_WIDTH, MIN_HEIGHT = 60, 16

Command = tuple[str, str, Callable[[], Any]]


class TooSmall(Static):
    """Shown instead of a screen's content when the terminal is below the minimum size."""

    def __init__(self) -> None:
        super().__init__(f"Terminal too small for btune.\nEnlarge it to at least {MIN_WIDTH}×{MIN_HEIGHT}.")


class BtuneScreen(Screen[Any]):
    """A screen of the app. ``HELP`` is shown by ``?``; ``commands`` adds palette entries."""

    HELP: ClassVar[str] = ""
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]] | None] = [(0, "-tiny"), (MIN_WIDTH, "-narrow"),
                                                                       (110, "-wide")]
    VERTICAL_BREAKPOINTS: ClassVar[list[tuple[int, str]] | None] = [(0, "-tiny-h"), (MIN_HEIGHT, "-tall")]

    def on_mount(self) -> None:
        self.mount(TooSmall())

    def commands(self) -> list[Command]:
        """Extra command-palette entries of this screen: (name, help, callback)."""
        return []
