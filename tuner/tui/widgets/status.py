"""Status line: run id, workload and key options, elapsed time, status."""

from __future__ import annotations

import shlex
from typing import Any

from rich.text import Text
from textual.widgets import Static

from tuner.command import WORKLOAD as COMMAND
from tuner.report import key_options

STATUS_STYLES = {
    "starting": "bold yellow", "running": "bold green", "cancelling": "bold yellow", "ok": "bold green",
    "failed": "bold red", "oom": "bold red", "killed": "bold red", "timeout": "bold red",
    "cancelled": "bold yellow", "interrupted": "bold yellow", "replay": "bold cyan",
}


def format_elapsed(seconds: float | None) -> str:
    """``12.3 s``, ``4:05`` or ``1:02:03``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def run_what(rec: dict[str, Any], full: bool = False) -> str:
    """What a run ran, after its workload's name: the options set away from the defaults, or a command run's
    command line as recorded (redacted); ``full`` adds its working directory, added variables and --parse."""
    config = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    if config.get("workload") != COMMAND:
        return key_options(rec)
    options = config.get("options") if isinstance(config.get("options"), dict) else {}
    argv = options.get("argv") if isinstance(options.get("argv"), list) else config.get("argv") or []
    text = shlex.join(str(a) for a in argv)
    if full:
        env = options.get("env") if isinstance(options.get("env"), dict) else {}
        text += f"  (in {options['cwd']})" if options.get("cwd") else ""
        text += "  env " + " ".join(f"{k}={v}" for k, v in env.items()) if env else ""
        text += f"  --parse {options['parse']}" if options.get("parse") else ""
    return text


class StatusLine(Static):
    """One line at the top of the live and replay screens."""

    def set_state(self, status: str, run_id: str, what: str, elapsed: float | None, extra: str = "") -> None:
        """Redraw with these values."""
        line = Text(no_wrap=True, overflow="ellipsis", end="")
        line.append(f" {status.upper()} ", style=STATUS_STYLES.get(status, "bold") + " reverse")
        line.append(f" {format_elapsed(elapsed)} ", style="bold")
        if extra:
            line.append(f" {extra} ")
        line.append(f" {run_id} ")
        line.append(what, style="dim")
        self.update(line, layout=False)
