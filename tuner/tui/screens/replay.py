"""Replay screen: a recorded run played back through the live panels (tuner.replay.timeline feeds a RunFeed).

Space plays/pauses, n steps to the next training step, + and - change the speed, e jumps to the end,
r restarts. Nothing from the file is executed: it is data only.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Footer

from tuner.feed import RunFeed
from tuner.replay import timeline
from tuner.tui.screens.base import BtuneScreen
from tuner.tui.widgets.dashboard import HEIGHT_BREAKPOINTS, Dashboard
from tuner.tui.widgets.status import StatusLine, run_what

SPEEDS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


class ReplayScreen(BtuneScreen):
    """The panels of a recorded run, replayed at a chosen speed."""

    HELP = ("A recorded run replayed through the same panels as a live one, from its saved samples and events. "
            "Space plays or pauses, n advances to the next step, + and - change the speed, e jumps to the end, "
            "r restarts, g shows a row per GPU (more than 4 GPUs fold into one line per panel), b or Esc goes "
            "back.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("space", "toggle_play", "Play"),
        Binding("n", "step", "Step"),
        Binding("plus,equals_sign", "faster", "Faster/slower", key_display="+/-"),
        Binding("minus", "slower", "Slower", show=False),
        Binding("g", "gpu_rows", "GPUs"),
        Binding("e", "end", "End"),
        Binding("r", "restart", "Restart"),
        Binding("escape,b", "back", "Back"),
    ]
    VERTICAL_BREAKPOINTS = HEIGHT_BREAKPOINTS

    def __init__(self, record: dict[str, Any], refresh_hz: float = 4.0, autoplay: bool = True,
                 at_end: bool = False) -> None:
        super().__init__()
        self.record, self.refresh_hz = record, refresh_hz
        self.events = timeline(record)
        first = self.events[0]["t"] if self.events else 0.0
        self.t0 = float(record.get("started_ts") or first)
        self.t_end = max(float(record.get("ended_ts") or 0.0), self.events[-1]["t"] if self.events else self.t0)
        self.speed = 1.0
        self.playing = autoplay
        self._at_end = at_end
        self._swapping = False
        self.gpu_rows = False
        self._restart()

    def _restart(self) -> None:
        self.feed = RunFeed()
        self.pos = 0
        self.clock = self.t0
        self._last_tick = time.monotonic()

    def compose(self) -> ComposeResult:
        yield StatusLine(id="status")
        yield Dashboard(id="dashboard")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        if self._at_end:
            self.action_end()
        self.set_interval(1.0 / max(0.1, self.refresh_hz), self.tick)
        self.call_after_refresh(self.redraw)

    # -- playing -------------------------------------------------------------------------------
    def _advance_to(self, t: float) -> None:
        events, feed, pos = self.events, self.feed, self.pos
        while pos < len(events) and events[pos]["t"] <= t:
            feed(events[pos])
            pos += 1
        self.pos = pos
        self.clock = t
        if pos >= len(events) and self.feed.summary is None:
            self.feed.finish(self.record.get("summary") or {})
            self.playing = False

    def tick(self) -> None:
        now = time.monotonic()
        if self.playing:
            self._advance_to(self.clock + (now - self._last_tick) * self.speed)
        self._last_tick = now
        self.redraw()

    def redraw(self) -> None:
        if self._swapping:
            return
        rec = self.record
        state = "playing" if self.playing else "paused" if self.pos < len(self.events) else "end"
        what = f"{(rec.get('config') or {}).get('workload')} {run_what(rec)}"
        total = self.t_end - self.t0
        extra = f"of {total:.1f} s  ×{self.speed:g} {state}  run {rec.get('status')}"
        self.query_one(StatusLine).set_state("replay", str(rec.get("id")), what, self.clock - self.t0, extra)
        self.query_one(Dashboard).show(self.feed.view(), gpu_rows=self.gpu_rows)

    def on_resize(self) -> None:
        self.call_after_refresh(self.redraw)

    # -- actions -------------------------------------------------------------------------------
    async def action_toggle_play(self) -> None:
        if self.pos >= len(self.events):
            await self.action_restart()
        self.playing = not self.playing
        self._last_tick = time.monotonic()
        self.redraw()

    def action_step(self) -> None:
        """Feed events up to and including the next step event, then pause."""
        self.playing = False
        events = self.events
        target = next((i for i in range(self.pos, len(events)) if events[i].get("type") == "step"), len(events) - 1)
        if target >= 0 and events:
            self._advance_to(events[target]["t"])
        self.redraw()

    def action_faster(self) -> None:
        self.speed = next((s for s in SPEEDS if s > self.speed), SPEEDS[-1])
        self.redraw()

    def action_slower(self) -> None:
        self.speed = next((s for s in reversed(SPEEDS) if s < self.speed), SPEEDS[0])
        self.redraw()

    def action_gpu_rows(self) -> None:
        """A row per GPU in every panel, or many GPUs folded into one line (the default above 4)."""
        self.gpu_rows = not self.gpu_rows
        self.redraw()

    def action_end(self) -> None:
        self._advance_to(self.t_end)
        self.redraw()

    async def action_restart(self) -> None:
        """Back to the start, with fresh panels."""
        self._swapping = True  # no redraw while the old panels go and the new ones come
        try:
            self._restart()
            await self.query_one(Dashboard).remove()
            await self.mount(Dashboard(id="dashboard"), before=self.query_one(Footer))
        finally:
            self._swapping = False
        self.redraw()

    def action_back(self) -> None:
        self.app.pop_screen()
