"""Memory panel: used/total per GPU on a time chart and gauges, torch's peak from step events, the run's host RSS."""

from __future__ import annotations

from collections.abc import Hashable

from rich.text import Text

from tuner.feed import FeedView
from tuner.report import fmt
from tuner.stats import finite
from tuner.tui.widgets.charts import bar
from tuner.tui.widgets.gpu_rows import folded, gpu_label, gpu_series, label, latest, no_gpu_line, spread
from tuner.tui.widgets.panel import Panel, row, run_seconds, series, window_start

GIB = 1024.0


class MemoryPanel(Panel):
    """GPU memory per GPU on a time chart (up to the GPUs' capacity) with gauges, the allocator peak the
    workload reports and the run's host RSS; without GPU telemetry the chart shows the host RSS."""

    TITLE = "memory"
    CHARTS = (("mem", "GiB", 0.0),)

    def changes(self, view: FeedView) -> Hashable:
        return view.gpu_seen, view.steps_seen, view.host_seen, len(view.notes)

    def render_view(self, view: FeedView, width: int) -> list[Text]:
        lines: list[Text] = []
        n = len(view.gpus)
        gauge = max(4, min(24, width - len(label(0, n)) - 24))
        used_total = {gpu: (latest(samples).get("mem_used_mb"), latest(samples).get("mem_total_mb"))
                      for gpu, samples in view.gpus.items()}
        known = {g: (u, t) for g, (u, t) in used_total.items()
                 if isinstance(u, (int, float)) and isinstance(t, (int, float)) and t > 0}
        if folded(view, self.gpu_rows):
            fullest = max(known, key=lambda g: known[g][0] / known[g][1], default=None)
            if fullest is None:
                lines.append(row(f"{n} GPUs: n/a"))
            else:
                u, t = known[fullest]
                used = spread([k[0] for k in known.values()], "GiB", GIB)
                lines.append(row(Text(f"{n} GPUs ", style="bold"), used))
                lines.append(row(f"fullest gpu{fullest} ", bar(u / t, gauge),
                                 f" {u / GIB:.1f}/{t / GIB:.0f} GiB {u / t:.0%}"))
        for gpu, (used, total) in used_total.items() if not folded(view, self.gpu_rows) else ():
            ok = gpu in known
            frac = used / total if ok else None
            text = f" {used / GIB:6.1f}/{total / GIB:.0f} GiB {frac * 100:3.0f}%" if ok else " n/a"
            lines.append(row(gpu_label(view, gpu), bar(frac, gauge), text))
        if not view.gpus:
            lines.append(no_gpu_line(view))
        peaks = finite(s.get("mem_peak_mb") for s in view.steps)
        if peaks:
            lines.append(row(f"torch peak {fmt(max(peaks))} MiB (allocator, reported by the workload)"))
        if view.summary is not None and view.summary.get("torch_mem_peak_mb") is not None:
            lines[-1:] = [row(f"torch peak {fmt(view.summary['torch_mem_peak_mb'])} MiB (run)")]
        rss_max = max(finite(h.get("proc_rss_mb") for h in view.host), default=None)
        if view.summary is not None:
            rss_max = (view.summary.get("host") or {}).get("proc_rss_mb_max", rss_max)
        if rss_max is not None:
            rss = view.host[-1].get("proc_rss_mb") if view.host else None
            now = f"{fmt(rss)} MiB now, " if view.summary is None else ""
            lines.append(row(f"host rss {now}{fmt(rss_max)} MiB max (the run's processes)"))
        return lines

    def draw_charts(self, view: FeedView) -> None:
        chart = self.charts["mem"]
        if view.gpus:
            totals = [latest(s).get("mem_total_mb") for s in view.gpus.values()]
            capacity = max((t for t in totals if isinstance(t, (int, float))), default=None)
            chart.unit = "GiB"
            lines = gpu_series(view, "mem_used_mb", self.gpu_rows, GIB)
            dropped = view.gpu_seen > sum(len(samples) for samples in view.gpus.values())
            chart.set_series(lines, run_seconds(view), ceiling=capacity / GIB if capacity else None,
                             t_start=window_start(lines, dropped))
        else:  # no GPU telemetry: the run's processes on the host
            chart.unit = "MiB"
            lines = [series(view, view.host, lambda h: h.get("proc_rss_mb"), "magenta")]
            chart.set_series(lines, run_seconds(view), t_start=window_start(lines, view.host_seen > len(view.host)))
