"""The decode step's split-KV attention kernels (workloads.engine.decode_attention) against attention written out
per slot: any number of parts, slots at different positions, a sliding window, grouped-query heads.

They are Triton kernels: on a GPU they run as they do in the engine (bf16 and fp32); without one they run under
Triton's interpreter (fp32: its bf16 dot is not faithful) where Triton is installed, and are skipped where it is not
(the CPU CI: the engine decodes on the CPU with matmuls, tests/test_serve_engine.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = [(1, 8, 2, 64, 256, None, 4), (3, 8, 2, 64, 256, None, 5), (2, 4, 4, 32, 256, 20, 3),
         (4, 8, 2, 64, 256, None, 1), (2, 32, 8, 128, 384, None, 16), (2, 8, 2, 32, 1280, None, 33),
         (3, 6, 2, 32, 256, 50, 2)]


def reference(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor, window: int | None):
    b, h, _, d = q.shape
    rep = h // kc.shape[1]
    out = []
    for i in range(b):
        p = int(pos[i])
        first = max(0, p - window + 1) if window else 0
        k = kc[i, :, first:p + 1].float().repeat_interleave(rep, 0)
        v = vc[i, :, first:p + 1].float().repeat_interleave(rep, 0)
        s = (q[i, :, 0].float()[:, None, :] * k).sum(-1) * d ** -0.5
        out.append((torch.softmax(s, -1)[:, :, None] * v).sum(1))
    return torch.stack(out)[:, :, None, :]


def check(device: str, dtype: torch.dtype, tol: float) -> None:
    """Both paths (one kernel whose last program per slot and KV head combines; split and combine kernels) against
    the reference, every call with one count buffer that each must leave all zeros."""
    from workloads.engine import decode_attention as da

    da.prepare()
    counts = torch.zeros(64, dtype=torch.int32, device=device)
    fused = da.FUSED
    try:
        for da.FUSED in (True, False):
            gen = torch.Generator().manual_seed(0)
            for b, h, hkv, d, positions, window, splits in CASES:
                q = torch.randn(b, 1, h, d, generator=gen).to(device, dtype).transpose(1, 2)  # as the block hands it
                kc, vc = (torch.randn(b + 1, hkv, positions, d, generator=gen).to(device, dtype) for _ in range(2))
                pos = torch.tensor([0, positions - 56, 37, 130][:b], device=device)
                got = da.decode_attention(q, kc, vc, pos, window, splits, counts)
                want = reference(q, kc, vc, pos, window)
                case = (da.FUSED, b, h, hkv, d, window, splits)
                assert got.shape == (b, h, 1, d) and got.dtype == dtype, case
                err = (got.float() - want).abs().max().item()
                assert err < tol, (*case, err)
                assert not counts.any(), (*case, counts.tolist())
            check_rope(device, dtype, tol, counts)
    finally:
        da.FUSED = fused


def check_rope(device: str, dtype: torch.dtype, tol: float, counts: torch.Tensor) -> None:
    """decode_attention_rope from the fused q/k/v output against the model's own steps: split it, rotate q and k
    (rope.rotate), write k and v into the cache at the write position, then the reference; the kernel's cache
    writes equal those, and nothing else in the cache changes (a slot writing to the scratch column included)."""
    from workloads.engine import decode_attention as da
    from workloads.models.projections import QKVLayout
    from workloads.models.rope import rope_at, rope_tables, rotate

    gen = torch.Generator().manual_seed(1)
    for b, h, hkv, d, positions, window, splits in CASES:
        layout = QKVLayout(h, hkv, d)
        qkv = torch.randn(b, 1, layout.rows, generator=gen).to(device, dtype)
        kc, vc = (torch.randn(b + 1, hkv, positions, d, generator=gen).to(device, dtype) for _ in range(2))
        pos = torch.tensor([0, positions - 56, 37, 130][:b], device=device)
        write = pos.clone()
        write[0] = positions - 1  # slot 0 idle: its key goes to the scratch column, it attends position 0
        cos, sin = rope_at(rope_tables(d, positions, 10000.0, torch.device(device)), pos[:, None], 1)
        q, k, v = layout.split(qkv)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        want_k, want_v = kc.clone(), vc.clone()
        rows = torch.arange(b, device=device)
        want_k[rows, :, write] = k[:, 0]
        want_v[rows, :, write] = v[:, 0]
        want_k[0, :, 0], want_v[0, :, 0] = k[0, 0], v[0, 0]  # what slot 0 attends at its position: the new key
        want = reference(q.transpose(1, 2), want_k, want_v, pos, window)
        want_k[0, :, 0], want_v[0, :, 0] = kc[0, :, 0], vc[0, :, 0]  # ... which the cache itself does not get
        got = da.decode_attention_rope(qkv, cos, sin, kc, vc, pos, write, window, splits, counts, h)
        case = ("rope", da.FUSED, b, h, hkv, d, window, splits)
        assert got.shape == (b, 1, h, d) and got.dtype == dtype, case
        err = (got.transpose(1, 2).float() - want).abs().max().item()
        assert err < tol, (*case, err)
        # the key the kernel rotates (fp32, fused multiply-adds on a GPU) may differ from rope.rotate's in the last
        # bit: within the tolerance at the write positions, every other position exactly as it was
        at = torch.zeros(kc.shape[:3], dtype=torch.bool, device=device)
        at[rows, :, write] = True
        for got_c, want_c in ((kc, want_k), (vc, want_v)):
            assert torch.equal(got_c[~at], want_c[~at]), case
            assert (got_c[at].float() - want_c[at].float()).abs().max().item() < tol, case
        assert not counts.any(), (*case, counts.tolist())


@pytest.mark.slow  # Triton's first compile starts processes
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_split_kv_attention_on_the_gpu(dtype: torch.dtype, tol: float) -> None:
    check("cuda", dtype, tol)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test runs the kernels natively")
def test_split_kv_attention_under_tritons_interpreter() -> None:
    pytest.importorskip("triton")
    code = "import torch, tests.test_decode_attention as t; t.check('cpu', torch.float32, 1e-5); print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_head_dims_the_kernels_cannot_take_decode_otherwise():
    """The kernels index a head with one power-of-two range: other head sizes (and no Triton with a GPU) leave the
    engine on its matmul decode rather than failing at compile time."""
    from torch.utils._triton import has_triton

    from workloads.engine.decode_attention import available

    assert not available(80) and not available(8) and not available(96)
    assert available(128) == available(64) == has_triton()


def test_parts_past_what_the_cache_fills_are_left_out_without_changing_the_partition():
    """split_count caps the parts at the cache's blocks of BLOCK_N keys: the kernel's chunks (as it computes them)
    cover the same keys in the same non-empty parts with or without the cap, for every live length."""
    from workloads.engine.decode_attention import BLOCK_N, split_count

    def parts(length: int, splits: int) -> list[tuple[int, int]]:
        chunk = math.ceil(math.ceil(length / splits) / BLOCK_N) * BLOCK_N
        return [(p * chunk, min(p * chunk + chunk, length)) for p in range(splits) if p * chunk < length]

    for positions in (64, 130, 832, 1088, 8192):
        capped, free = split_count(1, 8, 132, positions), split_count(1, 8, 132)
        assert capped == min(free, -(-positions // BLOCK_N))
        for length in range(1, positions + 1, 7):
            assert parts(length, capped) == parts(length, free), (positions, length)
