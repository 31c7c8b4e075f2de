"""The MoE workload end to end on CPU: a real tiny run through `btune run`, and `workloads.moe.main(argv)` (what
`python -m workloads.moe` runs) in this process."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from support import ONE_THREAD, btune, record_of

from tuner import balance
from tuner.launch import LaunchError, build_config
from workloads import moe
from workloads.models.moe_config import MOE_PRESETS
from workloads.models.moe_flops import moe_flops_per_token

SMALL = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "32", "--warmup", "1"]


def workload(capsys: pytest.CaptureFixture, *args: str) -> list[dict]:
    """The events of ``python -m workloads.moe ARGS``, run in this process (``main(argv)``, events on stdout)."""
    capsys.readouterr()
    assert moe.main(list(args)) == 0
    out = capsys.readouterr().out
    return [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory) -> dict:
    """One real tiny MoE run with zipf data, capacity dropping and aux-free balancing."""
    out = tmp_path_factory.mktemp("runs")
    return record_of(btune("run", "moe", *SMALL, "--steps", "9", "--data", "zipf", "--capacity-factor", "1.0",
                           "--balance", "both", "--balance-window", "3", "--out", str(out), env=ONE_THREAD))


def _recompute(counts: list[int], dropped: int) -> dict[str, float | None]:
    """The design.md formulas, written out again with numpy (independent of tuner.balance)."""
    c = np.array(counts, dtype=np.float64)
    e, mu = len(c), c.mean()
    p = c / c.sum()
    nz = p[p > 0]
    return {
        "cv": c.std() / mu,
        "max_vio": (c.max() - mu) / mu,
        "max_mean": c.max() / mu,
        "gini": np.abs(c[:, None] - c[None, :]).sum() / (2 * e * e * mu),
        "entropy": float(-(nz * np.log(nz)).sum() / np.log(e)),
        "dead": int((c == 0).sum()),
        "dropped_frac": dropped / c.sum(),
    }


@pytest.mark.slow
def test_every_balance_figure_matches_a_recomputation_from_the_recorded_counts(moe_run):
    assert moe_run["status"] == "ok"
    meta = next(e for e in moe_run["events"] if e["type"] == "meta")
    cfg = MOE_PRESETS["tiny"]
    experts = [e for e in moe_run["events"] if e["type"] == "experts"]
    assert [e["window"] for e in experts] == [[0, 2], [3, 5], [6, 8], [9, 9]]  # 10 steps, window 3, last partial
    tokens_per_step = 2 * 32
    for ev in experts:
        assert ev["layer_ids"] == list(cfg.moe_layer_ids) and ev["capacity"] == meta["plan"]["capacity_per_expert"]
        assert not {"cv", "gini", "mean", "max"} & ev.keys(), "the workload sends raw sums; the console computes"
        figs = balance.window_figures(ev["counts"], ev["dropped"],
                                      {"router_entropy": ev["router_entropy"], "aux_loss": ev["aux_loss"]})
        per_layer = {name: [] for name in ("cv", "max_vio", "max_mean", "gini", "entropy", "dead", "dropped_frac")}
        for li, (counts, dropped) in enumerate(zip(ev["counts"], ev["dropped"], strict=True)):
            assert len(counts) == cfg.n_experts and sum(counts) == ev["steps"] * tokens_per_step * cfg.top_k
            for name, value in _recompute(counts, dropped).items():
                assert figs[name][li] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, ev["window"])
                per_layer[name].append(value)
            assert 0 < ev["router_entropy"][li] <= 1 and ev["aux_loss"][li] > 0
        for name, values in per_layer.items():
            assert figs["mean"][name] == pytest.approx(sum(values) / len(values), rel=1e-9, abs=1e-12)
            assert figs["max"][name] == pytest.approx(max(values), rel=1e-9, abs=1e-12)
    # the run's block: every window's counts summed per layer, then the same formulas
    total = [np.sum([ev["counts"][li] for ev in experts], axis=0) for li in range(len(experts[0]["counts"]))]
    dropped = [sum(ev["dropped"][li] for ev in experts) for li in range(len(total))]
    block = moe_run["summary"]["experts"]
    assert block["windows"] == 4
    for name in ("cv", "max_vio", "gini", "entropy", "dead", "dropped_frac"):
        values = [_recompute(list(c), d)[name] for c, d in zip(total, dropped, strict=True)]
        assert block["mean"][name] == pytest.approx(sum(values) / len(values), rel=1e-9, abs=1e-12), name
        assert block["max"][name] == pytest.approx(max(values), rel=1e-9, abs=1e-12), name
    assert any(d > 0 for ev in experts for d in ev["dropped"])  # capacity 1.0 on zipf data drops some


@pytest.mark.slow
def test_step_events_and_active_flops(moe_run):
    meta = next(e for e in moe_run["events"] if e["type"] == "meta")
    cfg = MOE_PRESETS["tiny"]
    assert meta["workload"] == "moe" and meta["flops_per_token"] == moe_flops_per_token(cfg, 32, "train")
    assert meta["params"]["matmul_active"] < meta["params"]["matmul"]
    assert meta["backends"]["experts"]["impl"] == "grouped" and meta["backends"]["experts"]["gemm"] == "bmm"
    assert meta["backends"]["balance"] == "both"
    s = moe_run["summary"]
    assert s["steps"] == {"total": 10, "warmup": 1, "steady": 9} and s["tokens_per_s"]["mean"] > 0
    assert s["mfu"]["bf16"]["value"] is None and math.isfinite(s["loss_last"])
    assert s["workload"]["experts_events"] == 4 and s["workload"]["balance_last"]["window"] == [9, 9]
    assert s["experts"]["experts"] == cfg.n_experts and s["experts"]["mean"]["router_entropy"] > 0


@pytest.mark.slow
def test_loop_and_grouped_give_the_same_losses_and_counts(capsys):
    args = [*SMALL, "--steps", "5", "--dtype", "fp32", "--data", "zipf", "--balance", "both", "--balance-window",
            "3"]
    runs = [workload(capsys, *args, "--expert-impl", impl) for impl in ("loop", "grouped")]
    losses = [[e["loss"] for e in evs if e["type"] == "step"] for evs in runs]
    assert len(losses[0]) == 6
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    counts = [[e["counts"] for e in evs if e["type"] == "experts"] for evs in runs]
    assert counts[0] == counts[1] and counts[0]
    impls = [next(e for e in evs if e["type"] == "meta")["backends"]["experts"]["impl"] for evs in runs]
    assert impls == ["loop", "grouped"]


@pytest.mark.slow
def test_balance_metrics_off_emits_no_experts_events(capsys):
    evs = workload(capsys, *SMALL, "--steps", "2", "--balance-metrics", "off", "--mode", "prefill")
    assert not [e for e in evs if e["type"] == "experts"] and len([e for e in evs if e["type"] == "step"]) == 3


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--num-experts", "4", "--top-k", "6"], "--top-k 6 exceeds the number of routed experts (4)"),
        (["--capacity-factor", "0"], "--capacity-factor 0: a capacity factor must be > 0"),
        (["--num-moe-layers", "5"], "--num-moe-layers 5 exceeds the model's 3 layers"),
        (["--mode", "prefill", "--balance", "aux-free"], "balancing acts through training"),
        (["--capacity-factor", "-1"], "--capacity-factor: '-1' is out of range"),
        (["--balance", "none", "--bias-update-rate", "0.1"], "--bias-update-rate is only valid with --balance"),
    ],
)
def test_bad_moe_options_are_refused_before_launch(args, words):
    with pytest.raises((LaunchError, ValueError), match=words.replace("(", r"\(").replace(")", r"\)")):
        build_config("moe", ["--preset", "tiny", *args])


@pytest.mark.slow
def test_btune_run_refuses_with_one_line_and_exit_2(tmp_path):
    res = btune("run", "moe", "--preset", "mixtral-8x7b", "--top-k", "9", "--out", str(tmp_path), env=ONE_THREAD)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "--top-k 9 exceeds the number of routed experts (8)" in lines[0]
    assert not list(tmp_path.iterdir())


def test_dry_run_of_truncated_moe_64e_top6(capsys):
    assert moe.main(["--preset", "moe-64e-top6", "--layers", "2", "--seq-len", "4096", "--dry-run"]) == 0
    plan = orjson.loads(capsys.readouterr().out)
    assert plan["moe_layer_ids"] == [1] and plan["model"]["n_experts"] == 64
    assert plan["balance"] == {"mode": "aux-free", "aux_loss_coef": None, "bias_update_rate": 1e-3,
                               "metrics": "on", "window": 10}
    assert plan["params"]["active"] < plan["params"]["total"] and plan["flops_per_token"] > 0
