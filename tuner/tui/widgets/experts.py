"""Expert balance panel (MoE): a layer × expert heat map of token counts and Gini/MaxVio/entropy history.

Shown only once ``experts`` events arrive. A cell's shade and colour say the expert's load over the
layer's mean (1.0 = balanced); when experts outnumber columns, each cell shows the hottest of its group.
The figures are tuner.balance's on the latest window's counts (mean and worst layer); once the run has ended,
the registry's expert-balance block over the whole run follows.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

from rich.text import Text

from tuner.feed import FeedView
from tuner.metrics import REGISTRY
from tuner.report import figure_value, fmt
from tuner.tui.widgets.charts import heat_row, spark
from tuner.tui.widgets.panel import Panel, block_figures, dim, pack, row

MAX_ROWS = 12
COMPACT_ROWS = 3  # heat-map rows on a short screen
#: The whole run's balance figures in a short screen's one or two lines, by metric name.
SHORT = {"expert_gini": "Gini", "expert_gini_max": "worst Gini", "expert_cv": "CV", "expert_max_vio": "MaxVio",
         "expert_load_entropy": "entropy", "expert_dead": "dead", "expert_dropped": "dropped",
         "router_entropy": "router entropy"}


def layer_ratios(counts: list[Any], columns: int) -> tuple[list[float | None], int]:
    """Load over the layer mean per cell, and experts per cell (hottest of each group)."""
    xs = [float(c) if isinstance(c, (int, float)) else 0.0 for c in counts]
    if not xs:
        return [], 1
    mean = sum(xs) / len(xs)
    group = max(1, math.ceil(len(xs) / max(1, columns)))
    cells: list[float | None] = []
    for i in range(0, len(xs), group):
        chunk = xs[i:i + group]
        cells.append(max(chunk) / mean if mean > 0 else None)
    return cells, group


def _fig(figs: dict[str, Any] | None, name: str) -> str:
    """A window's balance figure, mean and worst layer, written as the registry's metric of it is (dead experts
    a count, dropped tokens a percentage)."""
    mean, top = ((figs or {}).get("mean") or {}).get(name), ((figs or {}).get("max") or {}).get(name)
    metric = next((m for m in REGISTRY if m.path[0] == "experts" and m.path[-1] == name), None)
    unit, kind = (metric.unit, metric.kind) if metric is not None else ("", "")
    return f"{fmt(mean, unit)} (max {fmt(top, unit, kind)})" if mean is not None else "-"


class ExpertsPanel(Panel):
    """Heat map of the latest expert counts and balance metrics over time."""

    TITLE = "expert balance"

    def changes(self, view: FeedView) -> Hashable:
        return view.experts_seen

    def show(self, view: FeedView) -> None:
        if self.show_if(view.experts_seen > 0):
            super().show(view)

    def render_view(self, view: FeedView, width: int) -> list[Text]:
        ev = view.experts or {}
        layers = ev.get("counts") or ev.get("layers") or []
        ids = ev.get("layer_ids") or list(range(len(layers)))
        lines: list[Text] = []
        group = 1
        n_experts = max((len(c) for c in layers if isinstance(c, list)), default=0)
        cell_width = max(1, min(3, (width - 5) // max(1, n_experts)))
        max_rows = COMPACT_ROWS if self.compact else MAX_ROWS
        for layer_id, counts in list(zip(ids, layers, strict=False))[:max_rows]:
            cells, group = layer_ratios(counts if isinstance(counts, list) else [], (width - 5) // cell_width)
            lines.append(heat_row(f"L{layer_id:<3} ", cells, cell_width))
        if len(layers) > max_rows:
            lines.append(dim(f"… {len(layers) - max_rows} more MoE layers"))
        per = f", {group} experts per cell (hottest)" if group > 1 else ""
        window = ev.get("window")
        steps = f", steps {window[0]}–{window[1]}" if isinstance(window, list) and len(window) == 2 else ""
        run = block_figures(view.summary, "moe", "expert balance") if view.summary is not None else []
        if self.compact and run:  # a short screen, the run ended: the run's figures only
            return lines + pack([f"{SHORT.get(f.metric.name, f.label)} {figure_value(f)}" for f in run], width)
        if not self.compact:
            lines.append(dim(f"{len(layers)} MoE layers × {n_experts} experts{per}{steps}; shade = load / layer mean"))
        figs = view.experts_figures
        lines.append(row(f"gini {_fig(figs, 'gini')}  maxvio {_fig(figs, 'max_vio')}  entropy {_fig(figs, 'entropy')}"))
        extra = [f"{label} {_fig(figs, name)}" for name, label in
                 (("dead", "dead"), ("dropped_frac", "dropped"), ("router_entropy", "router entropy"))
                 if _fig(figs, name) != "-"]
        if extra:
            lines.append(row("  ".join(extra)))
        if self.compact:  # a short screen: the figures, no history
            return lines
        chart = max(1, width - 9)
        hist = view.experts_history
        for name, idx, style in (("gini    ", 0, "magenta"), ("maxvio  ", 1, "red"), ("entropy ", 2, "green")):
            lines.append(row(Text(name, style="bold"), Text(spark([h[idx] for h in hist], chart), style=style)))
        if run:
            lines.append(Text("whole run", style="bold"))
            lines += pack([f"{SHORT.get(f.metric.name, f.label)} {figure_value(f)}" for f in run], width)
        return lines
