"""Declared options of a workload: one declaration read by the workload's argparse, the CLI and the TUI.

Torch-free on purpose: ``btune list`` and validation before launch must not import torch.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Value = int | float | str | bool | None


class OptionError(ValueError):
    """A value a user gave that the declaration does not allow; the message is one line."""


#: ``Option.tune_start``: start at the largest value the memory prediction admits (larger batches fill a GPU better)
LARGEST = "largest"


@dataclass(frozen=True)
class Option:
    """One option: ``--name`` on the command line, one field in the TUI form.

    ``when`` restricts validity: ``(("mode", ("train",)),)`` means only valid while ``mode`` is train.
    ``group`` orders the TUI form (shape, knobs, run). ``tune``: the values the auto-tuner searches by default;
    ``tune_start``: where its climb starts this knob per device kind (``(("cuda", "default"),)``; ``LARGEST``: the
    largest value predicted to fit), else at the default.
    """

    name: str
    type: type = str
    default: Value = None
    help: str = ""
    choices: tuple[Value, ...] | None = None
    min: float | None = None
    max: float | None = None
    when: tuple[tuple[str, tuple[Value, ...]], ...] = ()
    group: str = "run"
    #: the values ``btune tune`` tries by default (empty: not tuned unless ``--space`` names it)
    tune: tuple[Value, ...] = ()
    #: the auto-tuner's starting value per device kind ("cuda", "cpu"); LARGEST: the largest that fits
    tune_start: tuple[tuple[str, Value], ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def describe_allowed(self) -> str:
        """What values are allowed, in words."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.type is bool:
            return "a flag (no value)"
        kind = {int: "an integer", float: "a number", str: "text"}.get(self.type, self.type.__name__)
        if self.min is not None and self.max is not None:
            return f"{kind} from {_fmt(self.min)} to {_fmt(self.max)}"
        if self.min is not None:
            return f"{kind} >= {_fmt(self.min)}"
        if self.max is not None:
            return f"{kind} <= {_fmt(self.max)}"
        return kind

    def convert(self, raw: Any) -> Value:
        """Convert and check one value; raises OptionError naming the option and what is allowed."""
        if raw is None:
            return None
        try:
            if self.type is bool:
                value: Value = raw if isinstance(raw, bool) else _parse_bool(str(raw))
            elif self.type is int:
                if isinstance(raw, float) and not raw.is_integer():
                    raise ValueError
                value = int(raw) if not isinstance(raw, str) else int(raw.strip())
            elif self.type is float:
                value = float(raw)
                if not math.isfinite(value):  # NaN, infinities
                    raise ValueError
            else:
                value = str(raw)
        except (TypeError, ValueError):
            raise OptionError(f"{self.flag}: {raw!r} is not valid; expected {self.describe_allowed()}") from None
        if self.choices is not None and value not in self.choices:
            raise OptionError(f"{self.flag}: {raw!r} is not allowed; expected {self.describe_allowed()}")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if numeric and ((self.min is not None and value < self.min) or (self.max is not None and value > self.max)):
            raise OptionError(f"{self.flag}: {raw!r} is out of range; expected {self.describe_allowed()}")
        return value


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


@dataclass(frozen=True)
class Machine:
    """What this machine can run, as the console sees it before launch (no torch import)."""

    gpus: tuple[dict[str, Any], ...] = ()
    modules: frozenset[str] = frozenset()
    reason: str | None = None  #: why there are no GPUs, when there are none

    @property
    def fp8_gpus(self) -> bool:
        """Every visible GPU has FP8 tensor cores (compute capability 8.9 or newer)."""
        def cc(g: dict[str, Any]) -> tuple[int, ...]:
            return tuple(int(x) for x in str(g.get("compute_capability") or "0.0").split("."))

        return bool(self.gpus) and all(cc(g) >= (8, 9) for g in self.gpus)


#: ``checks(options, machine) -> [(option name, reason)]``: what this machine cannot run.
Checks = Callable[[Mapping[str, Any], Machine], list[tuple[str, str]]]


def device_checks(opts: Mapping[str, Any], machine: Machine) -> list[tuple[str, str]]:
    """Every workload: ``--device cuda`` needs a visible GPU."""
    if opts.get("device") == "cuda" and not machine.gpus:
        why = f" ({machine.reason})" if machine.reason else ""
        return [("device", f"--device cuda: no NVIDIA GPU is visible{why}; use --device cpu or auto")]
    return []


