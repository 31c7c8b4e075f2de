"""GPU panel: utilisation (with history), SM clock, temperature and throttle reasons per GPU (many GPUs: one
line across them); host CPU."""

from __future__ import annotations

from collections.abc import Hashable

from rich.text import Text

from tuner.feed import FeedView
from tuner.telemetry import throttle_names
from tuner.tui.widgets.charts import spark
from tuner.tui.widgets.gpu_rows import folded, gpu_label, host_line, label, latest, no_gpu_line
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
        if folded(view, self.gpu_rows):
            lines.append(self._summary(view))
        chart = max(1, min(24, width - len(label(0, n)) - 36))
        for gpu, samples in view.gpus.items() if not folded(view, self.gpu_rows) else ():
            s = latest(samples)
            mask = s.get("throttle")
            reasons = [r for r in throttle_names(mask) if r != "idle"] if isinstance(mask, int) else []
            history = spark([x.get("util_gpu") for x in samples], chart, lo=0.0, hi=100.0).ljust(chart)
            lines.append(row(
                gpu_label(view, gpu), _num(s.get("util_gpu"), "%", 3), " ", Text(history, style="green"),
                f" SM {_num(s.get('sm_clock_mhz'), ' MHz', 4)} {_num(s.get('temp_c'), ' C', 3)}",
                Text(f" {','.join(reasons)}", style="red") if reasons else "",
            ))
        if not view.gpus:
            lines.append(no_gpu_line(view, why=True))
        host = host_line(view)
        if host is not None:
            lines.append(host)
        return lines

    @staticmethod
    def _summary(view: FeedView) -> Text:
        """Many GPUs in one line: utilisation, SM clock and temperature across them, and any throttling."""
        latest_samples = [latest(samples) for samples in view.gpus.values()]

        def across(field: str, unit: str) -> str:
            xs = [float(s[field]) for s in latest_samples if isinstance(s.get(field), (int, float))]
            if not xs:
                return "-"
            lo, hi = min(xs), max(xs)
            return f"{lo:.0f}{unit}" if lo == hi else f"{lo:.0f}–{hi:.0f}{unit}"

        throttled = [gpu for gpu, s in zip(view.gpus, latest_samples, strict=True)
                     if isinstance(s.get("throttle"), int)
                     and [r for r in throttle_names(s["throttle"]) if r != "idle"]]
        return row(Text(f"{len(view.gpus)} GPUs ", style="bold"),
                   f"util {across('util_gpu', '%')} · SM {across('sm_clock_mhz', ' MHz')} · "
                   f"{across('temp_c', ' C')}",
                   Text(f" · throttled: gpu {', '.join(map(str, throttled))}", style="red") if throttled else "")
