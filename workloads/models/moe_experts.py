"""Routed SwiGLU experts, two implementations of one function.

``loop``: the per-expert Python loop a naive script writes (``torch.where`` per expert, so one host
sync per expert on a GPU). ``grouped``: sort the token-expert assignments by expert and run each
projection as one grouped GEMM: ``torch._grouped_mm`` where it has a fast
kernel, else one padded ``torch.bmm`` over [E, max tokens per expert, d].

Weights are shared by both: ``w13`` [E, 2F, d] (gate and up projections fused) and ``w2`` [E, d, F].
An assignment whose expert index is ``E`` (a capacity drop) contributes nothing. Outputs are summed
in fp32 in expert order, so both implementations add each token's contributions in the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMPLS: tuple[str, ...] = ("loop", "grouped")
GEMMS: tuple[str, ...] = ("grouped_mm", "bmm")


def grouped_gemm_backend(device: torch.device, dtype: torch.dtype, d: int, f: int) -> tuple[str, str]:
    """Which GEMM the grouped implementation uses here, and why.

    ``grouped_mm`` needs torch's fast grouped kernel: CUDA, compute capability 9.x or 10.x (elsewhere
    torch falls back to a loop of matmuls), bf16, and a probe forward + backward at this width that
    runs. Otherwise ``bmm`` (padded batched matmul).
    """
    if device.type != "cuda":
        return "bmm", f"grouped: padded bmm (torch's grouped GEMM kernels are CUDA-only; device is {device.type})"
    if not hasattr(torch, "_grouped_mm"):
        return "bmm", f"grouped: padded bmm (torch {torch.__version__} has no torch._grouped_mm)"
    cc = torch.cuda.get_device_capability(device)
    if cc[0] not in (9, 10):
        return "bmm", (f"grouped: padded bmm (torch._grouped_mm has a fast kernel on compute capability 9.x/10.x, "
                       f"this GPU is {cc[0]}.{cc[1]})")
    if dtype != torch.bfloat16:
        return "bmm", f"grouped: padded bmm (torch._grouped_mm's fast kernel is bf16-only, dtype is {dtype})"
    try:
        bad = _probe_grouped_mm(device, dtype, d, f)
    except (RuntimeError, TypeError, AttributeError) as exc:
        return "bmm", f"grouped: padded bmm (torch._grouped_mm probe failed: {str(exc).splitlines()[0][:160]})"
    if bad:
        return "bmm", f"grouped: padded bmm (torch._grouped_mm probe disagrees with per-group matmuls: {bad})"
    name = torch.cuda.get_device_name(device)
    return "grouped_mm", f"grouped: torch._grouped_mm (bf16 grouped GEMM on {name}, cc {cc[0]}.{cc[1]})"


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype, d: int, f: int) -> str:
    """Run torch._grouped_mm forward and backward on unaligned and empty groups at this width and compare
    with per-group matmuls; the name of what disagrees ('' when all agree)."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(37, d, device=device, dtype=dtype, generator=gen).requires_grad_()
    w = torch.randn(3, 2 * f, d, device=device, dtype=dtype, generator=gen).requires_grad_()
    y = torch._grouped_mm(x, w.transpose(-2, -1), offs=torch.tensor([5, 5, 37], device=device, dtype=torch.int32))
    g = torch.randn(y.shape, device=device, dtype=dtype, generator=gen)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    ref = torch.cat([x[:5] @ w[0].T, x[5:] @ w[2].T])
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    for name, a, b in (("output", y, ref), ("input grad", gx, rx), ("weight grad", gw, rw)):
        err = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)).item()
        if not err < 2e-2:
            return f"{name} relative error {err:.3g}"
    return ""


