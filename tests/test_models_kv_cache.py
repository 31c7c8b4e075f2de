"""KV cache: prefill then one-token decode steps reproduce the full forward's logits."""

from __future__ import annotations

import pytest
import torch

from workloads.models.attention import AttentionKernel
from workloads.models.config import PRESETS
from workloads.models.kv_cache import KVCache
from workloads.models.transformer import Transformer

pytestmark = [
    pytest.mark.filterwarnings("error:flex_attention called without torch.compile"),
    pytest.mark.usefixtures("fresh_dynamo"),  # compiled flex (static shapes on CPU): a fresh recompile budget
]


@pytest.mark.parametrize("backend", ["auto", pytest.param("flex", marks=pytest.mark.slow)])  # flex compiles
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_decode_matches_full_forward(name: str, window: int | None, backend: str) -> None:
    cfg = PRESETS[name]
    torch.manual_seed(0)
    model = Transformer(cfg, AttentionKernel(backend, window)).eval()
    tokens = torch.randint(0, cfg.vocab_size, (3, 24))
    prompt = 16
    cache = KVCache(cfg, batch=3, max_len=32, dtype=torch.float32)
    with torch.no_grad():
        full = model(tokens)
        prefill = model(tokens[:, :prompt], cache=cache)
        torch.testing.assert_close(prefill, full[:, :prompt], atol=1e-5, rtol=1e-5)
        for pos in range(prompt, tokens.shape[1]):
            step = model(tokens[:, pos : pos + 1], cache=cache, positions=pos)
            assert step.shape == (3, 1, cfg.vocab_size)
            torch.testing.assert_close(step[:, 0], full[:, pos], atol=1e-5, rtol=1e-5)


def test_chunked_prefill_matches() -> None:
    cfg = PRESETS["tiny-llama"]
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 20))
    cache = KVCache(cfg, batch=2, dtype=torch.float32)
    with torch.no_grad():
        full = model(tokens)
        model(tokens[:, :8], cache=cache)
        chunk = model(tokens[:, 8:20], cache=cache, positions=8)
    torch.testing.assert_close(chunk, full[:, 8:], atol=1e-5, rtol=1e-5)


def test_cache_shape_and_limits() -> None:
    cfg = PRESETS["tiny-llama"]
    cache = KVCache(cfg, batch=2, max_len=8, dtype=torch.bfloat16)
    assert cache[0].k.shape == (2, cfg.n_kv_heads, 8, cfg.head_dim)
    assert cache.nbytes() == 2 * cfg.n_layers * 2 * cfg.n_kv_heads * 8 * cfg.head_dim * 2
    model = Transformer(cfg).to(torch.bfloat16)
    with pytest.raises(ValueError, match="KV cache holds 8"):
        model(torch.zeros(2, 9, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="positions after 0 need a KV cache"):
        model(torch.zeros(2, 1, dtype=torch.long), positions=3)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        KVCache(cfg, batch=1, max_len=cfg.max_seq_len + 1)
