"""Expert-balance figures (tuner.balance) against hand values and direct recomputation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuner import balance

counts_st = st.lists(st.integers(0, 10_000), min_size=1, max_size=64)


def test_equal_loads():
    f = balance.layer_figures([5, 5, 5, 5])
    assert f == {"cv": 0.0, "max_vio": 0.0, "max_mean": 1.0, "gini": 0.0, "entropy": pytest.approx(1.0), "dead": 0,
                 "dropped_frac": 0.0}


def test_one_expert_takes_everything():
    f = balance.layer_figures([0, 0, 12, 0], dropped=3)
    assert f["gini"] == pytest.approx(3 / 4)  # (E - 1) / E
    assert f["max_vio"] == pytest.approx(3.0) and f["max_mean"] == pytest.approx(4.0)
    assert f["cv"] == pytest.approx(math.sqrt(3)) and f["entropy"] == 0.0
    assert f["dead"] == 3 and f["dropped_frac"] == pytest.approx(3 / 12)


def test_no_tokens_is_undefined_not_zero():
    f = balance.layer_figures([0, 0, 0])
    assert f["cv"] is f["gini"] is f["entropy"] is f["max_vio"] is f["dropped_frac"] is None
    assert f["dead"] == 3
    assert balance.load_entropy([7]) is None  # ln 1 = 0


@settings(max_examples=200, deadline=None)
@given(counts_st)
def test_figures_match_the_definitions(c):
    x = np.array(c, dtype=float)
    mu = x.mean()
    if mu == 0:
        assert balance.gini(c) is None
        return
    e = len(c)
    pairs = sum(abs(a - b) for a in c for b in c)
    assert balance.gini(c) == pytest.approx(pairs / (2 * e * e * mu), abs=1e-12)
    assert balance.cv(c) == pytest.approx(math.sqrt(sum((v - mu) ** 2 for v in c) / e) / mu)
    assert balance.max_vio(c) == pytest.approx((max(c) - mu) / mu)
    assert 0.0 <= balance.gini(c) <= (e - 1) / e + 1e-12
    if e > 1:
        p = [v / sum(c) for v in c if v]
        assert balance.load_entropy(c) == pytest.approx(-sum(q * math.log(q) for q in p) / math.log(e), abs=1e-12)


def test_window_figures_aggregate_across_layers():
    figs = balance.window_figures([[1, 1], [3, 1], [0, 0]], [0, 2, 0], {"router_entropy": [0.5, 0.7, None]})
    assert figs["gini"] == [0.0, pytest.approx(0.25), None]
    assert figs["mean"]["gini"] == pytest.approx(0.125) and figs["max"]["gini"] == pytest.approx(0.25)
    assert figs["dead"] == [0, 0, 2] and figs["max"]["dead"] == 2
    assert figs["dropped_frac"][1] == pytest.approx(0.5)
    assert figs["mean"]["router_entropy"] == pytest.approx(0.6) and figs["max"]["router_entropy"] == 0.7
    assert set(figs["mean"]) == {*balance.COUNT_FIGURES, "router_entropy"}
