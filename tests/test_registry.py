"""The metric registry: the console computes the serving and expert-balance blocks from raw events, checked
against independent computations, and every registry metric reaches show, compare and export (issue 15)."""

import numpy as np
import pytest
from support import ONE_THREAD, btune

from tuner.export import rows
from tuner.metrics import REGISTRY, applies
from tuner.record import RecordBuilder
from tuner.report import compare, show


def serve_record(n: int = 30, seed: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    b = RecordBuilder("srv", 0.0, {"workload": "serve", "options": {"slo_ttft_ms": 50.0, "slo_tpot_ms": 12.0}}, {})
    for rid in range(n):
        arrival = rid * 0.1
        first = arrival + float(rng.uniform(0.01, 0.08))
        toks = [float(x) for x in first + np.cumsum(np.r_[0, rng.uniform(0.005, 0.015, 7)])]
        finished = rid < n - 2
        b.add({"v": 1, "type": "request", "t": 1.0 + rid, "rank": 0, "rid": rid, "replica": 0, "finished": finished,
               "prompt_len": 16, "output_len": 8, "output_tokens": 8 if finished else 3, "arrival_s": arrival,
               "first_token_s": first, "finish_s": toks[-1] if finished else None,
               "token_s": toks if finished else toks[:3], "ttft_ms": (first - arrival) * 1000,
               "tpot_ms": (toks[-1] - first) / 7 * 1000 if finished else None,
               "e2e_ms": (toks[-1] - arrival) * 1000 if finished else None})
    b.add({"v": 1, "type": "summary", "t": 40.0, "rank": 0, "load_duration_s": 4.0})
    return b.finish("ok", 0, 40.0)


def test_the_serving_block_against_an_independent_computation():
    rec = serve_record()
    s = rec["summary"]["serving"]
    reqs = [e for e in rec["events"] if e["type"] == "request"]
    done = [r for r in reqs if r["finished"]]
    ttft = np.array([r["ttft_ms"] for r in done])
    itl = np.concatenate([np.diff(r["token_s"]) * 1000 for r in done])
    good = sum(r["ttft_ms"] <= 50 and r["tpot_ms"] <= 12 for r in done)
    assert s["requests"]["finished"] == 28 and s["requests"]["unfinished"] == 2
    assert s["ttft_ms"]["p50"] == pytest.approx(np.percentile(ttft, 50))
    assert s["ttft_ms"]["p99"] == pytest.approx(np.percentile(ttft, 99))
    assert s["itl_ms"]["mean"] == pytest.approx(itl.mean())
    assert s["output_tokens_per_s"] == pytest.approx(28 * 8 / 4.0)
    assert s["goodput"] == pytest.approx(good / 4.0)
    assert s["slo"] == {"ttft_ms": 50.0, "tpot_ms": 12.0}


def test_expert_balance_over_the_run_against_numpy():
    b = RecordBuilder("moe", 0.0, {"workload": "moe", "options": {}}, {})
    windows = [[[10, 0, 5, 5], [4, 4, 4, 8]], [[6, 0, 5, 9], [4, 4, 4, 4]]]
    for i, counts in enumerate(windows):
        b.add({"v": 1, "type": "experts", "t": 1.0 + i, "rank": 0, "step": i, "counts": counts, "dropped": [1, 0],
               "tokens": 10, "router_entropy": [0.5, 0.9]})
    s = b.finish("ok", 0, 3.0)["summary"]["experts"]
    total = np.array(windows[0]) + np.array(windows[1])

    def gini(c: np.ndarray) -> float:
        return np.abs(c[:, None] - c[None, :]).sum() / (2 * len(c) ** 2 * c.mean())

    assert s["windows"] == 2 and s["layers"] == 2
    assert s["mean"]["gini"] == pytest.approx(np.mean([gini(c) for c in total]))
    assert s["max"]["gini"] == pytest.approx(max(gini(c) for c in total))
    assert s["max"]["dead"] == 1  # layer 0's second expert never got a token
    assert s["mean"]["router_entropy"] == pytest.approx(0.7)


def full_summary() -> dict:
    """A summary where every registry path holds a number."""
    s: dict = {}
    for m in REGISTRY:
        node = s
        for key in m.path[:-1]:
            node = node.setdefault(key, {})
        node[m.path[-1]] = {"n": 3, "mean": 2.0, "p50": 2.0, "p90": 2.5, "p95": 2.6, "p99": 2.9, "stdev": 0.1,
                            "cv": 0.05, "min": 1.0, "max": 3.0} if m.described else 1.5
    return s


@pytest.mark.parametrize("workload", ["dense", "moe", "serve"])
def test_every_registry_metric_reaches_show_compare_and_export(workload):
    rec = RecordBuilder("r", 0.0, {"workload": workload, "options": {}}, {}).finish("ok", 0, 1.0)
    rec["summary"] = full_summary()
    shown, compared = show(rec), compare([rec, rec])
    exported = {r["metric"] for r in rows(rec)}
    for m in REGISTRY:
        if not applies(m, workload):
            assert m.name not in exported
            continue
        assert m.name in exported
        if m.shown:
            assert m.label in shown and m.label in compared, m.label


@pytest.mark.slow
def test_btune_run_serve_prints_the_serving_block(tmp_path):
    res = btune("run", "serve", "--preset", "tiny", "--duration", "3", "--request-rate", "4", "--device", "cpu",
                "--no-telemetry", "--out", str(tmp_path), env=ONE_THREAD, timeout=600)
    assert res.returncode == 0, res.stderr
    for label in ("requests finished", "request throughput", "output tokens/s", "goodput", "TTFT p50", "TPOT p99",
                  "ITL p90", "E2E latency p50", "engine steps (the engine's own steps, not requests)"):
        assert label in res.stdout, label


def test_compare_of_two_serve_runs_shows_latency_and_goodput_deltas_and_csv_has_them():
    from tuner.export import to_csv

    a, b = serve_record(seed=3), serve_record(seed=4)
    b["id"] = "srv2"
    text = compare([a, b])
    for label in ("TTFT p50", "TPOT p50", "ITL p90", "goodput (requests within the SLOs)"):
        line = next(ln for ln in text.splitlines() if ln.startswith(label))
        assert "%)" in line, line  # the second run's relative delta
    ttft = (b["summary"]["serving"]["ttft_ms"]["p50"] / a["summary"]["serving"]["ttft_ms"]["p50"] - 1) * 100
    assert f"({ttft:+.1f}%)" in next(ln for ln in text.splitlines() if ln.startswith("TTFT p50"))
    csv = to_csv([a, b])
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "goodput", "request_throughput"):
        assert f",{metric}," in csv, metric


