"""CommandForm: the launch screen's "command" entry, any command run the way ``btune run -- CMD ARG...`` runs it.

The command line is split as a POSIX shell would split it (tuner.command.split_argv), never run by one, and is
shown back under the field as the argv list that will run, as it is typed. Beside it: the working directory
(the app's by default), variables added to the environment (``NAME=VALUE``, separated by spaces, a value with
spaces quoted) and an optional ``--parse`` pattern. What the screen does not check here (the program on the PATH,
the directory, the pattern) ``tuner.launch.command_config`` checks off the UI thread; its one-line error is shown
under the argv (``show_argv``).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Input, Label, Static

from tuner.command import CommandError, parse_env, split_argv

#: What the workload list says of the entry.
DESCRIPTION = "any command, run as an argv (never through a shell), recorded like a workload"


@dataclass(frozen=True)
class Field:
    """One field of the form (``name``: the Command field it fills; ``flag``: its label, as on the CLI)."""

    name: str
    flag: str
    help: str
    placeholder: str = ""


FIELDS = (
    Field("argv", "command", "the command line, split as a shell would split it; no shell runs it (no pipes, "
          "globs or $VARS). Its GPUs, energy, output and exit are recorded; steps come through import btune or "
          "--parse", "python train.py --lr 3e-4"),
    Field("cwd", "--cwd", "the command's working directory (blank: the app's)"),
    Field("env", "--env", "variables added to the command's environment: NAME=VALUE separated by spaces (quote a "
          "value with spaces); values that look like secrets are never recorded", "NAME=VALUE NAME=VALUE"),
    Field("parse", "--parse", "read steps from the command's stdout: torchtitan, hf, or a regex with named groups "
          "(step, loss, tokens, tokens_per_s, ...)", "torchtitan, hf or a regex (optional)"),
)


class CommandForm(VerticalScroll):
    """The command entry's fields; posts ``CommandForm.Changed`` on every edit. ``options``: its fields (the
    screen's palette lists them as it lists a workload's options)."""

    class Changed(Message):
        """A field changed; read ``form.collect()``."""

    class Focused(Message):
        """A field got focus (the screen shows its help)."""

        def __init__(self, field: Field) -> None:
            super().__init__()
            self.field = field

    def __init__(self, cwd: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cwd = cwd
        self.options = FIELDS

    def compose(self) -> ComposeResult:
        for f in FIELDS:
            with Horizontal(classes="command-row"):
                yield Label(f.flag, classes="command-name")
                yield Input(self.cwd if f.name == "cwd" else "", placeholder=f.placeholder or self.cwd, compact=True,
                            id=f"cmd-{f.name}")
            if f.name == "argv":
                yield Static("", id="cmd-argv-shown")

    def on_mount(self) -> None:
        self.show_argv()

    def text(self, name: str) -> str:
        return self.query_one(f"#cmd-{name}", Input).value

    def collect(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(the fields of a ``tuner.command.Command``, errors by field): the argv split, the environment
        additions parsed; a blank working directory or pattern is None."""
        errors: dict[str, str] = {}
        argv: tuple[str, ...] = ()
        try:
            argv = tuple(split_argv(self.text("argv")))
        except CommandError as exc:
            errors["argv"] = str(exc)
        else:
            if not argv:
                errors["argv"] = "no command: type one (python train.py)"
        env: dict[str, str] = {}
        try:
            env = parse_env(shlex.split(self.text("env")))
        except ValueError as exc:  # CommandError is one
            errors["env"] = str(exc) if isinstance(exc, CommandError) else f"--env: cannot split: {exc}"
        cwd = os.path.expanduser(self.text("cwd").strip()) or None
        parse = self.text("parse") if self.text("parse").strip() else None
        return {"argv": argv, "cwd": cwd, "env": env, "parse": parse}, errors

    def show_argv(self, problem: str | None = None) -> None:
        """Show the argv the command line splits into, or why it does not; ``problem``: why the command cannot
        run as given (the screen's build of it)."""
        values, errors = self.collect()
        shown = self.query_one("#cmd-argv-shown", Static)
        if "argv" in errors:
            shown.update(Text(errors["argv"], style="dim" if not self.text("argv").strip() else "bold red"))
            return
        line = Text(f"argv: {list(values['argv'])}")
        if problem:
            line.append(f"\n{problem}", style="bold red")
        shown.update(line)

    def set_value(self, name: str, value: Any) -> None:
        """Set a field (tests, commands)."""
        self.query_one(f"#cmd-{name}", Input).value = "" if value is None else str(value)

    def focus_option(self, name: str) -> None:
        """Move the focus to a field."""
        self.query_one(f"#cmd-{name}", Input).focus()

    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        event.stop()
        self.show_argv()
        self.post_message(self.Changed())

    def on_descendant_focus(self, event: Any) -> None:
        name = (getattr(event.widget, "id", None) or "").removeprefix("cmd-")
        field = next((f for f in FIELDS if f.name == name), None)
        if field is not None:
            self.post_message(self.Focused(field))
