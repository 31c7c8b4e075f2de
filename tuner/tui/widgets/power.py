"""Power panel: watts per GPU with history, energy so far (NVML counter) and joules per token.

Shown only when there is GPU telemetry (without it the util panel says why).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from rich.text import Text

from tuner.feed import FeedView
from tuner.report import fmt
from tuner.summary import energy_gpus
from tuner.tui.widgets.charts import spark
from tuner.tui.widgets.gpu_rows import label, latest
from tuner.tui.widgets.panel import Panel, dim, row


def run_gpus(view: FeedView) -> tuple[list[int] | None, str | None]:
    """The GPUs whose energy is the run's (tuner.summary.energy_gpus on the readings so far), and a note."""
    keys, note = energy_gpus(view.energy_boards, view.metas)
    return (None if keys is None else [int(k) for k in keys]), note


def energy_so_far(view: FeedView, readings: dict[int, Any] | None = None) -> float | None:
    """Joules from the NVML energy counter of the run's GPUs: last minus first reading, summed."""
    readings = view.energy if readings is None else readings
    gpus, _ = run_gpus(view)
    if not readings or gpus is None:
        return None
    joules = [(last[1] - first[1]) / 1000.0 for gpu, (first, last) in readings.items() if gpu in gpus]
    return sum(joules) if joules else None


def joules_per_token(view: FeedView) -> float | None:
    """Energy since the first steady step over the steady tokens since: never a warm-up figure."""
    joules = energy_so_far(view, view.steady_energy)
    return joules / view.steady_tokens if joules and view.steady_tokens else None


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
        per_token = joules_per_token(view)
        gpus, note = run_gpus(view)
        jpt = "(warm-up)" if not view.steady_energy else f"{fmt(per_token)} J/tok steady"
        text = f"total {fmt(total)} W  run's GPUs {fmt(joules)} J  {jpt}"
        if view.summary is not None:
            s = view.summary
            text = (f"total {fmt(total)} W  energy {fmt(s.get('energy_j'))} J  "
                    f"{fmt(s.get('joules_per_token'))} J/tok (steady window)")
            note = s.get("energy_note")
        lines.append(row(Text(text, style="bold")))
        if gpus is not None and len(gpus) < len(view.energy):
            lines.append(dim(f"energy counts GPU {', '.join(map(str, gpus)) or '-'} (the run's), not the others"))
        if note:
            lines.append(dim(str(note)))
        return lines
