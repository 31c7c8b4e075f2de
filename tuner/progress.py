"""A run's phase and progress, from its events: what the CLI status line and the app's status line show.

Workloads send ``phase`` events (building, loading, compiling with ``k`` of ``n`` where known, warm-up,
measuring, draining); the console adds ``starting`` before the first event and ``writing`` when the
record is being written. Progress is a fraction with an ETA whenever the run is bounded: by ``--steps``
(steady steps done), by ``--duration`` (time since measuring began) or by ``--num-requests`` (requests
finished). Without a phase event (an older workload, a user's command) the phase follows the steps:
warm-up while warm-up steps arrive, measuring after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PHASES = ("starting", "building", "loading", "compiling", "warm-up", "measuring", "draining", "writing", "done")


@dataclass(frozen=True)
class Progress:
    """Where a run is: its phase (with a detail such as ``bucket 3 of 8``), and when bounded the fraction
    done and the seconds left."""

    phase: str
    detail: str | None = None
    fraction: float | None = None
    eta_s: float | None = None

    def text(self, width: int = 20) -> str:
        """``measuring [#####.....] 52% ETA 1m04s`` (no bar when unbounded)."""
        head = f"{self.phase} ({self.detail})" if self.detail else self.phase
        if self.fraction is None:
            return head
        filled = min(width, round(self.fraction * width))
        eta = f" ETA {duration_text(self.eta_s)}" if self.eta_s is not None else ""
        return f"{head} [{'#' * filled}{'.' * (width - filled)}] {self.fraction * 100:.0f}%{eta}"


def duration_text(seconds: float | None) -> str:
    """``45s``, ``3m07s``, ``2h05m``."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _positive(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


class Tracker:
    """Files a run's events (any thread, under the caller's lock) and says where the run is."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = options or {}
        self.phase: str = "starting"
        self.detail: str | None = None
        self.measure_t0: float | None = None  # event time when measuring began
        self.steady_steps = 0
        self.finished_requests = 0
        self._steps_seen: set[Any] = set()

    def __call__(self, ev: dict[str, Any]) -> None:
        kind, t = ev.get("type"), ev.get("t")
        if kind == "meta" and isinstance(ev.get("options"), dict) and not self.options:
            self.options = ev["options"]
        if kind == "phase" and isinstance(ev.get("phase"), str):
            self.phase = ev["phase"]
            k, n = ev.get("k"), ev.get("n")
            detail = ev.get("detail") if isinstance(ev.get("detail"), str) else None
            if isinstance(k, int) and isinstance(n, int) and n > 0:
                detail = f"{detail + ' ' if detail else ''}{k} of {n}"
            self.detail = detail
            if self.phase == "measuring" and self.measure_t0 is None and isinstance(t, (int, float)):
                self.measure_t0 = float(t)
        elif kind == "step":
            if ev.get("step") in self._steps_seen:  # another rank of a step already counted
                return
            self._steps_seen.add(ev.get("step"))
            steady = not ev.get("warmup") and not ev.get("first")
            if self.phase in ("starting", "building", "loading", "compiling", "warm-up"):
                self.phase, self.detail = ("measuring", None) if steady else ("warm-up", None)
            if steady:
                self.steady_steps += 1
                if self.measure_t0 is None and isinstance(t, (int, float)):
                    ms = ev.get("step_ms")
                    self.measure_t0 = float(t) - (ms / 1000.0 if isinstance(ms, (int, float)) else 0.0)
        elif kind == "request" and ev.get("finished") is True:
            self.finished_requests += 1

    def progress(self, now: float | None) -> Progress:
        """The phase and, when the run is bounded and measuring, the fraction done and the ETA; ``now`` in
        the events' clock (UNIX seconds)."""
        fraction = None
        if self.phase in ("measuring", "draining"):
            opts = self.options
            steps, duration, requests = (_positive(opts.get("steps")), _positive(opts.get("duration")),
                                         _positive(opts.get("num_requests")))
            if requests:
                fraction = self.finished_requests / requests
            elif duration and self.measure_t0 is not None and now is not None:
                fraction = (now - self.measure_t0) / duration
            elif steps:
                fraction = self.steady_steps / steps
        if fraction is None:
            return Progress(self.phase, self.detail)
        fraction = min(1.0, max(0.0, fraction))
        eta = None
        if self.measure_t0 is not None and now is not None and fraction > 0:
            elapsed = now - self.measure_t0
            eta = max(0.0, elapsed * (1 - fraction) / fraction)
        return Progress(self.phase, self.detail, fraction, eta)
