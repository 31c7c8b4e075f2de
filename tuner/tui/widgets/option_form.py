"""OptionForm: a workload's options as form fields, built from the catalog declaration (never hard-coded).

Choices are Selects (choices this machine cannot run, by the catalog's checks, are disabled in the list
with the reason), numbers and text are Inputs validated by ``Option.convert``, flags are Checkboxes. An
option whose ``when`` condition does not hold is disabled with the reason. An option whose default means
"the preset's" shows what the current preset resolves it to, the same way in every workload: an Input left
blank reads ``preset: 8`` (blank is the default), a choice left at its default says ``preset: sigmoid`` beside it.
"""

from __future__ import annotations

from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.validation import ValidationResult, Validator
from textual.widget import Widget
from textual.widgets import Checkbox, Input, Label, Select
from textual.widgets._select import SelectOverlay

from tuner import catalog
from tuner.machine import MachineInfo
from workloads.options import Option, OptionError, WorkloadSpec

GROUP_TITLES = {"shape": "shape", "run": "run", "knobs": "knobs"}


def field_id(opt: Option) -> str:
    return f"opt-{opt.dest}"


def when_reason(opt: Option, values: dict[str, Any]) -> str | None:
    """Why ``opt`` is not valid with the other values (its ``when`` condition), or None."""
    for other, allowed in opt.when:
        if values.get(other.replace("-", "_")) not in allowed:
            return f"only with --{other} {'/'.join(str(a) for a in allowed)}"
    return None


def placeholder(opt: Option, preset: Any) -> str:
    """What a blank Input means: the value the preset resolves the option to, or ``unset``."""
    if preset is not None:
        return f"preset: {preset}"
    return "unset" if opt.default is None else ""


class OptionValidator(Validator):
    """Validates an Input's text with the option's own ``convert``."""

    def __init__(self, opt: Option) -> None:
        super().__init__()
        self.opt = opt

    def validate(self, value: str) -> ValidationResult:
        if value.strip() == "":  # blank: the default
            return self.success()
        try:
            self.opt.convert(value)
        except OptionError as exc:
            return self.failure(str(exc))
        return self.success()


class ChoiceSelect(Select[Any]):
    """A compact Select whose unavailable choices stay listed, disabled, with the reason."""

    def __init__(self, opt: Option, value: Any, **kwargs: Any) -> None:
        self.opt = opt
        self.unavailable: dict[Any, str] = {}
        super().__init__(self._items(), value=value, allow_blank=False, compact=True, **kwargs)

    def _items(self) -> list[tuple[str, Any]]:
        return [(f"{c} — {self.unavailable[c]}" if c in self.unavailable else str(c), c)
                for c in self.opt.choices or ()]

    def set_unavailable(self, unavailable: dict[Any, str]) -> None:
        """Mark the choices this machine cannot run (keeps the current value; posts no Changed)."""
        if unavailable == self.unavailable:
            return
        self.unavailable = unavailable
        value = self.value
        with self.prevent(Select.Changed):
            self.set_options(self._items())
            self.value = value

    def _setup_options_renderables(self) -> None:
        super()._setup_options_renderables()
        overlay = self.query_one(SelectOverlay)
        for index, (_, value) in enumerate(self._options):
            if value in self.unavailable:
                overlay.disable_option_at_index(index)


