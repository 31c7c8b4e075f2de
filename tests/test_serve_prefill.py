"""The engine's compiled prefill (each block compiled for any chunk length, one graph for every layer, around the
eager cache write and attention) against the eager prefill: the same cache contents and next token, for first
and continuation chunks."""

from collections import Counter

import pytest
import torch

from workloads.engine.cache import SlotKVCache
from workloads.engine.engine import EagerAttend, Engine, compiled_blocks
from workloads.engine.forward import prefill_chunk
from workloads.models.attention import AttentionKernel
from workloads.models.config import PRESETS
from workloads.models.transformer import Transformer


def counters() -> dict[str, Counter]:
    """torch._dynamo's counters, imported when a test needs them (2 s of the quick tier's collection otherwise)."""
    from torch._dynamo.utils import counters as c

    return c


def compiled_against_eager(name: str, layers: int, window: int | None) -> int:
    """Run four chunks both ways, check they agree; the number of graphs compiled."""
    torch._dynamo.reset()
    counters().clear()
    kernel = AttentionKernel("auto", window)
    torch.manual_seed(0)
    cfg = PRESETS[name].with_layers(layers)
    model = Transformer(cfg, kernel).eval()
    eager_cache, cache = (SlotKVCache(cfg.n_layers, 3, cfg.n_kv_heads, 48, cfg.head_dim, "cpu", torch.float32)
                          for _ in range(2))
    _, run_block = compiled_blocks("default", {})
    tokens = torch.randint(0, cfg.vocab_size, (40,))
    # slot 2: a 13-token first chunk, a 1-token chunk, a 20-token continuation; slot 0: a 5-token prompt
    chunks = [(2, 0, 13), (2, 13, 1), (2, 14, 20), (0, 0, 5)]
    with torch.inference_mode():
        for slot, start, n in chunks:
            piece = tokens[start:start + n][None]
            want = prefill_chunk(model, eager_cache, slot, piece, start, n - 1)
            got = prefill_chunk(model, cache, slot, piece, start, n - 1, run_block, EagerAttend)
            assert got.tolist() == want.tolist(), (slot, start, n)
            for layer in range(cfg.n_layers):
                for a, b in ((eager_cache.k[layer], cache.k[layer]), (eager_cache.v[layer], cache.v[layer])):
                    torch.testing.assert_close(b[slot, :, :start + n], a[slot, :, :start + n], rtol=1e-5, atol=1e-5)
    assert cache.k[0][1].abs().sum() == 0, "no other slot was written"
    return counters()["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "window"), [("tiny-llama", None), ("tiny-llama", 6), ("tiny", None)])
def test_compiled_prefill_equals_eager_with_the_same_graphs_for_any_depth(name, window):
    """Llama (RMSNorm, RoPE, SwiGLU, GQA) and GPT (LayerNorm, position embeddings, GELU) blocks alike; a model of 4
    layers compiles no more graphs than one of 2."""
    assert compiled_against_eager(name, 4, window) == compiled_against_eager(name, 2, window) > 0


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["uniform:1,20", "fixed:12"])
def test_a_load_after_warmup_compiles_nothing_new(monkeypatch, prompt):
    """Warm-up compiles every graph a load needs: first, continuation and one-token chunks, several slots' chunks in
    one call (prompts of one length), every decode bucket."""
    from test_serve_engine import greedy_by_recompute, serve

    torch._dynamo.reset()
    counters().clear()
    kernel = AttentionKernel("auto")
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-llama"], kernel).eval()
    warmed: dict[str, int] = {}
    real_warmup = Engine.warmup

    def warmup(self, rounds, on_step=None):  # the real warm-up, then a count of the graphs it compiled
        out = real_warmup(self, rounds, on_step)
        warmed.update(counters()["stats"])
        return out

    monkeypatch.setattr(Engine, "warmup", warmup)
    res, steps = serve(model, kernel, n=8, compile_mode="default", prompt=prompt,
                       budget=7 if prompt.startswith("uniform") else 36)
    if prompt.startswith("uniform"):
        assert any(s > 0 for _, _, chunks in steps for _, s, _ in chunks), "a prompt was chunked"
        assert any(k == 1 for _, _, chunks in steps for _, _, k in chunks), "a one-token chunk ran"
    else:
        assert any(len(chunks) > 1 and len({(s, k) for _, s, k in chunks}) == 1 for _, _, chunks in steps), \
            "equal chunks of several slots ran in one step"
    assert counters()["stats"]["unique_graphs"] == warmed["unique_graphs"], (warmed, dict(counters()["stats"]))
    for r in res.requests:
        assert r.tokens == greedy_by_recompute(model, r.prompt, r.output_len)
