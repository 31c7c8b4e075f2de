"""Regression detection: two rules a user can trust on noisy shared machines, and missing-data alerts.

Baseline rule: this round's runs against a pinned round's (one value per run), tuner.stats.run_level (Welch's
t-test across runs plus a minimum effect, the metric's tolerance), and only in the bad direction.

Change-point rule: the per-round means of a figure over the history, segmented by ruptures (Pelt, "l2" cost, a
BIC-like penalty from the series' own noise), each candidate change checked as Hunter/Otava check theirs after
E-divisive: Welch's t-test between the segments either side (tuner.stats.run_level, scipy's
``ttest_ind(equal_var=False)``) and the tolerance; a regression only when the change is in the bad direction
and persists (at least two rounds after it, up to the latest).

Why ruptures: Apache Otava pins numpy==2.2.0 and scipy<1.17 and pulls google-cloud-bigquery, slack-sdk and
pg8000; MongoDB's signal-processing-algorithms supports only Python 3.11 with numpy<2. Either would downgrade
or break this project's stack (numpy 2.4, scipy 1.17, torch 2.13); ruptures is small and keeps it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tuner.stats import finite, run_level

ALPHA = 0.05
PERSIST = 2  #: rounds after a change before it is reported


@dataclass(frozen=True)
class Finding:
    """One verdict on one figure of one job."""

    job: str
    metric: str
    rule: str  #: "baseline", "change-point", "missing" or "failed"
    regression: bool
    message: str
    delta: float | None = None
    p: float | None = None
    baseline: int | None = None  #: the round compared against (baseline), or where the change began

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def bad(delta: float | None, higher_is_better: bool) -> bool:
    """Whether a relative change goes the wrong way."""
    return delta is not None and (delta < 0 if higher_is_better else delta > 0)


def baseline_rule(job: str, metric: str, base: Sequence[float], now: Sequence[float], tolerance: float,
                  higher_is_better: bool, base_round: int, alpha: float = ALPHA) -> Finding:
    """This round's runs against the baseline round's: a regression only when significant across runs, at
    least ``tolerance`` large and in the bad direction."""
    test = run_level(base, now, alpha=alpha, min_effect=tolerance)
    delta, p = test["delta"], test["p"]
    regression = bool(test["real"]) and bad(delta, higher_is_better)
    if test["real"] is None:
        why = f"too few runs to test ({test['n'][0]} vs {test['n'][1]}; repeats >= 2 needed)"
    else:
        verdict = "REGRESSION" if regression else ("improved" if test["real"] else "no significant change")
        why = f"{verdict}: {delta:+.1%} (p={p:.3g}, tolerance {tolerance:.0%})"
    return Finding(job, metric, "baseline", regression, f"against round {base_round}: {why}", delta, p, base_round)


def round_means(by_round: dict[int, Sequence[float]]) -> tuple[list[int], list[float]]:
    """A figure's series over the history: the rounds in order and each round's mean over its runs."""
    ids = sorted(i for i, values in by_round.items() if values)
    return ids, [math.fsum(by_round[i]) / len(by_round[i]) for i in ids]


def _penalty(xs: list[float]) -> float:
    """A BIC-like penalty, 2 sigma^2 log n, with sigma from the median absolute successive difference
    (robust to the steps it is looking for)."""
    diffs = sorted(abs(b - a) for a, b in itertools.pairwise(xs))
    mad = diffs[len(diffs) // 2] if diffs else 0.0
    sigma = 1.4826 * mad / math.sqrt(2)
    scale = max(abs(x) for x in xs) or 1.0
    sigma = max(sigma, 1e-6 * scale)
    return 2 * sigma**2 * math.log(len(xs))


def change_points(series: Sequence[float], min_size: int = 2) -> list[int]:
    """Indexes where a new segment begins (ruptures Pelt, "l2" cost)."""
    xs = finite(series)
    if len(xs) < 2 * min_size:
        return []
    import numpy as np
    import ruptures

    signal = np.asarray(xs, dtype=float).reshape(-1, 1)
    ends = ruptures.Pelt(model="l2", min_size=min_size, jump=1).fit(signal).predict(pen=_penalty(xs))
    return [e for e in ends if e < len(xs)]


def change_rule(job: str, metric: str, rounds: Sequence[int], series: Sequence[float], tolerance: float,
                higher_is_better: bool, alpha: float = ALPHA) -> list[Finding]:
    """Every significant change of a figure's per-round series; the latest one, in the bad direction and
    lasting at least ``PERSIST`` rounds up to now, is a regression."""
    xs = list(series)
    cuts = change_points(xs)
    out: list[Finding] = []
    bounds = [0, *cuts, len(xs)]
    for i, cut in enumerate(cuts, 1):
        before, after = xs[bounds[i - 1]:cut], xs[cut:bounds[i + 1]]
        test = run_level(before, after, alpha=alpha, min_effect=tolerance)
        if not test["real"]:
            continue
        delta = test["delta"]
        latest = bounds[i + 1] == len(xs)
        regression = latest and len(after) >= PERSIST and bad(delta, higher_is_better)
        kind = "REGRESSION" if regression else ("worse" if bad(delta, higher_is_better) else "better")
        out.append(Finding(job, metric, "change-point", regression,
                           f"{kind}: change at round {rounds[cut]} ({delta:+.1%}, p={test['p']:.3g}, "
                           f"{len(after)} rounds after)", delta, test["p"], rounds[cut]))
    return out


def missing(job: str, metric: str, base_round: int) -> Finding:
    """A figure the baseline round had and this round has not."""
    return Finding(job, metric, "missing", True, f"MISSING: a value in round {base_round}, none now",
                   baseline=base_round)
