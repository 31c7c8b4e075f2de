"""Expert-balance figures from hard token counts (design.md, "Metric definitions"); numpy, no torch.

For one MoE layer, ``c`` is the number of token-expert assignments each of the E experts received
after top-k over a window of steps (before any capacity drop), μ its mean:

- CV = σ/μ (population σ); MaxVio = (max c − μ)/μ; max/mean = max c / μ;
- Gini = Σ_i Σ_j |c_i − c_j| / (2 · E² · μ) (0: equal loads; (E − 1)/E: one expert takes all);
- normalised load entropy = −Σ p_i ln p_i / ln E with p_i = c_i / Σ c (1: equal loads);
- dead experts = how many have c_i = 0; dropped fraction = dropped assignments / Σ c.

A figure that is undefined (no assignments, or E = 1 for entropy) is None.
Across layers, each figure is aggregated as the mean and the max of the defined per-layer values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

#: The per-layer figures computed from counts, in the order they appear in an ``experts`` event.
COUNT_FIGURES: tuple[str, ...] = ("cv", "max_vio", "max_mean", "gini", "entropy", "dead", "dropped_frac")


def _arr(counts: Sequence[float]) -> np.ndarray:
    return np.asarray(counts, dtype=np.float64)


def cv(counts: Sequence[float]) -> float | None:
    c = _arr(counts)
    mu = c.mean() if c.size else 0.0
    return float(c.std() / mu) if mu > 0 else None


def max_vio(counts: Sequence[float]) -> float | None:
    c = _arr(counts)
    mu = c.mean() if c.size else 0.0
    return float((c.max() - mu) / mu) if mu > 0 else None


def max_over_mean(counts: Sequence[float]) -> float | None:
    c = _arr(counts)
    mu = c.mean() if c.size else 0.0
    return float(c.max() / mu) if mu > 0 else None


def gini(counts: Sequence[float]) -> float | None:
    """Σ_i Σ_j |c_i − c_j| / (2 E² μ), through the sorted form Σ_i (2i − E + 1) c_(i) (i from 0)."""
    c = np.sort(_arr(counts))
    e = c.size
    mu = c.mean() if e else 0.0
    if mu <= 0:
        return None
    pair_sum = 2.0 * float(np.dot(2 * np.arange(e) - e + 1, c))
    return pair_sum / (2.0 * e * e * mu)


def load_entropy(counts: Sequence[float]) -> float | None:
    c = _arr(counts)
    total = c.sum()
    if total <= 0 or c.size < 2:
        return None
    p = c[c > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(c.size))


def dead(counts: Sequence[float]) -> int:
    return int((_arr(counts) == 0).sum())


def dropped_fraction(dropped: float, counts: Sequence[float]) -> float | None:
    total = float(_arr(counts).sum())
    return float(dropped) / total if total > 0 else None


def layer_figures(counts: Sequence[float], dropped: float = 0.0) -> dict[str, float | int | None]:
    """Every count-based figure of one layer."""
    return {
        "cv": cv(counts),
        "max_vio": max_vio(counts),
        "max_mean": max_over_mean(counts),
        "gini": gini(counts),
        "entropy": load_entropy(counts),
        "dead": dead(counts),
        "dropped_frac": dropped_fraction(dropped, counts),
    }


def aggregate(values: Sequence[float | int | None]) -> tuple[float | None, float | None]:
    """Mean and max over layers of the defined values (None, None when none is)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    return (sum(xs) / len(xs), max(xs)) if xs else (None, None)


def window_figures(
    counts: Sequence[Sequence[float]],
    dropped: Sequence[float] | None = None,
    extra: dict[str, Sequence[float | None]] | None = None,
) -> dict[str, Any]:
    """Per-layer lists of every figure, plus ``mean`` and ``max`` dicts across layers.

    ``counts``: one count vector per layer; ``dropped``: dropped assignments per layer; ``extra``:
    per-layer figures computed elsewhere (router entropy, balance loss) to list and aggregate too.
    """
    dropped = dropped if dropped is not None else [0.0] * len(counts)
    per = [layer_figures(c, d) for c, d in zip(counts, dropped, strict=True)]
    out: dict[str, Any] = {name: [p[name] for p in per] for name in COUNT_FIGURES}
    for name, values in (extra or {}).items():
        out[name] = list(values)
    names = [*COUNT_FIGURES, *(extra or {})]
    out["mean"], out["max"] = {}, {}
    for name in names:
        out["mean"][name], out["max"][name] = aggregate(out[name])
    return out