def expert_counts(indices: torch.Tensor, n: int) -> torch.Tensor:
    """How many of ``indices`` equal each of 0..n-1 (int64), by scatter_add: a static shape, so no sync
    and no graph break under torch.compile (bincount's output size depends on the data)."""
    flat = indices.flatten()
    return torch.zeros(n, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


class RoutedExperts(nn.Module):
    """``n_experts`` SwiGLU experts of width ``d_ff``; ``impl`` and ``gemm`` are plain attributes."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, impl: str = "grouped", gemm: str = "bmm") -> None:
        super().__init__()
        self.n_experts, self.d_ff = n_experts, d_ff
        self.impl, self.gemm = impl, gemm
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * d_ff, d_model))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.reset_parameters(0.02, 0.02)

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.trunc_normal_(self.w13, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.w2, std=out_std, a=-3 * out_std, b=3 * out_std)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor,
                dropping: bool = True) -> torch.Tensor:
        """sum_j gates[t, j] * expert[indices[t, j]](x[t]) for x [N, d], indices and gates [N, k].

        ``dropping=False`` promises no index equals E (saves two masks in the grouped path).
        """
        if self.impl not in IMPLS:
            raise ValueError(f"expert impl {self.impl!r} is not one of {', '.join(IMPLS)}")
        out = self._loop(x, indices, gates) if self.impl == "loop" else self._grouped(x, indices, gates, dropping)
        return out.to(x.dtype)

    def _swiglu(self, h: torch.Tensor) -> torch.Tensor:
        a, b = h.chunk(2, dim=-1)
        return F.silu(a) * b

    def _loop(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        for e in range(self.n_experts):
            tok, slot = torch.where(indices == e)
            if tok.numel() == 0:
                continue
            h = self._swiglu(x[tok] @ self.w13[e].T)
            y = h @ self.w2[e].T
            out.index_add_(0, tok, y * gates[tok, slot, None])
        return out

    def _grouped(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, dropping: bool) -> torch.Tensor:
        n_exp, k = self.n_experts, indices.shape[1]
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        expert = flat[order]  # sorted; dropped assignments (index E) last
        counts = expert_counts(flat, n_exp + 1)[:n_exp]
        ends = counts.cumsum(0)
        tok = order // k
        xs = x[tok]
        # grouped_mm leaves rows past the last group unwritten, in its outputs and in its input gradients:
        # mask them where they enter (gradient) and leave (values), before any multiply can spread NaN.
        valid = (expert < n_exp)[:, None] if dropping else None
        if valid is not None:
            xs = torch.where(valid, xs, 0.0)
        if self.gemm == "grouped_mm":
            offs = ends.to(torch.int32)
            h = self._swiglu(torch._grouped_mm(xs, self.w13.transpose(-2, -1), offs=offs))
            ys = torch._grouped_mm(h, self.w2.transpose(-2, -1), offs=offs)
        else:
            ys = self._padded_bmm(xs, expert, counts, ends)
        if valid is not None:
            ys = torch.where(valid, ys, 0.0)
        ys = ys * gates.flatten()[order, None]
        return torch.zeros(x.shape, device=x.device, dtype=torch.float32).index_add_(0, tok, ys.float())

    def _padded_bmm(self, xs: torch.Tensor, expert: torch.Tensor, counts: torch.Tensor,
                    ends: torch.Tensor) -> torch.Tensor:
        """Scatter the sorted rows into [E, cmax, d] (zero padding), two bmm's, gather back."""
        n_exp, d = self.n_experts, xs.shape[1]
        cmax = max(int(counts.max()), 1)  # one host sync
        pos = torch.arange(xs.shape[0], device=xs.device) - (ends - counts)[expert.clamp(max=n_exp - 1)]
        trash = n_exp * cmax
        dest = torch.where(expert < n_exp, expert * cmax + pos, trash)
        buf = xs.new_zeros(trash + 1, d).index_copy(0, dest, xs)
        h = self._swiglu(torch.bmm(buf[:trash].view(n_exp, cmax, d), self.w13.transpose(1, 2)))
        y = torch.bmm(h, self.w2.transpose(1, 2)).reshape(trash, d)
        return torch.cat([y, y.new_zeros(1, d)])[dest]
