"""Power panel: watts per GPU with history, energy so far (NVML counter) and joules per token.

Shown only when there is GPU telemetry (without it the util panel says why).
"""

from __future__ import annotations

from collections.abc import Hashable

from rich.text import Text

from tuner.report import fmt
from tuner.widgets.charts import spark
from tuner.widgets.feed import FeedView
from tuner.widgets.gpu_rows import label, latest
from tuner.widgets.panel import Panel, row


def energy_so_far(view: FeedView) -> float | None:
    """Joules from the NVML energy counter: last minus first reading, summed over GPUs."""
    if not view.energy:
        return None
    return sum((last[1] - first[1]) / 1000.0 for first, last in view.energy.values())


class PowerPanel(Panel):
    """Per-GPU power draw with a sparkline each, and the run's energy."""

    TITLE = "power"

    def changes(self, view: FeedView) -> Hashable:
        return view.gpu_seen, view.steps_seen, tuple(view.energy.values())

    def show(self, view: FeedView) -> None:
        if self.show_if(bool(view.gpus or view.energy)):
            super().show(view)

    def render_view(self, view: FeedView, width: int) -> list[Text]:
        n = len(view.gpus)
        chart = max(1, width - len(label(0, n)) - 10)
        lines: list[Text] = []
        total = 0.0
        for gpu, samples in view.gpus.items():
            watts = latest(samples).get("power_w")
            total += watts if isinstance(watts, (int, float)) else 0.0
            history = spark([s.get("power_w") for s in samples], chart, lo=0.0)
            lines.append(row(label(gpu, n), Text(history.ljust(chart), style="yellow"), f" {fmt(watts):>7} W"))
        joules = energy_so_far(view)
        per_token = joules / view.energy_tokens if joules and view.energy_tokens else None
        text = f"total {fmt(total)} W  energy {fmt(joules)} J  ≈{fmt(per_token)} J/tok"
        if view.summary is not None:
            s = view.summary
            text = (f"total {fmt(total)} W  final energy {fmt(s.get('energy_j'))} J  "
                    f"{fmt(s.get('joules_per_token'))} J/tok")
        lines.append(row(Text(text, style="bold")))
        return lines
