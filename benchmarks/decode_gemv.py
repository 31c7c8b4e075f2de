"""Decode's projections as hand-written Triton GEMVs against what inductor makes of the model's own code.

The batch-1 profile (docs/benchmarks.md, issue 24) puts the step's fixed cost in its small projections and in
the down projection, whose prologue computes SiLU(gate) x up. Here each piece of a llama-3.1-8b block at decode,
as the engine's compiled block computes it, side by side with one Triton kernel that does the same:

- ``qkv``: RMSNorm, then the fused q/k/v GEMV (6144 x 4096);
- ``o``: the output projection plus the residual (4096 x 4096);
- ``gate_up``: RMSNorm, then the fused gate/up GEMV (28672 x 4096);
- ``down``: SiLU(gate) x up read from the fused gate/up output (blocks of 64 rows), the down GEMV, the residual
  (4096 x 14336).

The kernel: each program owns ``BLOCK_N`` output rows for every batch row; it recomputes the RMS of its inputs
(a few KB from L2) or SiLU x up on the fly, so nothing is materialised between pieces, and adds the residual in
its epilogue. Timed as ``decode_profile.py`` times: ``--layers`` weight sets (more than L2) in one CUDA graph.
Each row: microseconds per layer, bandwidth, and the largest difference from the reference (bf16).

``--split``: instead of the Triton kernel, the piece split in two: its prologue (RMSNorm, or SiLU(gate) x up)
compiled alone and written out, then cuBLAS (``addmm`` with the residual, or ``mm``) on the written input,
against inductor's one fused kernel. Inductor inlines the prologue into its GEMV reduction, so every output
row recomputes it; the split computes it once.

usage: python benchmarks/decode_gemv.py [--batches 1,2,4,8] [--layers 8] [--split]
       TRITON_INTERPRET=1 python benchmarks/decode_gemv.py --device cpu   (the kernels' arithmetic, no timing)
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))

D, F_FF, NQ, NKV, HD, EPS = 4096, 14336, 32, 8, 128, 1e-5
GU_BLOCK = 64  # workloads.models.projections.gate_up_block(14336)

CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
           for n, k, w, s in ((8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 4, 2), (32, 256, 4, 3), (32, 128, 4, 4),
                              (64, 128, 8, 3), (16, 256, 8, 4), (8, 1024, 8, 2))]


@triton.jit
def _gemv(x_ptr, w_ptr, y_ptr, nw_ptr, res_ptr, M, N, K, stride_x, stride_r, stride_y, eps,
                NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr,
                GU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m, n] = (res[m, n] +) sum_k in(x)[m, k] w[n, k]; in(x): x, RMSNorm(x) * nw (NORM), or SiLU(gate) * up
    from a gate/up output in blocks of GU rows (SILU; K is then the width, x holds 2K)."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    n_ok = rn < N
    inv = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    if NORM:
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + rm[:, None] * stride_x + rk[None, :], mask=m_ok[:, None] & (rk[None, :] < K),
                         other=0.0).to(tl.float32)
            ss += tl.sum(xv * xv, axis=1)
        inv = 1.0 / tl.sqrt(ss / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        mk = m_ok[:, None] & k_ok[None, :]
        if SILU:
            gi = (rk // GU) * (2 * GU) + rk % GU
            g = tl.load(x_ptr + rm[:, None] * stride_x + gi[None, :], mask=mk, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + rm[:, None] * stride_x + gi[None, :] + GU, mask=mk, other=0.0).to(tl.float32)
            # as the model rounds: SiLU in bf16, then the product in bf16
            a = (g * tl.sigmoid(g)).to(tl.bfloat16).to(tl.float32) * u
            xv = a.to(tl.bfloat16).to(tl.float32)
        else:
            xv = tl.load(x_ptr + rm[:, None] * stride_x + rk[None, :], mask=mk, other=0.0).to(tl.float32)
            if NORM:  # F.rms_norm in fp32, to bf16, times the weight in bf16
                nw = tl.load(nw_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
                xv = ((xv * inv[:, None]).to(tl.bfloat16).to(tl.float32) * nw[None, :]).to(tl.bfloat16)
                xv = xv.to(tl.float32)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(xv[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    out = acc
    mn = m_ok[:, None] & n_ok[None, :]
    if RESIDUAL:
        out = tl.load(res_ptr + rm[:, None] * stride_r + rn[None, :], mask=mn, other=0.0).to(tl.float32) \
            + acc.to(tl.bfloat16).to(tl.float32)
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], out.to(tl.bfloat16), mask=mn)


gemv_kernel = triton.autotune(CONFIGS, key=["M", "N", "K", "NORM", "SILU"])(_gemv)


def gemv(x: torch.Tensor, w: torch.Tensor, norm_w: torch.Tensor | None = None, residual: torch.Tensor | None = None,
         silu: bool = False) -> torch.Tensor:
    """The kernel on x [M, K] (or [M, 2K] gate/up with ``silu``) and w [N, K]: y [M, N] in bf16."""
    m, n, k = x.shape[0], w.shape[0], w.shape[1]
    y = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    block_m = max(1, triton.next_power_of_2(m))
    res = residual if residual is not None else y
    args = (x, w, y, norm_w if norm_w is not None else w, res, m, n, k, x.stride(0), res.stride(0), y.stride(0), EPS)
    flags = {"NORM": norm_w is not None, "SILU": silu, "RESIDUAL": residual is not None, "BLOCK_M": block_m,
             "GU": GU_BLOCK}
    if x.device.type == "cpu":  # TRITON_INTERPRET=1: one configuration (autotuning needs a GPU)
        _gemv[(triton.cdiv(n, 16),)](*args, **flags, BLOCK_N=16, BLOCK_K=64)
    else:
        gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, **flags)
    return y


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), eps=EPS).type_as(x) * w


def silu_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def prologues() -> dict:
    """What each piece computes before its GEMV (None: the GEMV reads its input as it is), as the model's block
    computes it (workloads/models/blocks.py, projections.split_gate_up)."""
    from workloads.models.projections import split_gate_up

    return {"qkv": (lambda x, nw: rms(x, nw)), "o": None, "gate_up": (lambda x, nw: rms(x, nw)),
            "down": (lambda x, nw: silu_up(*split_gate_up(x, GU_BLOCK)))}


def references() -> dict:
    """Each piece whole: its prologue, the GEMV, and the residual where the block adds one there."""

    def whole(pro, residual: bool):
        def ref(x: torch.Tensor, w: torch.Tensor, nw: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            y = F.linear(pro(x, nw) if pro else x, w)
            return r + y if residual else y

        return ref

    return {name: whole(pro, PIECES[name][4]) for name, pro in prologues().items()}


PIECES = {"qkv": ((NQ + 2 * NKV) * HD, D, True, False, False), "o": (D, NQ * HD, False, False, True),
          "gate_up": (2 * F_FF, D, True, False, False), "down": (D, F_FF, False, True, True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--split", action="store_true", help="the prologue compiled alone, then cuBLAS (not Triton)")
    args = ap.parse_args()
    dev = args.device
    cpu = dev == "cpu"
    scale = 16 if cpu else 1  # the interpreter: the same code on 1/16 of each dimension
    refs = references()
    if not cpu:
        from decode_profile import graph_time
        from serve import copy_bandwidth

        from workloads.engine.engine import decode_options

        bw = copy_bandwidth("cuda")
        print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
              f"{datetime.date.today()}, copy bandwidth {bw / 1e12:.2f} TB/s\n")
        other = "split" if args.split else "Triton"
        print(f"| piece | N x K | batch | inductor us | {other} us | inductor GB/s | {other} GB/s | {other} / inductor "
              "| max abs diff |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator(device="cpu").manual_seed(0)
    for name, (n, k, norm, silu, residual) in PIECES.items():
        n, k = n // scale, k // scale
        layers = 1 if cpu else args.layers
        ws = [(torch.randn(n, k, generator=gen) * 0.02).to(dev, torch.bfloat16) for _ in range(layers)]
        nw = (1 + 0.1 * torch.randn(k, generator=gen)).to(dev, torch.bfloat16)
        for b in (int(x) for x in args.batches.split(",")):
            x = torch.randn(b, 2 * k if silu else k, generator=gen).to(dev, torch.bfloat16)
            r = torch.randn(b, n, generator=gen).to(dev, torch.bfloat16)
            ref = refs[name]
            want = ref(x, ws[0], nw, r)
            if args.split:
                pro = prologues()[name]
                pro_c = torch.compile(pro, options=decode_options("default"), dynamic=False) if pro and not cpu else pro

                def split(x, w, nw, r, pro_c=pro_c, residual=residual):
                    a = pro_c(x, nw) if pro_c else x
                    return torch.addmm(r, a, w.t()) if residual else a @ w.t()

                got = split(x, ws[0], nw, r)
            else:
                got = gemv(x, ws[0], nw if norm else None, r if residual else None, silu)
            diff = (got.float() - want.float()).abs().max().item()
            if cpu:
                print(f"{name} {n}x{k} batch {b}: max abs diff {diff:.4g} (reference max {want.abs().max():.3g})")
                continue
            torch._dynamo.reset()
            compiled = torch.compile(ref, options=decode_options("default"), dynamic=False)

            def inductor(i: int, c=compiled, x=x, r=r, ws=ws, nw=nw) -> torch.Tensor:
                return c(x, ws[i % len(ws)], nw, r)

            def ours(i: int, x=x, r=r, ws=ws, nw=nw if norm else None, res=r if residual else None,
                     silu=silu) -> torch.Tensor:
                if args.split:
                    return split(x, ws[i % len(ws)], nw, r)
                return gemv(x, ws[i % len(ws)], nw, res, silu)

            t_ind, t_tri = graph_time(inductor, reps=layers), graph_time(ours, reps=layers)
            nbytes = n * k * 2
            print(f"| {name} | {n} x {k} | {b} | {t_ind * 1000:.1f} | {t_tri * 1000:.1f} | "
                  f"{nbytes / t_ind / 1e6:,.0f} | {nbytes / t_tri / 1e6:,.0f} | {t_ind / t_tri:.2f}x | {diff:.3g} |",
                  flush=True)


if __name__ == "__main__":
    main()
