"""Compare screen: runs side by side, deltas against the first, and whether step times differ beyond noise.

Built from tuner.report's pieces (compared_rows, from the metric registry; fmt, key_options,
run_level_verdicts) and tuner.stats (relative_delta), the same ones ``btune compare`` prints with.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Static

from tuner.report import MIN_EFFECT, compared_rows, dig, fmt, key_options, run_level_verdicts
from tuner.stats import relative_delta
from tuner.tui.screens.base import BtuneScreen

ALPHA = 0.05


def delta_cell(base: Any, value: Any, unit: str, higher_is_better: bool) -> Text:
    """``value (+3.2%)``, the delta green when better and red when worse."""
    text = Text(fmt(value, unit), justify="right")
    d = relative_delta(base, value)
    if d is not None:
        better = (d > 0) == higher_is_better
        style = "dim" if abs(d) < 1e-9 else ("green" if better else "red")
        text.append(f" ({d * 100:+.1f}%)", style=style)
    return text


def noise_cells(recs: list[dict[str, Any]], alpha: float = ALPHA) -> list[Text]:
    """Per run after the first: tuner.report's run-level verdict against the first run's config."""
    out = [Text("baseline", style="dim", justify="right")]
    for v in run_level_verdicts(recs, alpha):
        out.append(Text(v["text"], style="bold" if v["real"] else "dim", justify="right"))
    return out


class CompareScreen(BtuneScreen):
    """Marked runs side by side (the first marked is the baseline)."""

    HELP = ("Headline metrics of the marked runs side by side. Each run after the first shows its relative delta "
            "against the first (green better, red worse). The last row says whether a config's steady step time "
            "differs from the first run's config beyond run-to-run noise: Welch's t-test over one value per run "
            f"(repeats of a config: btune run --repeat N), α = {ALPHA}, and at least {MIN_EFFECT:.0%} apart; with "
            "one run per side the noise is unknown. b or Esc goes back.")
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,b", "back", "Back")]

    def __init__(self, records: list[dict[str, Any]]) -> None:
        super().__init__()
        self.records = records

    def compose(self) -> ComposeResult:
        yield Static(Text.assemble(("compare", "bold"), f"  {len(self.records)} runs, deltas against the first"),
                     id="compare-title")
        yield DataTable(id="compare-table", cursor_type="row", zebra_stripes=True)
        yield Static(self._legend(), id="compare-legend")
        yield Footer()

    def _legend(self) -> Text:
        out = Text()
        for i, rec in enumerate(self.records):
            out.append(f"{'base' if i == 0 else f'#{i}'}: ", style="bold")
            out.append(f"{rec['id']}  {rec['status']}  {key_options(rec) or '-'}\n")
        out.append("last row: run-level test of the steady step time against the base's config (repeats: --repeat N)",
                   style="dim")
        return out

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        recs = self.records
        table.add_column("metric", key="metric")
        for i in range(len(recs)):
            table.add_column("base" if i == 0 else f"#{i}", key=f"run{i}")
        table.add_row("workload", *[str(dig(r, ("config", "workload"))) for r in recs])
        table.add_row("status", *[r["status"] for r in recs])
        for fig, values in compared_rows(recs):
            unit = fig.unit
            name = f"{fig.label} [{unit}]" if unit and unit not in ("%", fig.label) else fig.label
            cells = [Text(fmt(values[0], unit), justify="right")]
            cells += [delta_cell(values[0], v, unit, fig.metric.higher_is_better) for v in values[1:]]
            table.add_row(name, *cells)
        table.add_row("step time differs?", *noise_cells(recs))

    def action_back(self) -> None:
        self.app.pop_screen()
