"""Launch screen: pick a workload, fill its form (built from the catalog), see the exact command, launch.

Beside the workloads, the "command" entry runs any command the way ``btune run -- CMD ARG...`` does: its form
(CommandForm) gives a tuner.command.Command, built into a RunConfig by ``command_config`` on the same path."""

from __future__ import annotations

import os
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Footer, OptionList, Static
from textual.widgets.option_list import Option as ListOption

from tuner import catalog
from tuner.command import WORKLOAD as COMMAND
from tuner.command import Command as RunCommand
from tuner.command import CommandError
from tuner.launch import LaunchError, MemoryRefusal, RunConfig, build_config, command_config
from tuner.machine import MachineInfo, detect
from tuner.tui.screens.base import BtuneScreen, Command
from tuner.tui.widgets.command_form import DESCRIPTION as COMMAND_DESCRIPTION
from tuner.tui.widgets.command_form import CommandForm
from tuner.tui.widgets.option_form import OptionForm
from workloads.options import OptionError

if TYPE_CHECKING:
    from tuner.tui.app import BtuneApp


class MachineDetected(Message):
    """The GPU inventory arrived (from a thread worker)."""

    def __init__(self, machine: MachineInfo) -> None:
        super().__init__()
        self.machine = machine


class ConfigBuilt(Message):
    """A RunConfig built off the UI thread (build_config may ask NVML) for the form values ``key`` names, or why
    it could not be."""

    def __init__(self, key: str, config: RunConfig | None, error: str | None, forceable: bool = False) -> None:
        super().__init__()
        self.key, self.config, self.error = key, config, error
        self.forceable = forceable  #: refused only by the memory estimate: Ctrl+F launches it anyway


