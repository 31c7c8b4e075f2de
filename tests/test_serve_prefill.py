"""Compiled prefill (norms, RoPE and SiLU compiled around fused GEMMs) against the eager prefill it replaces:
the same cache contents and next token, for first and continuation chunks, one graph for every layer."""

import pytest
import torch
from torch._dynamo.utils import counters

from workloads.engine.cache import SlotKVCache
from workloads.engine.engine import Engine
from workloads.engine.forward import DecodeStep, prefill_chunk
from workloads.engine.prefill import CompiledPrefill
from workloads.models.attention import AttentionKernel
from workloads.models.config import PRESETS
from workloads.models.transformer import Transformer


def build(name: str, kernel: AttentionKernel) -> tuple[Transformer, SlotKVCache, SlotKVCache, CompiledPrefill]:
    torch.manual_seed(0)
    cfg = PRESETS[name].with_layers(5)
    model = Transformer(cfg, kernel).eval()
    caches = [SlotKVCache(cfg.n_layers, 3, cfg.n_kv_heads, 48, cfg.head_dim, "cpu", torch.float32) for _ in range(2)]
    step = DecodeStep(model, caches[1])
    return model, caches[0], caches[1], CompiledPrefill(model, kernel, caches[1], step.qkv, step.gate_up)


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, 6])
def test_compiled_prefill_equals_eager(window):
    torch._dynamo.reset()
    counters.clear()
    kernel = AttentionKernel("auto", window)
    model, eager_cache, cache, compiled = build("tiny-llama", kernel)
    tokens = torch.randint(0, model.cfg.vocab_size, (40,))
    # slot 2: a 13-token first chunk, a 1-token chunk, a 20-token continuation; slot 0: a 5-token prompt
    chunks = [(2, 0, 13), (2, 13, 1), (2, 14, 20), (0, 0, 5)]
    with torch.inference_mode():
        for slot, start, n in chunks:
            piece = tokens[start:start + n][None]
            want = prefill_chunk(model, kernel, eager_cache, slot, piece, start, n - 1)
            got = compiled(slot, piece, start, n - 1)
            assert got.tolist() == want.tolist(), (slot, start, n)
            for layer in range(model.cfg.n_layers):
                for a, b in ((eager_cache.k[layer], cache.k[layer]), (eager_cache.v[layer], cache.v[layer])):
                    torch.testing.assert_close(b[slot, :, :start + n], a[slot, :, :start + n], rtol=1e-5, atol=1e-5)
    assert cache.k[0][1].abs().sum() == 0, "no other slot was written"
    # two pieces; the first layer's (no residual delta yet) and one-token chunks are their own graphs, the
    # layers and chunk lengths are not
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])


def test_compiled_prefill_needs_rmsnorm_rope_and_fused_weights():
    kernel = AttentionKernel("auto")
    for name, ok in (("tiny-llama", True), ("tiny", False)):
        model = Transformer(PRESETS[name], kernel).eval()
        cfg = model.cfg
        step = DecodeStep(model, SlotKVCache(cfg.n_layers, 2, cfg.n_kv_heads, 16, cfg.head_dim, "cpu", torch.float32))
        assert CompiledPrefill.supports(model, step.qkv, step.gate_up) is ok, name
        assert not CompiledPrefill.supports(model, [None] * cfg.n_layers, step.gate_up)


@pytest.mark.slow
def test_a_load_after_warmup_compiles_nothing_new(monkeypatch):
    """Warm-up compiles every graph a load needs: first, continuation and one-token chunks, every decode bucket."""
    from test_serve_engine import greedy_by_recompute, serve

    torch._dynamo.reset()
    counters.clear()
    kernel = AttentionKernel("auto")
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-llama"], kernel).eval()
    warmed: dict[str, int] = {}
    real_warmup = Engine.warmup

    def warmup(self, rounds, on_step=None):  # the real warm-up, then a count of the graphs it compiled
        out = real_warmup(self, rounds, on_step)
        warmed.update(counters["stats"])
        return out

    monkeypatch.setattr(Engine, "warmup", warmup)
    res, steps = serve(model, kernel, n=8, compile_mode="default", prompt="uniform:1,20")
    assert any(s > 0 for _, _, chunks in steps for _, s, _ in chunks), "a prompt was chunked"
    assert any(k == 1 for _, _, chunks in steps for _, _, k in chunks), "a one-token chunk ran"
    assert counters["stats"]["unique_graphs"] == warmed["unique_graphs"], (warmed, dict(counters["stats"]))
    for r in res.requests:
        assert r.tokens == greedy_by_recompute(model, r.prompt, r.output_len)
