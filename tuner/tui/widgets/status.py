"""Status line: run id, workload and key options, elapsed time, status."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

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
