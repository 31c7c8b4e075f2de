"""Request rates: ``--request-rate``'s comma list, and ``--find-max-rate``'s search (double until a rate fails
the SLOs, then bisect between the last pass and the first fail). Torch-free, standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

#: --max-rate-steps' default: loads in all, doubling and bisecting together.
MAX_RATE_STEPS = 6


def parse_rates(text: str) -> list[float]:
    """``"1,2,4"`` or ``"inf"`` -> rates in requests/s, in the order given; ValueError (one line) on a value that
    is not a number > 0 (``inf``: all at once)."""
    out: list[float] = []
    for part in str(text).split(","):
        item = part.strip()
        try:
            rate = float(item)
        except ValueError:
            raise ValueError(f"--request-rate: {item!r} is not a number; expected rates in requests/s > 0, "
                             "comma-separated (inf: all at once)") from None
        if math.isnan(rate) or rate <= 0:
            raise ValueError(f"--request-rate: {item!r} is out of range: a request rate must be > 0 "
                             "(inf: all at once)")
        out.append(rate)
    return out


def rate_text(rate: float | None) -> str:
    """A rate as the CLI takes it: ``2``, ``0.5``, ``inf`` (None: all at once, as a record stores inf)."""
    if rate is None or math.isinf(rate):
        return "inf"
    return f"{rate:g}"


class RateSearch:
    """--find-max-rate: probe ``start``, double while a probe passes, then bisect between the last passing rate
    (0 when none has) and the first failing one; at most ``steps`` probes. ``best`` is the highest passing rate."""

    def __init__(self, start: float, steps: int = MAX_RATE_STEPS) -> None:
        if not (start > 0 and math.isfinite(start)):
            raise ValueError(f"--find-max-rate starts at a finite rate > 0, not {start:g}")
        self.steps = steps
        self.probes: list[tuple[float, bool]] = []
        self.best: float | None = None
        self._fail: float | None = None
        self._next: float | None = start if steps > 0 else None

    def next(self) -> float | None:
        """The next rate to probe; None when the search is over."""
        return self._next

    def report(self, rate: float, passed: bool) -> None:
        """The outcome of probing ``rate`` (the rate ``next()`` gave)."""
        self.probes.append((rate, passed))
        if passed:
            self.best = rate if self.best is None else max(self.best, rate)
        else:
            self._fail = rate if self._fail is None else min(self._fail, rate)
        if len(self.probes) >= self.steps:
            self._next = None
        elif self._fail is None:
            self._next = rate * 2
        else:
            mid = ((self.best or 0.0) + self._fail) / 2
            self._next = None if mid in (self.best, self._fail) else mid


def search(start: float, steps: int, passed: Callable[[float], bool]) -> RateSearch:
    """Run a whole search with ``passed(rate)`` deciding each probe (the workload probes with real loads)."""
    s = RateSearch(start, steps)
    while (rate := s.next()) is not None:
        s.report(rate, passed(rate))
    return s
