"""Training metrics read off an unmodified command's stdout: ``btune run --parse PATTERN -- CMD ...``.

A :class:`LineParser` is given every stdout line (by the runner's stdout reader thread) with the wall time it
was read, and turns each line its pattern matches into a ``step`` event of the console's protocol: the step
number, the wall time per step since the previous matched line (``clock: "host"``), tokens, loss and every
other number the pattern names, as metrics. The pattern is a built-in (:data:`BUILTIN`: ``torchtitan``,
``hf``) or a Python regular expression with named groups: ``step``, ``loss``, ``tokens`` (the step's tokens),
``tokens_per_s`` or ``tokens_per_s_per_device`` (a rate; tokens = rate x step time), and any other name is a
metric. Step times are wall-clock gaps between log lines, so they are only as fine as the command's logging
interval; the first matched line is marked ``first`` (start-up, compilation) and kept out of steady state, and
a built-in's validation or evaluation line restarts the clock (its time is not a training step's). Only a
line's first :data:`MAX_LINE` characters are searched.

Standard library only (and the protocol's ``make_event``); never raises on a line.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any

from tuner.protocol import CLOCK_HOST, make_event

__all__ = ["BUILTIN", "KNOWN_GROUPS", "MAX_LINE", "LineParser", "ParseError", "number"]


class ParseError(ValueError):
    """A pattern that cannot be used; the message is one line."""


#: Named groups with a meaning; any other named group is a metric.
KNOWN_GROUPS = ("step", "loss", "tokens", "tokens_per_s", "tokens_per_s_per_device")
#: Fields btune fills in itself (the envelope and the step event's own): not usable as a group's name.
RESERVED = frozenset({"v", "type", "t", "rank", "step_ms", "clock", "warmup", "first", "source", "kv_tokens",
                      "weight_passes"})
#: Only a line's first MAX_LINE characters are searched (bounded work whatever a command prints).
MAX_LINE = 16 * 1024
_I64 = 2**63

#: Built-in patterns: name -> what it reads.
BUILTIN: dict[str, str] = {
    "torchtitan": "torchtitan's train step log line (step: N  loss: L  ...  tps: T, or wps: in older versions); "
                  "tps is per device (x devices for the run's tokens); grad_norm, memory, tflops and mfu kept "
                  "as torchtitan's reported figures (mem_reserved_reported_gib/_pct, tflops_reported, "
                  "mfu_reported_pct); validation lines are not steps",
    "hf": "Hugging Face Trainer log dicts on stdout ({'loss': ..., 'grad_norm': ..., ...}); each log line is one "
          "step, i.e. one logging interval (logging_steps optimizer steps), numbered 0, 1, 2, ...; tokens from "
          "num_input_tokens_seen when the Trainer counts them; values as printed (transformers 5: floats to 4 "
          "significant digits); eval dicts are not steps; the final train_runtime dict is kept as the "
          "parser's final figures",
}

_TORCHTITAN = re.compile(
    r"(?<!validate )(?<![\w-])step:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>\S+)"
    r"(?:\s+grad_norm:\s*(?P<grad_norm>\S+))?"
    r"(?:\s+memory:\s*(?P<mem_reserved_reported_gib>[\d.]+)GiB\((?P<mem_reserved_reported_pct>[\d.]+)%\))?"
    r"\s+[tw]ps:\s*(?P<tokens_per_s_per_device>[\d,]+)"
    r"(?:\s+tflops:\s*(?P<tflops_reported>[\d,.]+))?"
    r"(?:\s+mfu:\s*(?P<mfu_reported_pct>\S+))?"
)
#: torchtitan's validation line: not a step; the time it took is kept out of the next step's time.
_TORCHTITAN_PAUSE = re.compile(r"(?<![\w-])validate step:\s*\d+")
#: A Python dict literal with a quoted first key, the whole line (what the Trainer's callbacks print).
_HF = re.compile(r"^\s*(?P<dict>\{'[^'\\]{1,200}': .*\})\s*$")

# CSI sequences (colours), OSC sequences (titles, links), and two-character escapes.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]")
_NUMBER = re.compile(r"([-+]?)(\d{1,3}(?:,\d{3})+|\d+)?(\.\d*)?([eE][-+]?\d+)?\s*(?:%|[A-Za-z][A-Za-z/]{0,15})?")


def number(value: Any) -> int | float | None:
    """A finite number from a log's text (``"1,234"``, ``"5.74%"``, ``"21.33GiB"``, ``"1e-05"``) or from a
    number; None for anything else (``"N/A"``, ``"nan"``, a bool)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if -_I64 <= value < _I64 else float(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if not isinstance(value, str) or len(value) > 64:
        return None
    m = _NUMBER.fullmatch(value.strip())
    if m is None or not (m.group(2) or (m.group(3) or "")[1:]):  # no digits at all
        return None
    sign, whole, frac, exp = m.group(1), (m.group(2) or "").replace(",", ""), m.group(3), m.group(4)
    if frac is None and exp is None:
        n = int(sign + whole)
        return n if -_I64 <= n < _I64 else float(n)
    x = float(f"{sign}{whole or '0'}{frac or ''}{exp or ''}")
    return x if math.isfinite(x) else None


def _clean(line: str) -> str:
    """What a terminal would show of a line: at most MAX_LINE characters, colours stripped, the text after
    the last carriage return."""
    if len(line) > MAX_LINE:
        line = line[:MAX_LINE]
    if "\x1b" in line:
        line = _ANSI.sub("", line)
    if "\r" in line:
        line = line.rstrip("\r\n").rpartition("\r")[2]
    return line


def _compile(pattern: str) -> re.Pattern[str]:
    """A user's regex, checked: it compiles, names at least one group, and no group takes a reserved name."""
    try:
        regex = re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        detail = " ".join(str(exc).split())
        raise ParseError(f"--parse {pattern!r}: not a regular expression ({detail})") from None
    names = list(regex.groupindex)
    if not names:
        raise ParseError(f"--parse {pattern!r}: neither a built-in ({', '.join(BUILTIN)}) nor a regular expression "
                         f"with a named group, e.g. (?P<loss>[0-9.]+); known groups: {', '.join(KNOWN_GROUPS)}; "
                         "any other name is a metric")
    reserved = sorted(set(names) & RESERVED)
    if reserved:
        raise ParseError(f"--parse {pattern!r}: group name {reserved[0]!r} is a field btune fills in itself; "
                         "rename the group")
    return regex


def _metric_name(key: str) -> str:
    """A Trainer log key as a metric column name (word characters only, never a name btune uses itself)."""
    name = re.sub(r"\W", "_", key)[:100] or "_"
    return f"hf_{name}" if name in RESERVED or name in KNOWN_GROUPS else name


class LineParser:
    """Stdout lines -> step events, for one run. Call it with each line (no newline) and its wall time.

    ``matched`` counts the lines that became steps; ``unparsable`` the lines the pattern matched that could not
    become one (a step that is not a number, a log dict that is not a literal). ``final`` holds the numbers of
    the Hugging Face Trainer's closing ``train_runtime`` line (empty otherwise). ``description`` says what the
    pattern is, for the record.
    """

    def __init__(self, pattern: str, *, devices: int = 1, started: float | None = None) -> None:
        if type(devices) is not int or devices < 1:
            raise ParseError(f"--parse: devices must be a whole number >= 1, not {devices!r}")
        self.pattern = pattern
        self.devices = devices
        self.started = started
        self.matched = 0
        self.unparsable = 0
        self.final: dict[str, int | float] = {}
        self._hf = pattern == "hf"
        self._pause: re.Pattern[str] | None = None
        if pattern == "torchtitan":
            self._regex, self._pause = _TORCHTITAN, _TORCHTITAN_PAUSE
        elif self._hf:
            self._regex = _HF
        else:
            self._regex = _compile(pattern)
        self._groups = frozenset(self._regex.groupindex)
        self._metrics = tuple(g for g in self._regex.groupindex if g not in KNOWN_GROUPS)
        self._last_t: float | None = None  # when the previous step (or a pause) ended
        self._last_step: int | None = None
        self._tokens_seen: int | float | None = None  # hf: the Trainer's running token count
        self.description = self._describe()

    def _describe(self) -> str:
        if self.pattern in BUILTIN:
            devices = f"; tps x {_devices(self.devices)}" if self.pattern == "torchtitan" else ""
            return f"{self.pattern}: {BUILTIN[self.pattern]}{devices}"
        g = self._groups
        step = "the step group" if "step" in g else "a count of matched lines (0, 1, 2, ...)"
        if "tokens" in g:
            tokens = "the tokens group"
        elif "tokens_per_s" in g:
            tokens = "tokens_per_s x step time"
        elif "tokens_per_s_per_device" in g:
            tokens = f"tokens_per_s_per_device x {_devices(self.devices)} x step time"
        else:
            tokens = "none"
        parts = [f"regex {self.pattern!r}", f"step: {step}", f"loss: {'the loss group' if 'loss' in g else 'none'}",
                 f"tokens: {tokens}", f"metrics: {', '.join(self._metrics) or 'none'}"]
        return "; ".join(parts)

    # -- one line ---------------------------------------------------------------------------------
    def __call__(self, line: str, t: float) -> dict[str, Any] | None:
        """The step event for one stdout line read at wall time ``t``, or None when it is not a step."""
        text = _clean(line)
        m = self._regex.search(text)
        if m is None:
            if self._pause is not None and self._pause.search(text):
                self._paused(t)
            return None
        if self._hf:
            return self._hf_line(m.group("dict"), t)
        groups = m.groupdict()
        if not any(groups.values()):  # nothing captured (a regex that matches the empty string)
            return None
        step: int | None = None
        if "step" in self._groups:
            step = _whole(number(groups["step"]))
            if step is None:
                self.unparsable += 1
                return None
        rate = number(groups.get("tokens_per_s"))
        if rate is None:
            per_device = number(groups.get("tokens_per_s_per_device"))
            rate = per_device * self.devices if per_device is not None else None
        metrics = {name: x for name in self._metrics if (x := number(groups[name])) is not None}
        return self._step(t, step, number(groups.get("loss")), number(groups.get("tokens")), rate, metrics)

    def _paused(self, t: float) -> None:
        """A line that ends time spent outside training (validation, evaluation): the next step is timed from
        here."""
        if self._last_t is not None:
            self._last_t = t

    def _hf_line(self, text: str, t: float) -> dict[str, Any] | None:
        """One Trainer log dict: a training log (it has ``loss``) is a step; an eval dict is a pause; the closing
        ``train_runtime`` dict is kept in ``final``."""
        try:
            logs = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            self.unparsable += 1
            return None
        if not isinstance(logs, dict) or not all(isinstance(k, str) for k in logs):
            self.unparsable += 1
            return None
        if "loss" not in logs:
            if "train_runtime" in logs:
                self.final = {_metric_name(k): x for k, v in logs.items() if (x := number(v)) is not None}
            elif any(k.startswith("eval_") for k in logs):
                self._paused(t)
            return None
        tokens: int | float | None = None
        seen = number(logs.get("num_input_tokens_seen"))
        if seen is not None:
            tokens = seen - (self._tokens_seen or 0)
            self._tokens_seen = seen
        metrics = {_metric_name(k): x for k, v in logs.items() if k != "loss" and (x := number(v)) is not None}
        return self._step(t, None, number(logs["loss"]), tokens, None, metrics)

    def _step(self, t: float, step: int | None, loss: int | float | None, tokens: int | float | None,
              rate: int | float | None, metrics: dict[str, int | float]) -> dict[str, Any]:
        """The step event: its time since the previous step per step advanced (the first: since ``started``)."""
        first = self.matched == 0
        if step is None:
            step = self.matched
        if first or self._last_t is None:
            elapsed = t - self.started if self.started is not None else 0.0
            advanced = 1
        else:
            elapsed = t - self._last_t
            advanced = step - self._last_step if self._last_step is not None else 1
        step_ms = max(0.0, elapsed) * 1000.0 / max(1, advanced)
        if not math.isfinite(step_ms):
            step_ms = 0.0
        if tokens is None and rate is not None and not (first and self.started is None):  # no start: no time
            tokens = rate * step_ms / 1000.0
        if tokens is not None and tokens < 0:
            tokens = None
        self._last_t, self._last_step = t, step
        self.matched += 1
        fields: dict[str, Any] = {"step": step, "step_ms": step_ms, "tokens": tokens, "clock": CLOCK_HOST}
        if first:
            fields["first"] = True
        if loss is not None:
            fields["loss"] = float(loss)
        fields.update(metrics)
        fields["source"] = "parse"
        return make_event("step", rank=0, t=t, **fields)


def _devices(n: int) -> str:
    return f"{n} device{'s' if n != 1 else ''}"


def _whole(x: int | float | None) -> int | None:
    """An int from a parsed number that is a whole number within 64 bits, else None."""
    if isinstance(x, int):
        return x
    if isinstance(x, float) and x.is_integer() and -_I64 <= x < _I64:
        return int(x)
    return None
