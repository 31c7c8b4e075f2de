"""Small modal dialogs: a yes/no confirmation and the help screen."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Static


class ConfirmScreen(ModalScreen[bool]):
    """Asks a yes/no question; y/enter confirm, n/escape decline. A question given as a function is asked
    again four times a second, so it follows what it is about (a run that ends while the dialog is open)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str | Callable[[], str]) -> None:
        super().__init__()
        self._question = question

    @property
    def question(self) -> str:
        return self._question() if callable(self._question) else self._question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(self.question, id="question")
            with Horizontal(id="buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()
        if callable(self._question):
            self.set_interval(0.25, self._ask_again)

    def _ask_again(self) -> None:
        self.query_one("#question", Static).update(self.question)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


def bindings_text(screen: Screen[object]) -> Text:
    """The keys of ``screen`` and of the app (not those of the focused widget) with what they do."""
    from tuner.tui.screens.commands import described_bindings, key_names

    out = Text()
    seen: set[str] = set()
    for owner in (screen, screen.app):
        for binding in described_bindings(owner):
            if binding.description in seen:
                continue
            seen.add(binding.description)
            out.append(f"{key_names(screen.app, binding):>12}  ", style="bold")
            out.append(f"{binding.description}\n")
    return out


class HelpScreen(ModalScreen[None]):
    """The current screen's help and keys; any of escape, ?, q or enter closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,question_mark,q,enter,f1", "close", "Close")]

    def __init__(self, title: str, text: str, keys: Text) -> None:
        super().__init__()
        self.title_text, self.text, self.keys = title, text, keys

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static(Text(self.title_text, style="bold"))
            yield Static(self.text)
            yield Static(Text("keys", style="bold"))
            yield Static(self.keys)
            yield Static(Text("Ctrl+P opens the command palette with the same actions; Esc closes this.", style="dim"))

    def action_close(self) -> None:
        self.dismiss(None)
