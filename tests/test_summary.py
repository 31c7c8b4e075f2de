"""The summary on synthetic series: the figures the slow end-to-end tests check on real runs (a dense run, TP
ranks, data-parallel replicas), each recomputed here from the series by hand, in the quick tier."""

import pytest

from tuner.record import RecordBuilder
from tuner.stats import describe


def step(rank: int, i: int, ms: float, tokens: int, **kw) -> dict:
    return {"v": 1, "type": "step", "t": 100.0 + i, "rank": rank, "step": i, "step_ms": ms, "tokens": tokens, **kw}


def meta(rank: int = 0, **kw) -> dict:
    return {"v": 1, "type": "meta", "t": 99.5, "rank": rank, "workload": "dense", **kw}


def summary(events: list[dict]) -> dict:
    b = RecordBuilder("s", 99.0, {"workload": "dense"}, {})
    for e in events:
        b.add(e)
    return b.finish("ok", 0, 200.0)["summary"]


def test_one_rank_warmup_steady_statistics_throughput_and_loss():
    ms = [900.0, 120.0, 100.0, 110.0, 105.0, 95.0]  # two warm-up steps, then steady ones
    events = [meta(device_name="cpu", flops_per_token=1e6, n_devices=1)]
    events += [step(0, i, m, 256, warmup=i < 2, loss=5.0 - i * 0.5) for i, m in enumerate(ms)]
    s = summary(events)
    steady = ms[2:]
    assert s["steps"] == {"total": 6, "warmup": 2, "steady": 4}
    assert s["warmup_step_ms"] == ms[:2]
    assert s["step_ms"] == describe(steady)
    assert s["tokens_per_s"] == describe([256 / (m / 1000) for m in steady])
    assert s["throughput_tokens_per_s"] == pytest.approx(4 * 256 / (sum(steady) / 1000))
    assert s["tokens_total"] == 6 * 256  # every step's tokens; the rates use the steady ones
    assert (s["loss_first"], s["loss_last"]) == (5.0, 2.5)
    assert s["tflops"] == pytest.approx(1e6 * s["throughput_tokens_per_s"] / 1e12)
    assert s["mfu"]["bf16"]["value"] is None and "CPU" in s["mfu"]["bf16"]["reason"]


def test_mfu_is_achieved_flops_over_every_devices_peak():
    events = [meta(device_name="NVIDIA H100 80GB HBM3", flops_per_token=2e9, n_devices=2)]
    events += [step(0, i, 50.0, 4096, warmup=i == 0) for i in range(5)]
    s = summary(events)
    mfu = s["mfu"]["bf16"]
    assert mfu["peak_tflops"] > 0 and mfu["reason"] is None
    assert mfu["value"] == pytest.approx(2e9 * s["throughput_tokens_per_s"] / (2 * mfu["peak_tflops"] * 1e12))
    assert s["throughput_per_gpu"] == pytest.approx(s["throughput_tokens_per_s"] / 2)


def test_tensor_parallel_ranks_merge_by_step_slowest_time_tokens_once():
    rank0 = [100.0, 50.0, 70.0, 50.0]
    rank1 = [110.0, 60.0, 40.0, 55.0]
    events = [meta(0, n_devices=2, tp=2), meta(1, n_devices=2, tp=2)]
    for r, times in enumerate((rank0, rank1)):
        events += [step(r, i, m, 1024, warmup=i == 0) for i, m in enumerate(times)]
    s = summary(events)
    slowest = [max(a, b) for a, b in zip(rank0, rank1, strict=True)]
    assert s["steps"] == {"total": 4, "warmup": 1, "steady": 3}
    assert s["step_ms"] == describe(slowest[1:])
    assert s["tokens_total"] == 4 * 1024, "TP ranks share the step's tokens: counted once"
    assert s["throughput_tokens_per_s"] == pytest.approx(3 * 1024 / (sum(slowest[1:]) / 1000))


def test_data_parallel_replicas_add_their_rates():
    rank0 = [100.0, 20.0, 20.0, 20.0]
    rank1 = [100.0, 40.0, 40.0, 40.0, 40.0]  # the replicas run different numbers of steps
    events = [meta(0, n_devices=2, replicas=2), meta(1, n_devices=2, replicas=2)]
    for r, times in enumerate((rank0, rank1)):
        events += [step(r, i, m, 100, warmup=i == 0) for i, m in enumerate(times)]
    s = summary(events)
    assert s["steps"] == {"total": 9, "warmup": 2, "steady": 7}, "each replica's steps are rows of their own"
    assert s["tokens_total"] == 9 * 100, "replicas' tokens add"
    rates = [len(t[1:]) * 100 / (sum(t[1:]) / 1000) for t in (rank0, rank1)]
    assert s["throughput_tokens_per_s"] == pytest.approx(sum(rates))  # 5000 + 2500 tokens/s
