"""Memory panel: used/total per GPU, torch's peak from step events, the run's host RSS."""

from __future__ import annotations

from collections.abc import Hashable

from rich.text import Text

from tuner.feed import FeedView
from tuner.report import fmt
from tuner.stats import finite
from tuner.tui.widgets.charts import bar
from tuner.tui.widgets.gpu_rows import label, latest, no_gpu_line
from tuner.tui.widgets.panel import Panel, row

GIB = 1024.0


class MemoryPanel(Panel):
    """GPU memory gauges, and the allocator peak the workload reports."""

    TITLE = "memory"

    def changes(self, view: FeedView) -> Hashable:
        return view.gpu_seen, view.steps_seen, view.host_seen, len(view.notes)

    def render_view(self, view: FeedView, width: int) -> list[Text]:
        lines: list[Text] = []
        n = len(view.gpus)
        gauge = max(4, width - len(label(0, n)) - 24)
        for gpu, samples in view.gpus.items():
            s = latest(samples)
            used, total = s.get("mem_used_mb"), s.get("mem_total_mb")
            ok = isinstance(used, (int, float)) and isinstance(total, (int, float)) and total > 0
            frac = used / total if ok else None
            text = f" {used / GIB:6.1f}/{total / GIB:.0f} GiB {frac * 100:3.0f}%" if ok else " n/a"
            lines.append(row(label(gpu, n), bar(frac, gauge), text))
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
            rss = view.host[-1].get("proc_rss_mb")
            now = f"{fmt(rss)} MiB now, " if view.summary is None else ""
            lines.append(row(f"host rss {now}{fmt(rss_max)} MiB max (the run's processes)"))
        return lines