def test_one_throughput_figure_everywhere():
    """Steady tokens over steady time is the only tokens/s a dense run shows; the mean of per-step rates
    (which weights short steps up) is kept in the record but shown nowhere."""
    b = RecordBuilder("d", 0.0, {"workload": "dense", "options": {}}, {})
    b.add({"v": 1, "type": "meta", "t": 0.5, "rank": 0, "workload": "dense", "n_devices": 2})
    for i, (ms, tokens) in enumerate([(500.0, 100), (10.0, 100), (30.0, 100), (10.0, 100)]):
        b.add({"v": 1, "type": "step", "t": 1.0 + i, "rank": 0, "step": i, "step_ms": ms, "tokens": tokens,
               "warmup": False, "first": i == 0})
    rec = b.finish("ok", 0, 5.0)
    s = rec["summary"]
    assert s["throughput_tokens_per_s"] == pytest.approx(300 / 0.050)
    assert s["tokens_per_s"]["mean"] != pytest.approx(s["throughput_tokens_per_s"])  # the two would disagree
    assert s["throughput_per_gpu"] == pytest.approx(300 / 0.050 / 2)
    for text in (show(rec), compare([rec, rec])):
        rates = [ln for ln in text.splitlines() if "tok/s" in ln or "tokens/s" in ln]
        assert [ln.split("  ")[0].split(" [")[0] for ln in rates] == ["throughput (steady tokens / steady time)",
                                                                        "throughput per GPU"], rates


def test_the_serving_headline_shows_mbu_not_mfu():
    rec = serve_record()
    rec["summary"]["mbu"] = {"value": 0.41, "achieved_tb_s": 1.968, "peak_tb_s": 4.8, "reason": None}
    rec["summary"]["mfu"] = {"bf16": {"value": 0.02, "peak_tflops": 989.0, "reason": None}}
    text = show(rec)
    assert "MBU (HBM peak)" in text and "41.0%" in text and "MFU" not in text
