"""Plan screen: a dry run launched from the app. The workload prints its plan (resolved config, parameters,
FLOPs per token, memory estimate) and exits; the app shows it here. Nothing runs on the GPU and no run record
is written, so a dry run never appears in the runs directory as an ``ok`` run with no steps.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import ClassVar

from rich.json import JSON
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Static

from tuner.launch import RunConfig

PLAN_TIMEOUT_S = 300.0

#: ``run(argv) -> (exit status, stdout, stderr)``
PlanRunner = Callable[[list[str]], tuple[int, str, str]]


def run_plan(argv: list[str]) -> tuple[int, str, str]:
    """Run a dry run's command and return its exit status, stdout and stderr."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=PLAN_TIMEOUT_S,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return 124, "", f"the dry run took more than {PLAN_TIMEOUT_S:g} s"
    except OSError as exc:
        return 127, "", f"cannot start {argv[0]}: {exc.strerror or exc}"
    return res.returncode, res.stdout, res.stderr


class PlanReady(Message):
    """The dry run's command ended (from a thread worker)."""

    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        super().__init__()
        self.code, self.stdout, self.stderr = code, stdout, stderr


class PlanScreen(ModalScreen[None]):
    """A dry run's plan; Esc, b, q or Enter closes it."""

    DEFAULT_CSS = """
    PlanScreen { align: center middle; }
    PlanScreen #plan { width: 100; max-width: 95%; height: 85%; border: round $primary; background: $surface;
                       padding: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,b,q,enter", "close", "Close")]

    def __init__(self, config: RunConfig, run: PlanRunner | None = None) -> None:
        """``run``: what runs the dry run's command (default: ``run_plan``, a subprocess)."""
        super().__init__()
        self.config, self.run = config, run or run_plan
        self.result: PlanReady | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="plan"):
            yield Static(Text.assemble(("dry run", "bold"), f" · {self.config.workload}: the plan only; nothing runs "
                                       "and no run record is written"))
            yield Static(Text(f"$ {self.config.command_line}", style="dim"))
            yield Static(Text("working out the plan…", style="italic"), id="plan-body")
            yield Static(Text("Esc closes this; clear --dry-run in the form to run it.", style="dim"))

    def on_mount(self) -> None:
        self._plan()

    @work(thread=True, exit_on_error=False)
    def _plan(self) -> None:
        self.post_message(PlanReady(*self.run(list(self.config.argv))))

    def on_plan_ready(self, message: PlanReady) -> None:
        self.result = message
        body = self.query_one("#plan-body", Static)
        if message.code != 0:
            tail = "\n".join(message.stderr.strip().splitlines()[-8:]) or f"exit status {message.code}"
            body.update(Text(f"the dry run failed (exit {message.code}):\n{tail}", style="bold red"))
            return
        text = message.stdout.strip()
        try:
            body.update(JSON(text))
        except ValueError:
            body.update(Text(text))

    def action_close(self) -> None:
        self.dismiss(None)


__all__ = ["PlanReady", "PlanScreen", "run_plan"]
