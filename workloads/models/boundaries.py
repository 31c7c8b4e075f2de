"""RMSNorm and SwiGLU's SiLU(gate) x up as Triton kernels that inductor cannot inline (GPU inference only).

At batch 1 inductor turns each projection into a multiply-and-sum reduction and inlines the pointwise work before
it into that reduction, so every output row recomputes the RMSNorm of its input (q/k/v, gate/up) or SiLU(gate) x
up (down). On the H200 the gate/up and down projections then ran at 83% and 60% of the copy bandwidth, against
about 100% when their inputs were written once (docs/benchmarks.md, issue 24). These ops are such boundaries:
each writes its output once, behind ``torch.library.triton_op``, where inductor sees a kernel it must call.

They run where there is no autograd and the tensor is on a GPU with Triton; elsewhere (training, the CPU) the
eager expressions run. Both round as the eager bf16 expressions do.
"""

from __future__ import annotations

from typing import Any

import torch

#: whether GPU inference uses the kernels (benchmarks/decode_ab.py switches them to measure them)
ENABLED = True
_OPS: dict[str, Any] = {}
_MAX_ROWS = 65535  # the kernels' second grid dimension (swiglu) and first (rms_norm), kept simple


def usable(x: torch.Tensor) -> bool:
    """Whether ``x`` takes the kernels: prepared, enabled, on a GPU, no autograd through it."""
    return (ENABLED and bool(_OPS.get("ready")) and x.is_cuda and not (torch.is_grad_enabled() and x.requires_grad)
            and x.numel() // max(1, x.shape[-1]) <= _MAX_ROWS)


def norm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the RMSNorm kernel takes ``x`` and ``weight``: ``usable``, one dtype, a row that fits one program."""
    return usable(x) and weight.dtype == x.dtype and x.shape[-1] <= 16384


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The kernel's RMSNorm (``norms.rms_norm`` calls it where ``norm_usable``)."""
    return _OPS["rms_norm"](x, weight, eps)


def swiglu(y: torch.Tensor, block: int) -> torch.Tensor:
    """The kernel's SiLU(gate) x up [..., f] from a fused gate/up output [..., 2 f] (``blocks.MLP`` calls it where
    ``usable``)."""
    return _OPS["swiglu"](y, block)


def prepare() -> bool:
    """Define and register the kernels (once, outside traced code: defining them while dynamo traces a block
    would split its graph). False where Triton or a GPU for it is missing (torch's ``has_triton``); the eager
    expressions then run."""
    if "ready" in _OPS:
        return bool(_OPS["ready"])
    from torch.utils._triton import has_triton

    _OPS["ready"] = has_triton()
    if not _OPS["ready"]:
        return False
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton


    @triton.jit
    def rms_kernel(x_ptr, w_ptr, o_ptr, d, EPS: tl.constexpr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        ok = i < d
        x = tl.load(x_ptr + row * d + i, mask=ok, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / d + EPS)
        y = (x * inv).to(o_ptr.dtype.element_ty).to(tl.float32) * tl.load(w_ptr + i, mask=ok).to(tl.float32)
        tl.store(o_ptr + row * d + i, y.to(o_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def swiglu_kernel(y_ptr, o_ptr, f, GU: tl.constexpr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(1)
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < f
        gi = row * 2 * f + (i // GU) * (2 * GU) + i % GU
        g = tl.load(y_ptr + gi, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(y_ptr + gi + GU, mask=ok, other=0.0).to(tl.float32)
        a = (g * tl.sigmoid(g)).to(o_ptr.dtype.element_ty).to(tl.float32) * u
        tl.store(o_ptr + row * f + i, a.to(o_ptr.dtype.element_ty), mask=ok)

    @triton_op("btune::rms_norm", mutates_args=())
    def rms_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()
        d = x.shape[-1]
        out = torch.empty_like(x)
        block = triton.next_power_of_2(d)
        wrap_triton(rms_kernel)[(x.numel() // d,)](x, weight, out, d, EPS=eps, BLOCK=block,
                                                   num_warps=min(16, max(4, block // 512)))
        return out

    @triton_op("btune::swiglu", mutates_args=())
    def swiglu_op(y: torch.Tensor, block: int) -> torch.Tensor:
        y = y.contiguous()
        f = y.shape[-1] // 2
        out = y.new_empty(*y.shape[:-1], f)
        wrap_triton(swiglu_kernel)[(triton.cdiv(f, 1024), y.numel() // (2 * f))](y, out, f, GU=block, BLOCK=1024)
        return out

    _OPS.update(rms_norm=rms_op, swiglu=swiglu_op, ready=True)
    return True
