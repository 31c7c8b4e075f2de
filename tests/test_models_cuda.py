"""Model library on a CUDA GPU (skipped without one): backends, flex training, KV cache, compile."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

from workloads.models.attention import BACKENDS, AttentionKernel, make_kernel, resolve_backend
from workloads.models.config import PRESETS
from workloads.models.kv_cache import KVCache
from workloads.models.transformer import Transformer

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("error:flex_attention called without torch.compile"),  # no silent eager flex
    pytest.mark.usefixtures("fresh_dynamo"),  # no test's shapes use up another's recompile limit
]


LLAMA = {"n_heads": 32, "n_kv_heads": 8, "head_dim": 128}


def _resolvable(window: int | None) -> dict[str, str]:
    out = {}
    for name in BACKENDS:
        try:
            out[name] = resolve_backend(name, "cuda", torch.bfloat16, training=True, window=window, **LLAMA)[1]
        except ValueError as e:
            out[name] = f"ValueError: {e}"
    return out


def test_resolution_on_cuda() -> None:
    causal, windowed = _resolvable(None), _resolvable(256)
    for name in BACKENDS:
        print(f"\n{name:9} causal: {causal[name]}\n{name:9} window: {windowed[name]}")
    for name in ("auto", "flash", "math", "flex"):
        assert not causal[name].startswith("ValueError"), causal[name]
    assert windowed["flash"].startswith("ValueError"), "flash takes no mask; a window must be refused"
    assert not windowed["flex"].startswith("ValueError")


def _qkv(t: int, grad: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(2, 8, t, 64), (2, 2, t, 64), (2, 2, t, 64)]
    return tuple(torch.randn(s, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_(grad) for s in shapes)


@pytest.mark.parametrize("t", [256, 200, 40])
@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("name", ["auto", "flash", "cudnn", "efficient", "flex"])
def test_backend_matches_math_bf16(name: str, window: int | None, t: int) -> None:
    try:
        kernel, _ = make_kernel(
            name, "cuda", torch.bfloat16, n_heads=8, n_kv_heads=2, head_dim=64, seq_len=t, window=window, training=True
        )
    except ValueError as e:
        pytest.skip(str(e))
    results = []
    for k_, dtype in ((AttentionKernel("math", window), torch.float32), (kernel, torch.bfloat16)):
        q, k, v = (x.detach().to(dtype).requires_grad_() for x in _qkv(t, grad=False))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = k_(q, k, v, k_.mask(t, t, q.device))
        assert not [w for w in caught if "without torch.compile" in str(w.message)]
        out.float().square().sum().backward()
        results.append([out, q.grad, k.grad, v.grad])
    for a, b in zip(results[1], results[0], strict=True):  # bf16 kernel against an fp32 reference
        assert ((a.float() - b).norm() / b.norm()).item() < 2e-2


@pytest.mark.parametrize("backend", ["auto", "flex"])
@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_decode_matches_full_forward_cuda(name: str, backend: str) -> None:
    cfg = PRESETS[name]
    torch.manual_seed(0)
    model = Transformer(cfg, AttentionKernel(backend)).cuda().eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), device="cuda")
    cache = KVCache(cfg, batch=2, max_len=32, device="cuda", dtype=torch.float32)
    with torch.no_grad():
        full = model(tokens)
        model(tokens[:, :16], cache=cache)
        for pos in range(16, 24):
            step = model(tokens[:, pos : pos + 1], cache=cache, positions=pos)
            torch.testing.assert_close(step[:, 0], full[:, pos], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["auto", "flex"])
def test_compiled_model_trains(backend: str) -> None:
    cfg = replace(PRESETS["llama-3.1-8b"].with_layers(2), vocab_size=32000, max_seq_len=2048)
    with torch.device("meta"):
        model = Transformer(cfg, AttentionKernel(backend, window=512))
    model.to_empty(device="cuda")
    model.init_weights()
    model.to(torch.bfloat16)
    eager_model = model
    compiled = torch.compile(model)
    tokens = torch.randint(0, cfg.vocab_size, (1, 2048), device="cuda")
    with torch.no_grad():
        ref = eager_model(tokens)
    out = compiled(tokens)
    out.float().logsumexp(-1).mean().backward()
    assert ((out.detach().float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2


def test_train_step_throughput_by_backend() -> None:
    """Compiled fwd+bwd of Llama-3.1-8B shapes (4 layers, T 4096, bf16): prints tokens/s and MFU per backend."""
    from workloads.models.flops import flops_per_token

    cfg, t = PRESETS["llama-3.1-8b"].with_layers(4), 4096
    tokens = torch.randint(0, cfg.vocab_size, (1, t), device="cuda")
    rates = {}
    for backend in ("auto", "flash", "cudnn", "efficient", "flex", "math"):
        try:
            kernel, reason = make_kernel(backend, "cuda", torch.bfloat16, seq_len=t, training=True, **LLAMA)
        except ValueError as e:
            print(f"\n{backend}: {e}")
            continue
        torch.manual_seed(0)
        model = Transformer(cfg, kernel).to(device="cuda", dtype=torch.bfloat16)
        step = torch.compile(model)
        for _ in range(3):
            step(tokens).float().logsumexp(-1).mean().backward()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            step(tokens).float().logsumexp(-1).mean().backward()
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000 / 5
        rates[backend] = t / seconds
        mfu = rates[backend] * flops_per_token(cfg, t, "train") / 989e12
        print(f"\n{backend:9} {rates[backend]:10.0f} tok/s  MFU(989T) {mfu:.1%}  {reason}")
        del model, step
        torch.cuda.empty_cache()
    assert rates["auto"] > rates.get("math", 0)


@pytest.mark.slow  # Triton's first compile starts processes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_boundary_kernels_match_eager(dtype: torch.dtype) -> None:
    """The inference kernels (workloads.models.boundaries) give the eager expressions' values within one bf16
    rounding (the same rounding steps; sigmoid and rsqrt differ in their last bits), on batch-1 and prefill rows."""
    import torch.nn.functional as F

    from workloads.models import boundaries
    from workloads.models.projections import split_gate_up

    assert boundaries.prepare()
    torch.manual_seed(0)
    with torch.no_grad():
        for rows in (1, 37):
            x = torch.randn(rows, 1, 4096, device="cuda", dtype=dtype) * 3
            w = (1 + 0.1 * torch.randn(4096, device="cuda")).to(dtype)
            want = F.rms_norm(x.float(), (4096,), eps=1e-5).type_as(x) * w
            torch.testing.assert_close(boundaries.rms_norm(x, w, 1e-5), want, atol=0, rtol=2 ** -7)
            y = torch.randn(rows, 1, 2 * 14336, device="cuda", dtype=dtype) * 3
            gate, up = split_gate_up(y, 64)
            torch.testing.assert_close(boundaries.swiglu(y, 64), F.silu(gate) * up, atol=1e-5, rtol=2 ** -7)
