"""The decode step's attention on a GPU: split-KV ("flash decoding") in one Triton kernel behind
``torch.library.triton_op``.

Each slot's query heads attend its own cache up to its position (sliding window optional), grouped by KV head so
GQA reads each key once. The kernel splits each slot's live keys into ``splits`` equal parts, one program per
(slot, KV head, part): an online softmax over its part, written as the part's max, sum and weighted values (fp32).
Each program then adds 1 to its (slot, KV head)'s count (``counts``, int32, an atomic add); the one that counts
last combines that KV head's query heads' parts, writes the output in the queries' dtype, laid out as the output
projection reads it ([b, 1, H x D]), and sets the count back to 0. With one part there is nothing to combine: the
program writes the output itself. ``FUSED = False``: the combine is a second kernel, one program per (slot, query
head), as before the fusion (kept to measure the two side by side).

Why not FlexAttention's decoding kernel, which the engine used before: inductor inlines flex's combine of the
parts into the output projection's GEMV at batch 1 (a multiply-and-sum there), so every output row re-reads and
re-combines every part (the projection ran at half the copy bandwidth); its own two reductions are two more
launches. Here the combined output is written once. Measured side by side: docs/benchmarks.md (issue 24).
"""

from __future__ import annotations

from typing import Any

import torch

_OPS: dict[str, Any] = {}
#: one kernel per call, the last program of each (slot, KV head) combining its parts; False: a second kernel combines
FUSED = True
#: query heads x parts the fused combine loads at a time, as [rows, D] fp32
COMBINE_ROWS = 64
#: keys a program reads at a time (a part is whole blocks of them)
BLOCK_N = 64
#: the engine's decode rotates q and k, writes the cache and attends in the kernel (decode_attention_rope)
ROPE = True


