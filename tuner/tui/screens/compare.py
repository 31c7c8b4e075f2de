"""Compare screen: runs side by side, deltas against the first, and whether step times differ beyond noise.

Built from tuner.report's pieces (compared_rows, from the metric registry; name_rows, which heads each column
with the options that tell its run apart; scale and fmt, which give each row its unit; run_level_verdicts) and
tuner.stats (relative_delta), the same ones ``btune compare`` prints with. Run ids are in the legend below.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Static

from tuner.metrics import number
from tuner.report import (
    MIN_EFFECT,
    compared_rows,
    delta_text,
    fmt,
    name_rows,
    row_label,
    run_level_verdicts,
    run_names,
    scale,
)
from tuner.stats import relative_delta
from tuner.tui.screens.base import BtuneScreen

ALPHA = 0.05
MIN_LABEL = 18  #: the metric names wrap, but no narrower than this


def delta_cell(base: Any, value: Any, unit: str, higher_is_better: bool, div: float = 1.0,
               kind: str = "") -> Text:
    """``value (+3.2%)`` (the value divided by ``div``, the row's unit scale), the delta green when better and
    red when worse."""
    text = Text(fmt(value / div if number(value) else value, unit, kind), justify="right")
    d = relative_delta(base, value) if number(base) and number(value) else None
    if d is not None:
        better = (d > 0) == higher_is_better
        style = "dim" if abs(d) < 1e-9 else ("green" if better else "red")
        text.append(f" ({delta_text(d)})", style=style)
    return text


def noise_cells(recs: list[dict[str, Any]], alpha: float = ALPHA) -> list[Text]:
    """Per run after the first: tuner.report's run-level verdict against the first run's config."""
    out = [Text("baseline", style="dim", justify="right")]
    for v in run_level_verdicts(recs, alpha):
        out.append(Text(v["short"], style="bold" if v["real"] else "dim", justify="right"))
    return out


class CompareScreen(BtuneScreen):
    """Marked runs side by side (the first marked is the baseline)."""

    HELP = ("Metrics of the marked runs side by side, each column headed by the options that differ between the "
            "runs (run ids in the legend below), each row with its unit. Each run after the first shows its "
            "relative delta against the first (green better, red worse). The last row says whether a config's "
            "steady step time "
            "differs from the first run's config beyond run-to-run noise: Welch's t-test over one value per run "
            f"(repeats of a config: btune run --repeat N), α = {ALPHA}, and at least {MIN_EFFECT:.0%} apart; with "
            "one run per side the noise is unknown. b or Esc goes back.")
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,b", "back", "Back")]

    def __init__(self, records: list[dict[str, Any]]) -> None:
        super().__init__()
        self.records = records
        self._width = 0

    def compose(self) -> ComposeResult:
        yield Static(Text.assemble(("compare", "bold"), f"  {len(self.records)} runs, deltas against the first"),
                     id="compare-title")
        yield DataTable(id="compare-table", cursor_type="row", zebra_stripes=True)
        yield Static(self._legend(), id="compare-legend")
        yield Footer()

    def _legend(self) -> Text:
        out = Text()
        for i, (rec, name) in enumerate(zip(self.records, run_names(self.records), strict=True)):
            out.append(f"{'first' if i == 0 else i + 1}: {name}", style="bold")
            out.append(f"  {rec['id']}  {rec['status']}\n")
        out.append("last row: run-level test of the steady step time against the first column's config "
                   "(repeats: --repeat N)", style="dim")
        return out

    def on_mount(self) -> None:
        self._fill(self.app.size.width)

    def on_resize(self) -> None:
        if self._width != self.app.size.width:
            self._fill(self.app.size.width)

    def _fill(self, width: int) -> None:
        """The table for a terminal ``width``: the metric names wrap (rows grow) where the value columns would
        not fit beside them; with more runs than fit, the table scrolls sideways."""
        self._width = width
        table = self.query_one(DataTable)
        table.clear(columns=True)
        recs = self.records
        names = name_rows(recs) or [("run", [str(i + 1) for i in range(len(recs))])]
        rows: list[list[Text]] = [[Text("status"), *[Text(r["status"], justify="right") for r in recs]]]
        for fig, values in compared_rows(recs):
            div, unit = scale(values, fig.unit)
            cells = [Text(fmt(values[0] / div if number(values[0]) else values[0], unit, fig.kind), justify="right")]
            cells += [delta_cell(values[0], v, unit, fig.metric.higher_is_better, div, fig.kind) for v in values[1:]]
            rows.append([Text(row_label(fig, unit)), *cells])  # Text: "[ms]" is a unit, not markup
        rows.append([Text("step time differs?"), *noise_cells(recs)])
        heads = [Text("\n".join(k for k, _ in names), style="bold")]
        heads += [Text("\n".join(cells[i] or "-" for _, cells in names), justify="right") for i in range(len(recs))]
        widths = [max(max((len(ln) for ln in h.plain.splitlines()), default=0), *(len(r[i].plain) for r in rows))
                  for i, h in enumerate(heads)]
        room = width - sum(widths[1:]) - 2 * len(widths) - 3  # cell padding, scrollbar
        label_width = min(widths[0], max(MIN_LABEL, room))
        table.header_height = len(names)
        for i, head in enumerate(heads):
            table.add_column(head, key="metric" if i == 0 else f"run{i - 1}", width=label_width if i == 0 else None)
        for row in rows:
            table.add_row(*row, height=None if label_width < widths[0] else 1)

    def action_back(self) -> None:
        self.app.pop_screen()
