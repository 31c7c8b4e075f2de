"""Attention backends on CPU: resolution, agreement with the math kernel (causal and sliding window)."""

from __future__ import annotations

import warnings

import pytest
import torch

from workloads.build import checkpoint_blocks
from workloads.models.attention import BACKENDS, AttentionKernel, causal_mask, make_kernel, resolve_backend
from workloads.models.config import PRESETS
from workloads.models.transformer import Transformer

pytestmark = [
    pytest.mark.filterwarnings("error:flex_attention called without torch.compile"),
    pytest.mark.usefixtures("fresh_dynamo"),  # compiled flex (static shapes on CPU): a fresh recompile budget
]


SHAPE = {"n_heads": 4, "n_kv_heads": 2, "head_dim": 16}


def cpu_backends(training: bool) -> list[str]:
    """Backends that resolve on this CPU (auto, flash's CPU kernel, math; flex only without grad)."""
    ok = []
    for name in BACKENDS:
        try:
            resolve_backend(name, "cpu", torch.float32, training=training, **SHAPE)
        except ValueError:
            continue
        ok.append(name)
    return ok


def test_cpu_resolution() -> None:
    assert {"auto", "math"} <= set(cpu_backends(training=True))
    assert "flex" in cpu_backends(training=False)
    assert resolve_backend("math", "cpu", torch.float32)[0] == "math"
    ran, reason = resolve_backend("auto", "cpu", torch.bfloat16, **SHAPE)
    assert ran in ("flash", "math") and reason.startswith("auto: SDPA picks")
    for name in ("cudnn", "efficient"):
        with pytest.raises(ValueError, match="CUDA-only"):
            resolve_backend(name, "cpu", torch.float32)
    with pytest.raises(ValueError, match="no backward on CPU"):
        resolve_backend("flex", "cpu", torch.float32, training=True)
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend("fast", "cpu", torch.float32)
    with pytest.raises(ValueError, match="window"):
        AttentionKernel("math", window=0)
    kernel, _ = make_kernel("auto", "cpu", torch.float32, window=8, **SHAPE)
    assert kernel.backend == "auto" and kernel.window == 8


def test_causal_mask_bottom_right_and_window() -> None:
    m = causal_mask(2, 5, 3, "cpu")
    assert m.tolist() == [[False, True, True, True, False], [False, False, True, True, True]]


def _qkv(t: int, grad: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 4, t, 16), (2, 2, t, 16), (2, 2, t, 16)]
    return tuple(torch.randn(s, generator=g).requires_grad_(grad) for s in shapes)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("name", [b for b in cpu_backends(training=True) if b != "math"])
def test_sdpa_backends_match_math_with_grads(name: str, window: int | None) -> None:
    outs, grads = [], []
    for backend in ("math", name):
        kernel = AttentionKernel(backend, window)
        q, k, v = _qkv(40, grad=True)
        out = kernel(q, k, v, kernel.mask(40, 40, q.device))
        out.square().sum().backward()
        outs.append(out)
        grads.append([x.grad for x in (q, k, v)])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("q_len", [40, 1, 5])
@pytest.mark.parametrize("window", [None, 7])
def test_flex_matches_math(window: int | None, q_len: int) -> None:
    """Compiled FlexAttention (forward only on CPU), kv length 40 exercises the CPU padding workaround."""
    q, k, v = _qkv(40, grad=False)
    q = q[:, :, -q_len:]
    ref_kernel, flex = AttentionKernel("math", window), AttentionKernel("flex", window)
    ref = ref_kernel(q, k, v, ref_kernel.mask(q_len, 40, q.device))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = flex(q, k, v, flex.mask(q_len, 40, q.device))
    assert not [w for w in caught if "without torch.compile" in str(w.message)], "flex fell back to eager"
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_model_backends_agree(name: str) -> None:
    cfg = PRESETS[name]
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        for window in (None, 9):
            model.attention = AttentionKernel("math", window)
            ref = model(tokens)
            for backend in cpu_backends(training=False):
                model.attention = AttentionKernel(backend, window)
                torch.testing.assert_close(model(tokens), ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref, Transformer(cfg).eval()(tokens))  # the window really changed something


@pytest.mark.slow
def test_activation_checkpointing_same_grads() -> None:
    cfg = PRESETS["tiny-llama"]
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = Transformer(cfg)
        if ckpt:
            checkpoint_blocks(model)
        model(tokens).float().logsumexp(-1).mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_a_checkpointed_block_is_recomputed_to_its_end() -> None:
    """Early stop off (build.checkpoint_blocks): the recompute runs what follows the block's last saved tensor too,
    as the forward did; torch's early stop would end it at that tensor."""

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.tail_runs = 0

        def forward(self, x: torch.Tensor, rope: object, attend: object) -> torch.Tensor:
            y = self.lin(x)  # the block's last saved tensors: x and the weight
            self.tail_runs += 1
            return y + 1

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([Block()])
    checkpoint_blocks(model)
    model.layers[0](torch.randn(2, 4, requires_grad=True), None, None).sum().backward()
    assert model.layers[0].tail_runs == 2  # the forward and the recompute
    assert model.layers[0].lin.weight.grad is not None