class OptionForm(VerticalScroll):
    """The form of one workload; posts ``OptionForm.Changed`` on every edit."""

    class Changed(Message):
        """A field changed; read ``form.collect()``."""

        def __init__(self, form: OptionForm) -> None:
            super().__init__()
            self.form = form

    class Focused(Message):
        """A field got focus (the screen shows its help)."""

        def __init__(self, opt: Option) -> None:
            super().__init__()
            self.opt = opt

    def __init__(self, spec: WorkloadSpec, machine: MachineInfo, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec, self.machine = spec, machine
        self.options = spec.all_options()
        self.initial = {o.dest: o.default for o in self.options}
        self.initial["preset"] = machine.default_preset(spec)
        self._by_id = {field_id(o): o for o in self.options}

    def compose(self) -> ComposeResult:
        groups: list[str] = []
        for opt in self.options:
            if opt.group not in groups:
                groups.append(opt.group)
        for group in groups:
            yield Label(GROUP_TITLES.get(group, group), classes="form-group")
            for opt in (o for o in self.options if o.group == group):
                with Horizontal(classes="option-row"):
                    yield Label(opt.flag, classes="opt-name")
                    yield self._control(opt)
                    yield Label("", classes="opt-note", id=f"note-{opt.dest}")

    def _control(self, opt: Option) -> Widget:
        value = self.initial[opt.dest]
        if opt.choices is not None:
            return ChoiceSelect(opt, value, id=field_id(opt))
        if opt.type is bool:
            return Checkbox("on" if value else "off", bool(value), compact=True, id=field_id(opt))
        preset = catalog.preset_value(self.spec, opt, self.initial)
        text = "" if value is None or (preset is not None and value == opt.default) else str(value)
        return Input(text, compact=True, id=field_id(opt), validators=[OptionValidator(opt)],
                     validate_on=["changed", "submitted", "blur"],
                     placeholder=placeholder(opt, preset))

    def on_mount(self) -> None:
        width = min(28, max(len(o.flag) for o in self.options) + 1)
        for label in self.query(".opt-name"):
            label.styles.width = width
        self.refresh_state()

    # -- reading -------------------------------------------------------------------------------
    def raw(self, opt: Option) -> Any:
        """The field's current value as the widget holds it."""
        widget = self.query_one(f"#{field_id(opt)}")
        if isinstance(widget, Select):
            return widget.selection
        if isinstance(widget, Checkbox):
            return widget.value
        assert isinstance(widget, Input)
        return opt.default if widget.value.strip() == "" else widget.value

    def current(self) -> dict[str, Any]:
        """Every option's converted value (the default where a field does not convert)."""
        out: dict[str, Any] = {}
        for opt in self.options:
            try:
                out[opt.dest] = opt.convert(self.raw(opt))
            except OptionError:
                out[opt.dest] = opt.default
        return out

    def collect(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(options to pass to build_config, errors by option); disabled options are left out."""
        current = self.current()
        values: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for opt in self.options:
            if when_reason(opt, current) is not None:
                continue
            try:
                value = opt.convert(self.raw(opt))
            except OptionError as exc:
                errors[opt.dest] = str(exc)
                continue
            if value != opt.default or opt.name == "preset":
                values[opt.dest] = value
        for dest, reason in self.machine.problems(self.spec, current).items():
            if dest in current and when_reason(self.spec.option(dest), current) is None:
                errors.setdefault(dest, reason)
        return values, errors

    # -- updating ------------------------------------------------------------------------------
    def refresh_state(self) -> None:
        """Enable/disable fields by their ``when`` conditions and this machine, and show each field's note."""
        current = self.current()
        _, errors = self.collect()
        presets = self.spec.preset_defaults(current)
        for opt in self.options:
            reason = when_reason(opt, current)
            widget = self.query_one(f"#{field_id(opt)}")
            widget.disabled = reason is not None
            resolved = presets.get(opt.dest)
            if isinstance(widget, ChoiceSelect):
                widget.set_unavailable(self.machine.unavailable(self.spec, current, opt))
            elif isinstance(widget, Input):
                widget.placeholder = placeholder(opt, resolved)
            note = self.query_one(f"#note-{opt.dest}", Label)
            if reason is not None:
                note.update(reason)
                note.set_classes("opt-note -disabled")
            elif opt.dest in errors:
                note.update(errors[opt.dest].split(": ", 1)[-1])
                note.set_classes("opt-note -error")
            elif resolved is not None and current.get(opt.dest) == opt.default and not isinstance(widget, Input):
                note.update(f"preset: {resolved}")  # an Input says it in its placeholder
                note.set_classes("opt-note")
            else:
                note.update("")
                note.set_classes("opt-note")

    def set_value(self, name: str, value: Any) -> None:
        """Set a field (tests, commands)."""
        opt = self.spec.option(name)
        widget = self.query_one(f"#{field_id(opt)}")
        if isinstance(widget, Input):
            widget.value = "" if value is None else str(value)  # blank: the default
        else:
            widget.value = value  # type: ignore[attr-defined]

    def focus_option(self, name: str) -> None:
        """Move the focus to a field."""
        self.query_one(f"#{field_id(self.spec.option(name))}").focus()

    @on(Input.Changed)
    @on(Select.Changed)
    @on(Checkbox.Changed)
    def _changed(self, event: Message) -> None:
        event.stop()
        if isinstance(event, Checkbox.Changed):
            event.checkbox.label = "on" if event.value else "off"
        self.refresh_state()
        self.post_message(self.Changed(self))

    def on_descendant_focus(self, event: Any) -> None:
        opt = self._by_id.get(getattr(event.widget, "id", None) or "")
        if opt is not None:
            self.post_message(self.Focused(opt))