@dataclass(frozen=True)
class WorkloadSpec:
    """A workload: its module, a one-line description, named presets and declared options."""

    name: str
    module: str
    description: str
    presets: tuple[str, ...]
    options: tuple[Option, ...]
    default_preset: str = ""
    cpu_preset: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    checks: Checks | None = None
    #: ``preset_values(options) -> {option: value}``: what options left at a default that means "the preset's"
    #: (0, unset, empty, auto) resolve to under the options' preset (the help and the form show it).
    preset_values: Callable[[Mapping[str, Any]], Mapping[str, Value]] | None = None

    def all_options(self) -> tuple[Option, ...]:
        """Common options first, then the workload's own."""
        preset = Option(
            "preset", str, self.default_preset or self.presets[0], "named preset", self.presets, group="shape"
        )
        return (preset, *COMMON_OPTIONS, *self.options)

    def option(self, name: str) -> Option:
        for opt in self.all_options():
            if opt.name == name or opt.dest == name:
                return opt
        raise OptionError(f"{self.name}: no option --{name}; allowed: {self.option_names()}")

    def option_names(self) -> str:
        return ", ".join(o.flag for o in self.all_options())

    def defaults(self) -> dict[str, Value]:
        return {o.dest: o.default for o in self.all_options()}

    def preset_defaults(self, values: Mapping[str, Any] | None = None) -> dict[str, Value]:
        """What each option that defers to the preset resolves to with ``values`` (the preset, and any option
        the resolution depends on, such as ``--duration``; default: the default preset), by option dest."""
        if self.preset_values is None:
            return {}
        opts = {**self.defaults(), **(values or {})}
        if opts.get("preset") not in self.presets:
            return {}
        try:
            return {k.replace("-", "_"): v for k, v in self.preset_values(opts).items()}
        except (KeyError, ValueError):  # a shape the preset cannot take: the checks say why
            return {}


COMMON_OPTIONS: tuple[Option, ...] = (
    Option("steps", int, 0, "measured steps after the warm-up (0: until --duration; both 0: the preset's default)",
           min=0),
    Option("duration", float, 0.0, "seconds to run after warm-up (0: until --steps)", min=0),
    Option("warmup", int, 3, "warm-up steps excluded from steady-state statistics", min=0),
    Option("seed", int, 0, "random seed", min=0),
    Option("device", str, "auto", "where to run", ("auto", "cuda", "cpu")),
)


def machine_checks(opts: Mapping[str, Any], machine: Machine, spec: WorkloadSpec) -> list[tuple[str, str]]:
    """What this machine cannot run of ``opts``: the common device rule, then the workload's own checks."""
    return device_checks(opts, machine) + (spec.checks(opts, machine) if spec.checks else [])


def validate(spec: WorkloadSpec, values: Mapping[str, Any]) -> dict[str, Value]:
    """Convert, range-check and cross-check values; return the full resolved option dict.

    Raises OptionError (one line) for an unknown option, a bad value, or an option set while its
    ``when`` condition does not hold.
    """
    resolved = spec.defaults()
    given: set[str] = set()
    for key, raw in values.items():
        opt = spec.option(key)
        resolved[opt.dest] = opt.convert(raw)
        given.add(opt.dest)
    for opt in spec.all_options():
        for other, allowed in opt.when:
            other_dest = other.replace("-", "_")
            if opt.dest in given and resolved.get(other_dest) not in allowed:
                allowed_txt = ", ".join(str(a) for a in allowed)
                raise OptionError(f"{opt.flag} is only valid with --{other} {allowed_txt}")
    return resolved


class _Parser(argparse.ArgumentParser):
    allowed = ""

    def error(self, message: str) -> None:  # one line, no usage dump
        if message.startswith("unrecognized arguments") and self.allowed:
            message += f"; allowed: {self.allowed}"
        raise OptionError(f"{self.prog}: {message}")


def build_parser(spec: WorkloadSpec, prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser for the workload, from its declaration (no defaults: validate fills them)."""
    parser = _Parser(prog=prog or f"python -m {spec.module}", description=spec.description, allow_abbrev=False)
    parser.allowed = spec.option_names()
    for opt in spec.all_options():
        help_text = f"{opt.help} [{opt.describe_allowed()}; default {opt.default}]"
        if opt.type is bool:
            parser.add_argument(opt.flag, dest=opt.dest, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(opt.flag, dest=opt.dest, default=None, help=help_text, metavar=opt.dest.upper())
    return parser


def parse_args(spec: WorkloadSpec, argv: Sequence[str]) -> dict[str, Value]:
    """Parse a command line into a validated, complete option dict."""
    ns = build_parser(spec).parse_args(list(argv))
    given = {k: v for k, v in vars(ns).items() if v is not None}
    return validate(spec, given)


def to_argv(spec: WorkloadSpec, values: Mapping[str, Any]) -> list[str]:
    """The command-line arguments for values that differ from the defaults (bools as flags)."""
    argv: list[str] = []
    for opt in spec.all_options():
        value = values.get(opt.dest, opt.default)
        if value is None or (value == opt.default and opt.name != "preset"):
            continue
        if opt.type is bool:
            if value:
                argv.append(opt.flag)
        else:
            argv += [opt.flag, str(value)]
    return argv


def run_main(spec: WorkloadSpec, argv: Sequence[str] | None, body: Any) -> int:
    """Entry point helper for ``python -m workloads.NAME``: parse, then call ``body(options)``.

    A bad option prints one line and returns 2.
    """
    import sys

    try:
        options = parse_args(spec, sys.argv[1:] if argv is None else argv)
    except OptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return int(body(options) or 0)
