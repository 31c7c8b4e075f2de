"""MBU (design.md): the peak-bandwidth table, the bytes a step must move, and the summary's figure against
a recomputation written out here; the engine's attended positions per step."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tuner import hardware
from tuner.summary import summarize
from workloads.engine.loadgen import RequestSpec
from workloads.engine.request import Request
from workloads.engine.scheduler import Scheduler
from workloads.models.config import PRESETS
from workloads.models.flops import bytes_moved
from workloads.models.kv_cache import KVCache
from workloads.models.transformer import Transformer


def test_peak_bandwidth_table_is_keyed_by_exact_name():
    assert hardware.peak_bandwidth("NVIDIA H200") == (4.8, None)
    assert hardware.peak_bandwidth("NVIDIA H100 80GB HBM3") == (3.35, None)
    assert hardware.peak_bandwidth("NVIDIA H100 PCIe") == (2.0, None)
    assert hardware.peak_bandwidth("NVIDIA B200") == (8.0, None)
    assert hardware.peak_bandwidth("NVIDIA A100-SXM4-80GB") == (2.039, None)
    assert hardware.peak_bandwidth("NVIDIA A100-SXM4-40GB") == (1.555, None)
    assert hardware.peak_bandwidth("NVIDIA L40S") == (0.864, None)
    for name in ("NVIDIA H200 (fake)", "h200", None, "cpu"):
        peak, reason = hardware.peak_bandwidth(name)
        assert peak is None and reason
    assert hardware.mbu(2.4e12, "NVIDIA H200")["value"] == pytest.approx(0.5)
    assert hardware.mbu(2.4e12, "NVIDIA H200", n_devices=2)["value"] == pytest.approx(0.25)
    unknown = hardware.mbu(2.4e12, "Some GPU")
    assert unknown["value"] is None and unknown["achieved_tb_s"] == pytest.approx(2.4)
    assert "unknown" in unknown["reason"]


@pytest.mark.parametrize(("name", "tied"), [("tiny", False), ("tiny-llama", False), ("tiny-llama", True)])
def test_weight_and_kv_bytes_match_the_real_model(name, tied):
    """Weights a forward reads: every parameter but the input embedding tables (only looked-up rows are
    read), the LM head counted even when tied; KV bytes per position from a real cache's tensors."""
    cfg = replace(PRESETS[name].with_layers(2), tie_embeddings=tied)
    model = Transformer(cfg).to(torch.bfloat16)
    tables = {"tok_embeddings.weight", "pos_embeddings.weight"}
    params = dict(model.named_parameters(remove_duplicate=False))
    read = sum(p.numel() * p.element_size() for n, p in params.items() if n not in tables)
    if cfg.tie_embeddings and "output.weight" not in params:
        read += model.output.weight.numel() * 2
    got = bytes_moved(cfg, 2)
    assert got["weight_bytes"] == read
    cache = KVCache(cfg, batch=1, max_len=8, dtype=torch.bfloat16)
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.k, layer.v))
    assert got["kv_bytes_per_token"] == total // 8


def _steps(rows: list[tuple[float, int, int]], t0: float = 100.0) -> dict:
    """A step series: (step_ms, kv_tokens, weight_passes) per step; step 0 is the first (compile) step."""
    t, cols = t0, {"t": [], "step": [], "step_ms": [], "tokens": [], "kv_tokens": [], "weight_passes": [],
                   "first": [], "warmup": []}
    for i, (ms, kv, passes) in enumerate(rows):
        t += ms / 1000
        for k, v in (("t", t), ("step", i), ("step_ms", ms), ("tokens", 4), ("kv_tokens", kv),
                     ("weight_passes", passes), ("first", i == 0), ("warmup", False)):
            cols[k].append(v)
    return {"step": {"0": cols}}


def test_summary_mbu_is_bytes_of_steady_steps_over_their_time():
    w, per = 1_000_000_000, 131072
    rows = [(900.0, 10, 1), (2.0, 100, 1), (2.5, 104, 2), (3.0, 108, 1)]
    meta = {"type": "meta", "rank": 0, "device_name": "NVIDIA H200", "n_devices": 1, "weight_bytes": w,
            "kv_bytes_per_token": per}
    s = summarize(_steps(rows), [meta], 0.0, 1.0)
    steady = rows[1:]  # the first step (compile, allocator warm-up) never counts
    want = sum(p * w + kv * per for _, kv, p in steady) / (sum(ms for ms, _, _ in steady) / 1000)
    assert s["mbu"]["achieved_tb_s"] == pytest.approx(want / 1e12, rel=1e-12)
    assert s["mbu"]["value"] == pytest.approx(want / 4.8e12, rel=1e-12)
    # a fixed decode shape: the meta's positions per step stand in for the step field
    fixed = {**meta, "kv_tokens_per_step": 50}
    series = _steps(rows)
    del series["step"]["0"]["kv_tokens"], series["step"]["0"]["weight_passes"]
    s = summarize(series, [fixed], 0.0, 1.0)
    want = sum(w + 50 * per for _ in steady) / (sum(ms for ms, _, _ in steady) / 1000)
    assert s["mbu"]["achieved_tb_s"] == pytest.approx(want / 1e12, rel=1e-12)


def test_training_has_no_mbu_and_says_why():
    meta = {"type": "meta", "rank": 0, "device_name": "NVIDIA H200", "n_devices": 1}
    s = summarize(_steps([(5.0, 0, 1), (5.0, 0, 1)]), [meta], 0.0, 1.0)
    assert s["mbu"]["value"] is None and "decode and serving" in s["mbu"]["reason"]


def test_a_plan_counts_the_positions_its_attention_reads():
    sched = Scheduler(max_batch=4, max_prefill_tokens=8, cache_len=64)
    reqs = [Request(RequestSpec(rid=i, arrival=0.0, prompt_len=n, output_len=4), torch.zeros(n, dtype=torch.long))
            for i, n in enumerate((5, 12))]
    for r in reqs:
        sched.add(r)
    plan = sched.plan()  # request 0 whole (5), request 1's first 3 tokens
    assert [(r.rid, s, n) for r, s, n in plan.prefill] == [(0, 0, 5), (1, 0, 3)]
    assert plan.kv_tokens == 5 + 3 and plan.weight_passes == 2
    sched.commit(plan, [(reqs[0], 7)], 0.1)
    plan = sched.plan()  # request 0 decodes its token 1 at position 5; request 1 prefills 3..11 (8 tokens... 9 left)
    assert [r.rid for r in plan.decode] == [0] and [(r.rid, s, n) for r, s, n in plan.prefill] == [(1, 3, 8)]
    assert plan.kv_tokens == (5 + 1) + (3 + 8) and plan.weight_passes == 2