class LaunchScreen(BtuneScreen):
    """Workloads, their options, the command line; Ctrl+R launches."""

    HELP = ("Choose a workload on the left (up/down), then set its options (Tab moves between fields). "
            "The line at the bottom is the exact command that will run. Options that do not apply, or that "
            "this machine cannot run, are disabled with the reason. The last entry, command, runs any command "
            "(btune run -- CMD): type its command line, shown back as the argv that will run (no shell runs it), "
            "its working directory, NAME=VALUE variables to add and an optional --parse pattern. Ctrl+R (or F5) "
            "launches; a run the memory estimate says will not fit its GPUs is refused with the estimate, and "
            "Ctrl+F launches it anyway (btune run --force); F2 lists past runs, F4 shows btune bench's history, "
            "F6 btune tune's studies (n there tunes this workload with these options).")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+r,f5", "launch", "Launch"),
        Binding("ctrl+f", "force_launch", "Launch anyway", show=False),  # shown in the refusal's line
        Binding("f2", "runs", "Runs"),
        Binding("f4", "history", "History", show=False),  # hidden: the palette lists it (commands)
        Binding("f6", "tune", "Tune", show=False),  # hidden: the palette lists it (commands)
    ]

    app: BtuneApp  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.spec = next(iter(catalog.WORKLOADS.values()))  #: the built-in workload last chosen
        self.workload = self.spec.name  #: the entry chosen: a workload's name or "command"
        self.form: OptionForm | CommandForm | None = None
        self.config: RunConfig | None = None
        self._shown: str | None = None  # the form values the command line shows (a key, see _key)
        self._building: str | None = None  # the form values a build in flight is for
        self._forceable: str | None = None  # the form values refused only by the memory estimate
        self._launch_when_built = False

    def compose(self) -> ComposeResult:
        yield Static("btune · detecting GPUs…", id="machine")
        with Horizontal(id="launch-body"):
            yield OptionList(*[self._workload_item(name) for name in catalog.WORKLOADS], None,
                             self._workload_item(COMMAND), id="workloads")
            with Vertical(id="form-area"):
                yield Static("", id="workload-info")
                yield Static("", id="opt-help")
        with Horizontal(id="launch-bar"):
            yield Button("Launch ^R", id="launch", variant="success", disabled=True, compact=True)
            yield Static("", id="command")
        yield Footer()

    @staticmethod
    def _workload_item(name: str) -> ListOption:
        return ListOption(Text(name, style="bold"), id=name)

    async def on_mount(self) -> None:
        self.set_interval(0.5, self._reconcile)
        if self.app.machine is None:
            self._detect()
        else:
            await self._show_machine()

    @work(thread=True, exit_on_error=False)
    def _detect(self) -> None:
        self.post_message(MachineDetected(detect()))

    async def on_machine_detected(self, message: MachineDetected) -> None:
        self.app.machine = message.machine
        await self._show_machine()

    async def _show_machine(self) -> None:
        machine = self.app.machine
        assert machine is not None
        self.query_one("#machine", Static).update(Text.assemble(("btune", "bold"), f" · {machine.describe()}"))
        await self._build_form()

    async def _build_form(self) -> None:
        """(Re)build the form for the current workload (or the command entry)."""
        machine = self.app.machine
        if machine is None:
            return
        if self.form is not None:
            form, self.form = self.form, None  # no reading of a form on its way out
            await form.remove()
        if self.workload == COMMAND:
            description, hint = COMMAND_DESCRIPTION, "Runs like btune run -- CMD ARG (no shell)"
            self.form = CommandForm(os.getcwd(), id="form")
        else:
            description, hint = self.spec.description, f"presets: {', '.join(self.spec.presets)}"
            self.form = OptionForm(self.spec, machine, id="form")
        self.query_one("#workload-info", Static).update(Text.assemble((self.workload, "bold"), "  ", description))
        self.query_one("#opt-help", Static).update(
            Text(f"{hint}. Tab moves between fields; Ctrl+R launches.", style="dim"))
        await self.query_one("#form-area").mount(self.form, before="#opt-help")
        self.update_command()

    @on(OptionList.OptionHighlighted, "#workloads")
    async def _pick(self, event: OptionList.OptionHighlighted) -> None:
        name = event.option.id or ""
        if name != self.workload and (name in catalog.WORKLOADS or name == COMMAND):
            self.workload = name
            self.spec = catalog.WORKLOADS.get(name, self.spec)
            await self._build_form()

    @on(OptionList.OptionSelected, "#workloads")
    def _enter_form(self) -> None:
        if self.form is not None:
            self.form.focus_option(self.form.options[0].name)

    @on(OptionForm.Changed)
    @on(CommandForm.Changed)
    def _form_changed(self) -> None:
        self.update_command()

    @on(OptionForm.Focused)
    def _field_help(self, message: OptionForm.Focused) -> None:
        opt = message.opt
        default = catalog.default_text(self.spec, opt, self.form.current() if isinstance(self.form, OptionForm)
                                       else None)
        self.query_one("#opt-help", Static).update(
            Text.assemble((opt.flag, "bold"), f"  {opt.help} ", (f"[{opt.describe_allowed()}; {default}]", "dim")))

    @on(CommandForm.Focused)
    def _command_field_help(self, message: CommandForm.Focused) -> None:
        field = message.field
        self.query_one("#opt-help", Static).update(Text.assemble((field.flag, "bold"), f"  {field.help}"))

    def _key(self) -> tuple[str, dict[str, Any], dict[str, str]] | None:
        """(a key naming the workload and the form's values and errors, the values, the errors); None while
        there is no form."""
        if self.form is None or not self.form.is_mounted:
            return None
        values, errors = self.form.collect()
        key = repr((self.workload, sorted(values.items()), sorted(errors.items())))
        return key, values, errors

    @property
    def ready(self) -> bool:
        """True when the command line shows the form as it is now (read from the fields, so a change whose
        message is still on its way counts as not shown yet)."""
        current = self._key()
        return current is not None and current[0] == self._shown

    def update_command(self) -> None:
        """Validate the form, then build its RunConfig off the UI thread; the command line follows. Nothing
        happens when the command already shows these values or a build for them is under way."""
        current = self._key()
        if current is None:
            return
        key, values, errors = current
        if key in (self._shown, self._building):
            return
        self.config = None
        self._shown = None
        self.query_one("#launch", Button).disabled = True
        if errors:
            self._building = None
            self._shown = key
            self.query_one("#command", Static).update(Text("\n".join(errors.values()), style="bold red"))
            self._launch_when_built = False
            return
        self._building = key
        self._build(key, self.workload, values)

    def _reconcile(self) -> None:
        """The command line follows the form even if a change's message was lost or came while a build of
        older values was under way: compare them twice a second."""
        if self._building is None and not self.ready:
            self.update_command()

    @work(thread=True, exclusive=True, group="config", exit_on_error=False)
    def _build(self, key: str, workload: str, values: dict[str, Any], force: bool = False) -> None:
        forceable = False
        try:
            if workload == COMMAND:
                config, error = command_config(RunCommand(**values)), None
            else:
                machine = self.app.machine.machine if self.app.machine is not None else None
                config, error = build_config(workload, values, python=self.app.python, machine=machine,
                                             force=force), None
        except MemoryRefusal as exc:
            config, error, forceable = None, f"{exc}\nCtrl+F launches it anyway (btune run --force)", True
        except (OptionError, LaunchError, CommandError) as exc:
            config, error = None, str(exc)
        except Exception as exc:  # never leave the command line waiting on a build that died
            config, error = None, f"cannot build the command: {type(exc).__name__}: {exc}"
        self.post_message(ConfigBuilt(key, config, error, forceable))

    def on_config_built(self, message: ConfigBuilt) -> None:
        if message.key != self._building:
            return  # a build of values the form has left since
        self._building = None
        current = self._key()
        if current is None or current[0] != message.key:
            self.update_command()  # the form changed while this was built: build what it holds now
            return
        self._shown = message.key
        self.config = message.config
        self._forceable = message.key if message.forceable else None
        if isinstance(self.form, CommandForm):
            self.form.show_argv(message.error)
        command = self.query_one("#command", Static)
        if message.config is None:
            command.update(Text(message.error or "cannot build the command", style="bold red"))
            self._launch_when_built = False
            return
        command.update(Text.assemble(("$ ", "bold"), message.config.command_line))
        self.query_one("#launch", Button).disabled = False
        if self._launch_when_built:
            self._launch_when_built = False
            self.app.launch(message.config)

    def action_force_launch(self) -> None:
        """Launch the form's run though its memory estimate says it will not fit (only when that is what refused
        it: Ctrl+F does nothing otherwise)."""
        current = self._key()
        if current is None or self._forceable is None or current[0] != self._forceable or self.workload == COMMAND:
            self.notify("nothing to force: Ctrl+F launches a run refused by its memory estimate", severity="warning")
            return
        key, values, _ = current
        self._building, self._launch_when_built = key, True
        self._build(key, self.workload, values, force=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "launch":
            self.action_launch()

    def action_launch(self) -> None:
        """Launch the configured run on the live screen (as soon as the config of the form as it is now is
        built)."""
        if not self.ready:
            self._launch_when_built = True
            self.update_command()
        elif self.config is None:
            self.notify("fix the options shown in red first", severity="error")
        else:
            self.app.launch(self.config)

    def action_runs(self) -> None:
        self.app.action_runs()

    def action_history(self) -> None:
        self.app.action_history()

    def action_tune(self) -> None:
        self.app.action_tune()

    def commands(self) -> list[Command]:
        out: list[Command] = [("History", "btune bench's history per round, change points marked (key: F4)",
                                self.action_history),
                              ("Tune", "btune tune's studies; tune this workload with these options (key: F6)",
                               self.action_tune)]
        if self.form is not None:
            for opt in self.form.options:
                out.append((f"Set {opt.flag}", opt.help, partial(self.form.focus_option, opt.name)))
        for name, spec in catalog.WORKLOADS.items():
            out.append((f"Workload {name}", spec.description, partial(self.select_workload, name)))
        out.append((f"Workload {COMMAND}", COMMAND_DESCRIPTION, partial(self.select_workload, COMMAND)))
        return out

    def select_workload(self, name: str) -> None:
        """Highlight a workload in the list (its form follows)."""
        listing = self.query_one("#workloads", OptionList)
        listing.highlighted = listing.get_option_index(name)

    def set_option(self, name: str, value: Any) -> None:
        """Set a form field (tests and scripts)."""
        assert self.form is not None
        self.form.set_value(name, value)
