"""GPU panel: utilisation (with history), SM clock, temperature and throttle reasons per GPU; host CPU."""

from __future__ import annotations

from collections.abc import Hashable

from rich.text import Text

from tuner.feed import FeedView
from tuner.telemetry import throttle_names
from tuner.tui.widgets.charts import spark
from tuner.tui.widgets.gpu_rows import host_line, label, latest, no_gpu_line
from tuner.tui.widgets.panel import Panel, row


def _num(value: object, unit: str, width: int) -> str:
    return f"{value:>{width}.0f}{unit}" if isinstance(value, (int, float)) else f"{'-':>{width}}{unit}"


class GpuPanel(Panel):
    """Utilisation, clocks and temperature."""

    TITLE = "util / clocks / temp"

    def changes(self, view: FeedView) -> Hashable:
        return view.gpu_seen, view.host_seen, len(view.notes)

    def render_view(self, view: FeedView, width: int) -> list[Text]:
        lines: list[Text] = []
        n = len(view.gpus)
        chart = max(1, min(24, width - len(label(0, n)) - 36))
        for gpu, samples in view.gpus.items():
            s = latest(samples)
            mask = s.get("throttle")
            reasons = [r for r in throttle_names(mask) if r != "idle"] if isinstance(mask, int) else []
            history = spark([x.get("util_gpu") for x in samples], chart, lo=0.0, hi=100.0).ljust(chart)
            lines.append(row(
                label(gpu, n), _num(s.get("util_gpu"), "%", 3), " ", Text(history, style="green"),
                f" SM {_num(s.get('sm_clock_mhz'), ' MHz', 4)} {_num(s.get('temp_c'), ' C', 3)}",
                Text(f" {','.join(reasons)}", style="red") if reasons else "",
            ))
        if not view.gpus:
            lines.append(no_gpu_line(view, why=True))
        host = host_line(view)
        if host is not None:
            lines.append(host)
        return lines
