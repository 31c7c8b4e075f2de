"""Validation panel (tp-validate): the verdict of TP=N against TP=1 and its worst tensors, once the run ends.

The workload's summary (the record's ``summary.workload``) carries the comparison tensor by tensor; while the
run is live its table arrives on stdout and shows in the log.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from rich.text import Text

from tuner.feed import FeedView
from tuner.tui.widgets.panel import Panel, dim, row

WORST = 3  # tensors listed by relative error


def result(view: FeedView) -> dict[str, Any] | None:
    """The workload's validation result, once the run has ended with one."""
    wl = (view.summary or {}).get("workload")
    return wl if isinstance(wl, dict) and "passed" in wl else None


class ValidationPanel(Panel):
    """PASS/FAIL, the tolerance, the worst relative errors."""

    TITLE = "validation"

    def changes(self, view: FeedView) -> Hashable:
        return view.summary is not None

    def show(self, view: FeedView) -> None:
        if self.show_if(result(view) is not None):
            super().show(view)

    def render_view(self, view: FeedView, width: int) -> list[Text]:
        wl = result(view) or {}
        tensors = [t for t in wl.get("tensors") or [] if isinstance(t, dict)]
        passed = bool(wl.get("passed"))
        verdict = Text(" PASS " if passed else " FAIL ", style="bold reverse " + ("green" if passed else "red"))
        lines = [row(verdict, f"  TP={wl.get('tp')} vs TP=1 · {len(tensors)} tensors · tolerance "
                              f"{wl.get('tolerance')} (relative)")]
        bad = [t.get("tensor") for t in tensors if not t.get("ok")]
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            lines.append(row(Text(f"mismatched: {', '.join(map(str, bad[:5]))}{more}", style="red")))
        worst = sorted(tensors, key=lambda t: -(t.get("max_rel") or 0.0))[:WORST]
        for t in worst:
            floored = " (under the gradient floor)" if t.get("floored") else ""
            lines.append(row(f"{t.get('max_rel') or 0.0:.3e} rel  {t.get('tensor')}{floored}"))
        if isinstance(wl.get("floor"), (int, float)):
            lines.append(dim(f"gradients: abs err <= floor {wl['floor']:.3e} always ok; the full table is in the log"))
        return lines
