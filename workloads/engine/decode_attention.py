"""The decode step's attention on a GPU: split-KV ("flash decoding") in two Triton kernels behind
``torch.library.triton_op``.

Each slot's query heads attend its own cache up to its position (sliding window optional), grouped by KV head so
GQA reads each key once. The first kernel splits each slot's live keys into ``splits`` equal parts, one program
per (slot, KV head, part): an online softmax over its part, written as the part's max, sum and weighted values
(fp32). The second combines the parts, one program per (slot, query head), and writes the output in the queries'
dtype, laid out as the output projection reads it ([b, 1, H x D]).

Why not FlexAttention's decoding kernel, which the engine used before: inductor inlines flex's combine of the
parts into the output projection's GEMV at batch 1 (a multiply-and-sum there), so every output row re-reads and
re-combines every part (the projection ran at half the copy bandwidth); its own two reductions are two more
launches. Here the combined output is written once. Measured side by side: docs/benchmarks.md (issue 24).
"""

from __future__ import annotations

from typing import Any

import torch

_OPS: dict[str, Any] = {}


def split_count(rows: int, kv_heads: int, sms: int) -> int:
    """Parts per slot: about two programs per SM over the step's (slot, KV head) pairs, 1 to 64."""
    return max(1, min(64, (2 * sms) // max(1, rows * kv_heads)))


def decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor,
                     window: int | None, splits: int) -> torch.Tensor:
    """Attention of q [b, H, 1, D] (slot i's queries in row i) over caches kc, vc [slots >= b, Hkv, P, D] at keys
    max(0, pos[i] - window + 1)..pos[i]; returns [b, H, 1, D] (a view of [b, 1, H, D])."""
    return _OPS["attn"](q, kc, vc, pos, window or 0, splits).transpose(1, 2)


def prepare() -> None:
    """Define and register the kernels, outside any traced code: dynamo, tracing a compiled block, calls the
    registered op; defining it there would split the block's graph (and inductor's fusions) around it."""
    if "attn" not in _OPS:
        _make_ops()


def available(head_dim: int) -> bool:
    """Whether the kernels can run for ``head_dim``: a power of two from 16, and Triton with a GPU to run on."""
    from torch.utils._triton import has_triton

    return head_dim >= 16 and not head_dim & (head_dim - 1) and has_triton()


def _make_ops() -> Any:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr,  # type: ignore[no-untyped-def]
                     sq_b, sq_h, sk_b, sk_h, sk_p, window, SCALE: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                     SPLITS: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                     PRECISION: tl.constexpr):
        bh = tl.program_id(0)
        part = tl.program_id(1)
        b = bh // HKV
        kvh = bh % HKV
        pos = tl.load(pos_ptr + b)
        first = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)
        length = pos - first + 1
        chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
        lo = first + part * chunk
        hi = tl.minimum(lo + chunk, pos + 1)
        rg = tl.arange(0, BLOCK_G)
        rd = tl.arange(0, D)
        g_ok = rg < G
        qh = kvh * G + rg  # this KV head's query heads
        q = tl.load(q_ptr + b * sq_b + qh[:, None] * sq_h + rd[None, :], mask=g_ok[:, None], other=0.0)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        kbase = b * sk_b + kvh * sk_h
        for start in range(lo, hi, BLOCK_N):
            rn = start + tl.arange(0, BLOCK_N)
            n_ok = rn < hi
            k = tl.load(k_ptr + kbase + rn[:, None] * sk_p + rd[None, :], mask=n_ok[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * SCALE  # [BLOCK_G, BLOCK_N], log2 units
            scores = tl.where(n_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(scores - m_new[:, None])
            s = s * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + kbase + rn[:, None] * sk_p + rd[None, :], mask=n_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        out = (b * HKV * G + qh) * SPLITS + part  # [b, H, SPLITS]
        tl.store(m_ptr + out, m, mask=g_ok)
        tl.store(l_ptr + out, s, mask=g_ok)
        tl.store(acc_ptr + out[:, None] * D + rd[None, :], acc, mask=g_ok[:, None])

    @triton.jit
    def combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, SPLITS: tl.constexpr,  # type: ignore[no-untyped-def]
                       BLOCK_S: tl.constexpr, D: tl.constexpr):
        row = tl.program_id(0)  # b * H + h
        rs = tl.arange(0, BLOCK_S)
        rd = tl.arange(0, D)
        s_ok = rs < SPLITS
        m = tl.load(m_ptr + row * SPLITS + rs, mask=s_ok, other=float("-inf"))
        total = tl.max(m, 0)
        w = tl.where(s_ok & (m > float("-inf")), tl.exp2(m - total), 0.0)
        den = tl.sum(w * tl.load(l_ptr + row * SPLITS + rs, mask=s_ok, other=0.0), 0)
        acc = tl.load(acc_ptr + (row * SPLITS + rs[:, None]) * D + rd[None, :], mask=s_ok[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / den
        tl.store(o_ptr + row * D + rd, out.to(o_ptr.dtype.element_ty))

    @triton_op("btune::decode_attention", mutates_args=())
    def attn(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor, window: int,
             splits: int) -> torch.Tensor:
        b, h, _, d = q.shape
        hkv = kc.shape[1]
        if q.stride(-1) != 1:
            q = q.contiguous()
        g = h // hkv
        m = q.new_empty(b, h, splits, dtype=torch.float32)
        lse = q.new_empty(b, h, splits, dtype=torch.float32)
        acc = q.new_empty(b, h, splits, d, dtype=torch.float32)
        out = q.new_empty(b, 1, h, d)
        scale = d ** -0.5 * 1.4426950408889634  # to log2 units
        wrap_triton(split_kernel)[(b * hkv, splits)](
            q, kc, vc, pos, m, lse, acc, q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), window,
            SCALE=scale, HKV=hkv, G=g, SPLITS=splits, D=d, BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_N=64,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2)
        wrap_triton(combine_kernel)[(b * h,)](m, lse, acc, out, SPLITS=splits,
                                              BLOCK_S=max(2, triton.next_power_of_2(splits)), D=d, num_warps=4)
        return out

    _OPS["attn"] = attn
    return attn
