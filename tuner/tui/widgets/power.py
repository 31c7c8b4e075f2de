"""Power panel: watts per GPU on a time chart, energy so far (NVML counter) and joules per token.

Shown only when there is GPU telemetry (without it the util panel says why).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from rich.text import Text

from tuner.feed import FeedView, energy_so_far, joules_per_token, run_gpus
from tuner.report import fmt, quantity
from tuner.tui.widgets.gpu_rows import folded, gpu_label, gpu_series, latest, spread
from tuner.tui.widgets.panel import Panel, dim, pack, row, run_seconds, window_start


def with_unit(value: Any, unit: str) -> str:
    """``quantity`` (an SI prefix where the value needs one), and ``- unit`` for no value."""
    return quantity(value, unit) if value is not None else f"- {unit}"

class PowerPanel(Panel):
    """Power per GPU on a time chart (each GPU's line; many GPUs folded: the mean and the highest), the
    total and per-GPU watts, and the run's energy."""

    TITLE = "power"
    CHARTS = (("w", "W/GPU", 0.0),)

    def changes(self, view: FeedView) -> Hashable:
        return view.gpu_seen, view.steps_seen, tuple(view.energy.values())

    def show(self, view: FeedView) -> None:
        if self.show_if(bool(view.gpus or view.energy)):
            super().show(view)

    def render_view(self, view: FeedView, width: int) -> list[Text]:
        n = len(view.gpus)
        lines: list[Text] = []
        watts = {gpu: latest(samples).get("power_w") for gpu, samples in view.gpus.items()}
        values = [w for w in watts.values() if isinstance(w, (int, float))]
        total = sum(values)
        if folded(view, self.gpu_rows):
            lines += pack([f"{n} GPUs {fmt(total)} W", spread(values, "W")], width)
            lines[0].stylize("bold", 0, len(f"{n} GPUs {fmt(total)} W"))
        elif n == 1:
            lines.append(row(gpu_label(view, next(iter(watts))), Text(f"{fmt(total)} W", style="bold")))
        else:
            lines.append(row(Text(f"total {fmt(total)} W", style="bold")))
            for gpu, w in watts.items():
                lines.append(row(gpu_label(view, gpu), f"{fmt(w):>7} W"))
        joules = energy_so_far(view)
        per_token = joules_per_token(view)
        gpus, note = run_gpus(view)
        jpt = "- J/tok (warm-up)" if not view.steady_energy else f"{with_unit(per_token, 'J/tok')} steady"
        text = f"energy {with_unit(joules, 'J')} · {jpt}"
        if view.summary is not None:
            s = view.summary
            per_token = with_unit(s.get("joules_per_token"), "J/tok")
            text = f"energy {with_unit(s.get('energy_j'), 'J')} · {per_token} steady"
            note = s.get("energy_note")
        lines.append(row(text))
        if gpus is not None and len(gpus) < len(view.energy):
            lines.append(dim(f"energy counts GPU {', '.join(map(str, gpus)) or '-'} (the run's), not the others"))
        if note:
            lines.append(dim(str(note)))
        return lines

    def draw_charts(self, view: FeedView) -> None:
        lines = gpu_series(view, "power_w", self.gpu_rows)
        dropped = view.gpu_seen > sum(len(samples) for samples in view.gpus.values())
        self.charts["w"].set_series(lines, run_seconds(view), t_start=window_start(lines, dropped))