def split_count(rows: int, kv_heads: int, sms: int, positions: int | None = None) -> int:
    """Parts per slot: about two programs per SM over the step's (slot, KV head) pairs, 1 to 64, and no more than
    a cache of ``positions`` fills (parts are whole blocks of BLOCK_N keys: past that they would all be empty,
    and the partition is the same without them)."""
    n = max(1, min(64, (2 * sms) // max(1, rows * kv_heads)))
    return n if positions is None else max(1, min(n, -(-positions // BLOCK_N)))


def decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor,
                     window: int | None, splits: int, counts: torch.Tensor) -> torch.Tensor:
    """Attention of q [b, H, 1, D] (slot i's queries in row i) over caches kc, vc [slots >= b, Hkv, P, D] at keys
    max(0, pos[i] - window + 1)..pos[i]; returns [b, H, 1, D] (a view of [b, 1, H, D]). ``counts``: int32 zeros,
    at least b x Hkv, made once outside traced code (the kernel counts finished parts there and leaves zeros)."""
    return _OPS["attn"](q, kc, vc, pos, counts, window or 0, splits, FUSED).transpose(1, 2)


def decode_attention_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kc: torch.Tensor,
                          vc: torch.Tensor, pos: torch.Tensor, write_pos: torch.Tensor, window: int | None,
                          splits: int, counts: torch.Tensor, heads: int) -> torch.Tensor:
    """``decode_attention`` from the fused q/k/v projection's output qkv [b, 1, Hkv x (G + 2) x D] (grouped as
    ``projections.QKVLayout``), unrotated: rotates q and k by cos, sin [b, ..., D] (each slot's position, "rotate
    half"), writes each slot's key and value into kc, vc at ``write_pos`` and attends keys up to ``pos`` with the
    new key from registers, all in the one kernel; returns [b, 1, H, D] for ``heads`` query heads H."""
    return _OPS["attn_rope"](qkv, cos, sin, kc, vc, pos, write_pos, counts, window or 0, splits, FUSED, heads)


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
    def split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, o_ptr,  # type: ignore[no-untyped-def]
                     count_ptr, cos_ptr, sin_ptr, wpos_ptr, s_cs, sq_b, sq_h, sk_b, sk_h, sk_p, window,
                     SCALE: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, SPLITS: tl.constexpr, D: tl.constexpr,
                     BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, FUSED: tl.constexpr,
                     GROUP: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr, ROPE: tl.constexpr):
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
        kbase = b * sk_b + kvh * sk_h
        if ROPE:
            # q_ptr is the fused q/k/v output [b, Hkv x (G + 2) x D] (projections.QKVLayout): this KV head's G query
            # heads, then its key and value, unrotated. Rotate q and the new key ("rotate half", in fp32, rounded
            # to the cache's dtype as rope.rotate does); part 0 writes the new key and value at the write position
            half = (rd + D // 2) % D
            sign = tl.where(rd < D // 2, -1.0, 1.0)
            cos = tl.load(cos_ptr + b * s_cs + rd)
            sin = tl.load(sin_ptr + b * s_cs + rd) * sign
            base = b * sq_b + kvh * (G + 2) * D
            qx = tl.load(q_ptr + base + rg[:, None] * D + rd[None, :], mask=g_ok[:, None], other=0.0)
            qy = tl.load(q_ptr + base + rg[:, None] * D + half[None, :], mask=g_ok[:, None], other=0.0)
            q = (qx.to(tl.float32) * cos[None, :] + qy.to(tl.float32) * sin[None, :]).to(qx.dtype)
            kx = tl.load(q_ptr + base + G * D + rd)
            ky = tl.load(q_ptr + base + G * D + half)
            k_new = (kx.to(tl.float32) * cos + ky.to(tl.float32) * sin).to(kx.dtype)
            v_new = tl.load(q_ptr + base + (G + 1) * D + rd)
            if part == 0:
                wpos = tl.load(wpos_ptr + b)
                tl.store(k_ptr + kbase + wpos * sk_p + rd, k_new.to(k_ptr.dtype.element_ty))
                tl.store(v_ptr + kbase + wpos * sk_p + rd, v_new.to(v_ptr.dtype.element_ty))
            has_new = (lo <= pos) & (pos < lo + chunk)  # the part holding the position: its key from registers
            hi = tl.minimum(hi, pos)
        else:
            q = tl.load(q_ptr + b * sq_b + qh[:, None] * sq_h + rd[None, :], mask=g_ok[:, None], other=0.0)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
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
        if ROPE:  # the new key, in the part that holds the position
            s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * SCALE
            m_new = tl.where(has_new, tl.maximum(m, s_new), m)
            alpha = tl.where(has_new, tl.exp2(m - m_new), 1.0)
            p_new = tl.where(has_new, tl.exp2(s_new - m_new), 0.0)
            s = s * alpha + p_new
            acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
            m = m_new
        rows = b * HKV * G + qh  # output rows b * H + h
        if FUSED and SPLITS == 1:  # the only part: normalise and write the output
            tl.store(o_ptr + rows[:, None] * D + rd[None, :], (acc / s[:, None]).to(o_ptr.dtype.element_ty),
                     mask=g_ok[:, None])
        else:
            out = rows * SPLITS + part  # [b, H, SPLITS]
            tl.store(m_ptr + out, m, mask=g_ok)
            tl.store(l_ptr + out, s, mask=g_ok)
            tl.store(acc_ptr + out[:, None] * D + rd[None, :], acc, mask=g_ok[:, None])
        if FUSED and SPLITS > 1:
            # every thread's stores issued before the count's release; the program that counts last acquires
            # them all, combines the G query heads' parts (as combine_kernel; loads past L1: .cg) and sets the
            # count back to 0 for the next call
            tl.debug_barrier()
            done = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel", scope="gpu")
            if done == SPLITS - 1:
                rh = tl.arange(0, GROUP)
                rs = tl.arange(0, BLOCK_S)
                rc = tl.arange(0, CHUNK)
                h_ok = rh < G
                heads = b * HKV * G + kvh * G + rh
                ok = h_ok[:, None] & (rs[None, :] < SPLITS)
                ms = tl.load(m_ptr + heads[:, None] * SPLITS + rs[None, :], mask=ok, other=float("-inf"),
                             cache_modifier=".cg")
                ls = tl.load(l_ptr + heads[:, None] * SPLITS + rs[None, :], mask=ok, other=0.0, cache_modifier=".cg")
                total = tl.where(h_ok, tl.max(ms, 1), 0.0)  # [GROUP] (0 past the G heads: no nan there)
                den = tl.sum(tl.where(ms > float("-inf"), tl.exp2(ms - total[:, None]), 0.0) * ls, 1)
                den = tl.where(h_ok, den, 1.0)
                o = tl.zeros([GROUP, D], tl.float32)
                for c in tl.static_range(0, SPLITS, CHUNK):  # CHUNK parts of every head at a time: [GROUP, CHUNK, D]
                    c_ok = h_ok[:, None] & (c + rc[None, :] < SPLITS)
                    mc = tl.load(m_ptr + heads[:, None] * SPLITS + c + rc[None, :], mask=c_ok, other=float("-inf"),
                                 cache_modifier=".cg")
                    ac = tl.load(acc_ptr + (heads[:, None, None] * SPLITS + c + rc[None, :, None]) * D
                                 + rd[None, None, :], mask=c_ok[:, :, None], other=0.0, cache_modifier=".cg")
                    w = tl.where(mc > float("-inf"), tl.exp2(mc - total[:, None]), 0.0)
                    o += tl.sum(w[:, :, None] * ac, 1)
                tl.store(o_ptr + heads[:, None] * D + rd[None, :], (o / den[:, None]).to(o_ptr.dtype.element_ty),
                         mask=h_ok[:, None])
                tl.store(count_ptr + bh, 0)

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

    def launch(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor, counts: torch.Tensor,
               window: int, splits: int, fused: bool, h: int, rope: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        b, d = q.shape[0], kc.shape[-1]
        hkv = kc.shape[1]
        g = h // hkv
        out = q.new_empty(b, 1, h, d)
        cos, sin, wpos = rope if rope is not None else (q, q, pos)
        if fused and splits == 1:  # no parts to keep: the kernel is compiled without them (q stands in, unread)
            m = lse = acc = q
        else:
            m = q.new_empty(b, h, splits, dtype=torch.float32)
            lse = q.new_empty(b, h, splits, dtype=torch.float32)
            acc = q.new_empty(b, h, splits, d, dtype=torch.float32)
        scale = d ** -0.5 * 1.4426950408889634  # to log2 units
        block_s = max(2, triton.next_power_of_2(splits))
        group = triton.next_power_of_2(g)
        wrap_triton(split_kernel)[(b * hkv, splits)](
            q, kc, vc, pos, m, lse, acc, out, counts, cos, sin, wpos, cos.stride(0), q.stride(0), q.stride(1),
            kc.stride(0), kc.stride(1), kc.stride(2), window, SCALE=scale, HKV=hkv, G=g, SPLITS=splits, D=d,
            BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_N=BLOCK_N,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FUSED=fused, GROUP=group, BLOCK_S=block_s,
            CHUNK=max(1, min(block_s, COMBINE_ROWS // group)), ROPE=rope is not None, num_warps=4, num_stages=2)
        if not fused:
            wrap_triton(combine_kernel)[(b * h,)](m, lse, acc, out, SPLITS=splits, BLOCK_S=block_s, D=d,
                                                  num_warps=4)
        return out

    # ``counts`` is written (each program adds 1, the last sets 0 again) but left as it came: no mutated args
    @triton_op("btune::decode_attention", mutates_args=())
    def attn(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor, counts: torch.Tensor,
             window: int, splits: int, fused: bool) -> torch.Tensor:
        if q.stride(-1) != 1:
            q = q.contiguous()
        return launch(q, kc, vc, pos, counts, window, splits, fused, q.shape[1], None)

    # kc and vc are written too (each slot's new key and value at its write position) but declared unmutated, as
    # counts: inductor would otherwise keep the caches functional (a copy of each); no op in the compiled step
    # reads a layer's cache but this one, which writes before it reads (decode_attention_rope's docstring)
    @triton_op("btune::decode_attention_rope", mutates_args=())
    def attn_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                  pos: torch.Tensor, write_pos: torch.Tensor, counts: torch.Tensor, window: int, splits: int,
                  fused: bool, heads: int) -> torch.Tensor:
        qkv = qkv.reshape(qkv.shape[0], -1)
        cos, sin = cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1)
        return launch(qkv, kc, vc, pos, counts, window, splits, fused, heads, (cos, sin, write_pos))

    _OPS["attn"] = attn
    _OPS["attn_rope"] = attn_rope
    return attn
