"""Serving FLOPs against FlopCounterMode around the engine's own prefill and decode work (CPU, tiny models).

What FlopCounterMode counts here: matmuls only (aten.mm and aten.addmm for the linear layers and the LM head,
aten.bmm for attention). The model runs with the ``math`` attention backend, so attention is plain bmm that the
counter sees (it does not know the CPU flash SDPA kernel): QK^T and PV over every key a query is given, with no
causal discount, as in the formula. Norms, softmax, RoPE, activations and the embedding lookup are in neither
number.

Like with like: a prefill chunk of n tokens at ``start`` computes attention over its ``start + n`` keys (the
formula's context), so prefill is compared as is. A CPU decode step computes scores over the whole cache row (the
cache's ``positions`` columns) and masks the ones past the token's context; the formula counts the attended context
(design.md: 4·L·d·context), so the test takes the masked columns' FLOPs (4·L·d·(positions - context) per step,
known exactly) off the counter's decode figure before comparing, and checks that the counter's decode attention is
exactly the whole-cache figure. The engine has one slot (decode bucket 1: no idle rows in a decode step), so
each step is one request's prefill chunk or its decode.
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from workloads.engine.engine import Engine
from workloads.engine.loadgen import RequestSpec, prompt_tokens
from workloads.engine.request import Request
from workloads.engine.scheduler import Scheduler
from workloads.models.attention import AttentionKernel
from workloads.models.config import PRESETS
from workloads.models.flops import param_counts, serve_flops
from workloads.models.transformer import Transformer
from workloads.options import validate
from workloads.serve import plan
from workloads.specs.serve import SERVE

BUDGET = 8  # max prefill tokens per step: a 12-token prompt runs as chunks 8 + 4, a 17-token one as 8 + 8 + 1
CACHE_LEN = 32
# (prompt, output) lengths: one chunk / several chunks; no decode step / several
REQUESTS = [(5, 1), (12, 5), (17, 9), (8, 3)]


def _ops(counter: FlopCounterMode) -> dict[str, int]:
    """FLOPs per aten op name over everything the counter saw."""
    return {str(op).removeprefix("aten.").split(".")[0]: n for op, n in counter.get_flop_counts()["Global"].items()}


@lru_cache
def engine_counts(name: str) -> tuple[dict[int, dict[str, dict[str, int]]], int]:
    """Per request: the counter's FLOPs by op for its prefill steps and its decode steps; and the cache's
    positions per row (the keys a CPU decode step computes scores over). Preset ``name``, run once."""
    cfg = PRESETS[name]
    torch.manual_seed(0)
    kernel = AttentionKernel("math")
    model = Transformer(cfg, kernel).eval()
    eng = Engine(model, kernel, 1, CACHE_LEN, torch.device("cpu"), torch.float32)
    assert eng.buckets == [1]
    sched = Scheduler(1, BUDGET, CACHE_LEN)
    for rid, (p, o) in enumerate(REQUESTS):
        spec = RequestSpec(rid=rid, arrival=0.0, prompt_len=p, output_len=o)
        sched.add(Request(spec, torch.from_numpy(prompt_tokens(0, rid, p, cfg.vocab_size))))
    counts: dict[int, dict[str, dict[str, int]]] = defaultdict(lambda: {"prefill": {}, "decode": {}})
    t = 0.0
    while not sched.idle:
        step = sched.plan()
        reqs = {r.rid for r in step.decode} | {r.rid for r, _, _ in step.prefill}
        assert len(reqs) == 1 and not (step.decode and step.prefill), "one slot: each step is one request's phase"
        with FlopCounterMode(display=False) as counter:
            out = eng.run(step)
        phase = counts[reqs.pop()]["decode" if step.decode else "prefill"]
        for op, n in _ops(counter).items():
            phase[op] = phase.get(op, 0) + n
        t += 1.0
        sched.commit(step, out, t)
    return dict(counts), eng.cache.positions


def _opts(cfg_name: str, p: int, o: int) -> dict[str, Any]:
    return validate(SERVE, {"preset": cfg_name, "prompt_len": f"fixed:{p}", "output_len": f"fixed:{o}",
                            "max_prefill_tokens": BUDGET, "max_batch": 1})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_serve_flops_per_output_token_match_flop_counter(name: str) -> None:
    """The figure serve emits (meta ``flops_per_token``: per output token, prefill included) times the output
    tokens equals what the engine computed for that request, masked decode columns aside."""
    cfg = PRESETS[name]
    counts, positions = engine_counts(name)
    L, d = cfg.n_layers, cfg.d_model
    for rid, (p, o) in enumerate(REQUESTS):
        pre, dec = counts[rid]["prefill"], counts[rid]["decode"]
        assert set(pre) | set(dec) <= {"mm", "addmm", "bmm"}
        # decode attention ran over the whole cache row: exactly 4·L·d·positions per step
        steps = o - 1
        assert dec.get("bmm", 0) == 4 * L * d * positions * steps
        attended = sum(p + j for j in range(1, o))  # step j feeds output token j at position p + j - 1
        counted = sum(pre.values()) + sum(dec.values()) - 4 * L * d * (positions * steps - attended)
        btune = plan(_opts(name, p, o))["flops_per_output_token"] * o
        assert btune == pytest.approx(counted, rel=1e-6), f"request {rid} (prompt {p}, output {o})"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_serve_flops_phases_match_flop_counter(name: str) -> None:
    """Prefill and decode apart: prefill (layers per prompt token, attention over each chunk's keys, the LM head
    once per chunk) equals the counter exactly; decode's linear layers and LM head (mm/addmm) are one step per
    output token after the first, and its attention the attended context once the masked columns are off."""
    cfg = PRESETS[name]
    counts, _ = engine_counts(name)
    L, d = cfg.n_layers, cfg.d_model
    head = 2 * d * cfg.vocab_size
    for rid, (p, o) in enumerate(REQUESTS):
        pre, dec = counts[rid]["prefill"], counts[rid]["decode"]
        f = serve_flops(cfg, p, o, BUDGET)
        assert f["prefill"] == pytest.approx(sum(pre.values()), rel=1e-9)
        chunks = -(-p // BUDGET)
        assert pre.get("bmm", 0) == sum(4 * L * d * n * (s + n) for s, n in
                                        [(s, min(BUDGET, p - s)) for s in range(0, p, BUDGET)])
        # the prefill's LM head ran once per chunk: the linear FLOPs are the layers per token plus that
        layers = 2 * param_counts(cfg)["matmul"] - head  # 2·N per token, less the LM head's 2·d·V
        assert pre.get("mm", 0) + pre.get("addmm", 0) == p * layers + chunks * head
        steps = o - 1
        assert dec.get("mm", 0) + dec.get("addmm", 0) == steps * (layers + head)
        attended = 4 * L * d * sum(p + j for j in range(1, o))
        assert f["decode"] == pytest.approx(sum(dec.values()) - dec.get("bmm", 0) + attended, rel=1e-9)
        assert f["per_output_token"] == pytest.approx(f["total"] / o) and f["total"] == f["prefill"] + f["decode"]
