"""FLOP and memory formulas against torch: FlopCounterMode, real parameter bytes, saved activations.

FLOPs: FlopCounterMode counts matmuls (mm, addmm, bmm) and SDPA kernels it knows; it does not know the
CPU flash SDPA kernel, so the model runs with the ``math`` backend, whose attention is plain bmm over
the full T×T scores (no causal discount, as in the formula). For train the count covers forward and
backward of one step; for prefill a no-grad forward; for decode one token per sequence attending to
the whole cache. The embedding lookup and its gradient are not matmuls and are in neither number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from support import saved_bytes
from torch.utils.flop_counter import FlopCounterMode

from workloads.models.attention import AttentionKernel
from workloads.models.config import PRESETS, ModelConfig
from workloads.models.flops import flops_per_token, memory_estimate, param_counts, prefill_chunks, serve_flops
from workloads.models.kv_cache import KVCache
from workloads.models.transformer import Transformer

CONFIGS = [
    PRESETS["tiny"],
    PRESETS["tiny-llama"],
    replace(PRESETS["tiny-llama"], name="tied", tie_embeddings=True, n_layers=3),
]


def _counted(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_flops_match_flop_counter(cfg: ModelConfig) -> None:
    b, t = 2, 64
    model = Transformer(cfg, AttentionKernel("math"))
    tokens = torch.randint(0, cfg.vocab_size, (b, t))

    train = _counted(lambda: model(tokens).sum().backward()) / (b * t)
    assert train == pytest.approx(flops_per_token(cfg, t, "train"), rel=0.02)

    with torch.no_grad():
        prefill = _counted(lambda: model(tokens)) / (b * t)
        assert prefill == pytest.approx(flops_per_token(cfg, t, "prefill"), rel=0.02)

        cache = KVCache(cfg, batch=b, max_len=t + 1, dtype=torch.float32)
        model(tokens, cache=cache)
        decode = _counted(lambda: model(tokens[:, :1], cache=cache, positions=t)) / b
        assert decode == pytest.approx(flops_per_token(cfg, t + 1, "decode"), rel=0.02)


def test_flop_formula_values() -> None:
    cfg = PRESETS["llama-3.1-8b"]
    n = param_counts(cfg)["matmul"]
    assert flops_per_token(cfg, 8192, "train") == 6 * n + 12 * 32 * 4096 * 8192
    assert flops_per_token(cfg, 8192, "prefill") == pytest.approx(flops_per_token(cfg, 8192, "train") / 3)
    assert flops_per_token(cfg, 1000, "decode") == 2 * n + 4 * 32 * 4096 * 1000
    assert 7.9e9 < param_counts(cfg)["total"] < 8.1e9  # Llama 3.1 8B has 8.03 B parameters
    assert 70.0e9 < param_counts(PRESETS["llama-3.1-70b"])["total"] < 71.0e9  # 70.6 B
    with pytest.raises(ValueError, match="mode"):
        flops_per_token(cfg, 10, "serve")


def test_serve_flops_values() -> None:
    """A served request from the design's parts: layers per prompt token, the LM head once per prefill chunk,
    one decode token per output token after the first (tests/test_serve_flops.py checks it on the engine)."""
    cfg = PRESETS["llama-3.1-8b"]
    n, head, ld = param_counts(cfg)["matmul"], 2 * 4096 * 128256, 32 * 4096
    f = serve_flops(cfg, 512, 256, chunk=2048)
    assert f["prefill"] == 512 * (2 * n - head + 4 * ld * 512) + head
    assert f["decode"] == sum(2 * n + 4 * ld * (512 + j) for j in range(1, 256))
    assert f["total"] == f["prefill"] + f["decode"] and f["per_output_token"] == f["total"] / 256
    # the old figure charged the LM head for every prompt token and one decode step too many: +4.9% here
    old = (512 * flops_per_token(cfg, 512, "prefill") + 256 * flops_per_token(cfg, 512 + 128, "decode")) / 256
    assert old / f["per_output_token"] - 1 == pytest.approx(0.0493, abs=5e-4)
    # chunked: the head once per chunk, each chunk's tokens attending its start + n keys
    chunked = serve_flops(cfg, 512, 1, chunk=200)
    assert prefill_chunks(512, 200) == [(0, 200), (200, 200), (400, 112)]
    assert chunked["decode"] == 0 and chunked["prefill"] == (
        512 * (2 * n - head) + 3 * head + 4 * ld * (200 * 200 + 200 * 400 + 112 * 512))
    assert serve_flops(cfg, 512, 1, chunks=[(0, 500), (500, 12)])["prefill"] == (
        512 * (2 * n - head) + 2 * head + 4 * ld * (500 * 500 + 12 * 512))
    for bad in ({"prompt_len": 0, "output_len": 1}, {"prompt_len": 4, "output_len": 0},
                {"prompt_len": 4, "output_len": 1, "chunks": [(0, 3)]}):
        with pytest.raises(ValueError):
            serve_flops(cfg, **bad)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_weights_and_grads_are_parameter_bytes(cfg: ModelConfig, dtype: torch.dtype) -> None:
    model = Transformer(cfg).to(dtype)
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    size = torch.empty((), dtype=dtype).element_size()
    est = memory_estimate(cfg, batch=2, seq_len=32, mode="train", dtype_bytes=size)
    assert est["weights"] == real and est["grads"] == real
    # AdamW's state as torch allocates it after a step (the moments like each parameter; the step counters aside)
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    state = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items() if k != "step")
    assert est["optimizer"] == state
    # the peak: the start of backward (activations + logits) or its end (grads + tail), the larger
    assert est["total"] == est["weights"] + est["optimizer"] + max(est["activations"] + est["logits"],
                                                                   est["grads"] + est["tail"])
    infer = memory_estimate(cfg, batch=2, seq_len=32, mode="decode", dtype_bytes=size)
    assert infer["grads"] == infer["optimizer"] == 0
    assert infer["kv_cache"] == KVCache(cfg, batch=2, max_len=32, dtype=dtype).nbytes()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_activation_estimate_near_saved_tensors(arch: str) -> None:
    """Bytes autograd saves in one bf16 training forward + loss, against the estimate's activations and the loss's
    saved log-probabilities (eager; the constants were read off H200 peaks, this checks them on the CPU)."""
    base = PRESETS["tiny"] if arch == "gpt" else PRESETS["tiny-llama"]
    cfg = replace(base, d_model=256, d_ff=1024 if arch == "gpt" else 688, n_layers=4)
    model = Transformer(cfg).to(torch.bfloat16)
    tokens = torch.randint(0, cfg.vocab_size, (4, 256))
    saved = saved_bytes(model, lambda: F.cross_entropy(model(tokens).flatten(0, 1).float(), tokens.flatten()))
    est = memory_estimate(cfg, batch=4, seq_len=256, mode="train", dtype_bytes=2)["activations"]
    log_probs = 4 * 256 * cfg.vocab_size * 4  # the loss saves its fp32 log-softmax (part of the estimate's logits)
    assert 0.9 < (est + log_probs) / saved < 1.1
