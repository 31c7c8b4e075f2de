"""Attention backends: SDPA with a forced kernel, or FlexAttention with block masks.

Backends: ``auto`` (SDPA picks), ``flash`` / ``cudnn`` / ``efficient`` / ``math`` (SDPA with that
kernel forced via ``sdpa_kernel``), ``flex`` (compiled FlexAttention). Causal attention always; an
optional sliding ``window`` (a query attends to itself and the ``window - 1`` keys before it) is a
block mask under flex and an explicit boolean mask under SDPA.

Queries are the last ``q_len`` positions of the ``kv_len`` keys (bottom-right aligned), which covers
training (q_len == kv_len), chunked prefill and one-token decode with a KV cache.
"""

from __future__ import annotations

import functools
import shutil
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

BACKENDS: tuple[str, ...] = ("auto", "flash", "cudnn", "efficient", "math", "flex")
_SDPA: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_CHOICE_NAMES = {int(v): k for k, v in _SDPA.items()}
FLEX_BLOCK = 128

Mask = torch.Tensor | BlockMask | None

#: flex_attention compiled, by static shapes, and the block-mask builder kept out of traced code: made on first use
#: (``compiled_flex``, a flex kernel's constructor), since ``torch.compile`` and ``torch.compiler.disable`` load
#: torch's compiler (seconds of start-up that runs without flex never need).
_FLEX: dict[Any, Any] = {}


def compiled_flex(static: bool) -> Any:
    """flex_attention compiled (it must run compiled). CPU: static shapes (dynamic shapes broke the CPU flex
    template in torch 2.13). CUDA: automatic dynamic shapes, so decode over a growing cache does not recompile
    every 128 tokens. Made outside any traced code: a flex kernel's and the decode step's constructors call it
    first."""
    fn = _FLEX.get(static)
    if fn is None:
        fn = _FLEX[static] = torch.compile(flex_attention, dynamic=False if static else None)
    return fn


def check(backend: str, window: int | None) -> None:
    """Refuse an unknown backend or a window below 1 (ValueError), without building a kernel."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if window is not None and window < 1:
        raise ValueError(f"attention window must be >= 1, got {window}")


@dataclass(frozen=True)
class AttentionKernel:
    """How attention runs: backend, optional sliding window, and whether k/v heads are expanded for GQA."""

    backend: str = "auto"
    window: int | None = None
    expand_kv: bool = False

    def __post_init__(self) -> None:
        check(self.backend, self.window)
        if self.backend == "flex":  # outside any traced code (a compiled model inlines them)
            compiled_flex(True), compiled_flex(False)
            # block masks are built eagerly, never traced (a graph break in a compiled model)
            _FLEX.setdefault("mask", torch.compiler.disable(_make_block_mask))

    @property
    def kv_multiple(self) -> int:
        """Key lengths this kernel wants, as a multiple (a KV cache hands out views this long)."""
        return FLEX_BLOCK if self.backend == "flex" else 1

    def mask(self, q_len: int, kv_len: int, device: torch.device) -> Mask:
        """The mask for ``q_len`` queries at the end of ``kv_len`` keys; None where ``is_causal`` suffices."""
        if self.backend == "flex":
            q_pad, kv_pad = _flex_lengths(q_len, kv_len, torch.device(device))
            return _FLEX["mask"](q_len, q_pad, kv_len, kv_pad, self.window, str(device))
        if self.window is None and (q_len == kv_len or q_len == 1):
            return None
        return causal_mask(q_len, kv_len, self.window, device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
        """Attention over q [B, H, Tq, D] and k, v [B, Hkv, Tk, D]; returns [B, H, Tq, D]."""
        gqa = q.shape[1] != k.shape[1]
        if self.backend == "flex":
            assert isinstance(mask, BlockMask)
            q_len, (q_pad, kv_pad) = q.shape[2], mask.seq_lengths
            if kv_pad > k.shape[2]:
                k, v = F.pad(k, (0, 0, 0, kv_pad - k.shape[2])), F.pad(v, (0, 0, 0, kv_pad - v.shape[2]))
            if q_pad > q_len:
                q = F.pad(q, (0, 0, 0, q_pad - q_len))
            flex = compiled_flex(q.device.type == "cpu")
            return flex(q, k, v, block_mask=mask, enable_gqa=gqa)[:, :, :q_len]
        if gqa and self.expand_kv:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            gqa = False
        is_causal = mask is None and q.shape[2] == k.shape[2] and q.shape[2] > 1
        ctx = sdpa_kernel(_SDPA[self.backend]) if self.backend != "auto" else nullcontext()
        with ctx:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | torch.Tensor | None) -> torch.Tensor:
    """Whether a query at ``q_pos`` attends the key at ``k_pos`` (broadcast): causal, within the window if any."""
    allowed = k_pos <= q_pos
    return allowed & (q_pos - k_pos < window) if window is not None else allowed


def causal_mask(q_len: int, kv_len: int, window: int | None, device: torch.device | str) -> torch.Tensor:
    """Boolean [q_len, kv_len] mask, True where a query may attend (bottom-right aligned, optional window)."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return visible(q_pos, torch.arange(kv_len, device=device)[None, :], window)


def _flex_lengths(q_len: int, kv_len: int, device: torch.device) -> tuple[int, int]:
    """Query and key lengths flex runs on; the padding is masked out (keys) or sliced off (queries).

    Keys are padded up to a multiple of 128: static shapes then change only every 128 tokens during
    decode, and torch 2.13's compiled CPU flex kernel, which returns wrong values for some other
    lengths (seen with 8, 24, 40, 56, 72), is avoided. On CUDA, 1 < q_len < 128 is padded to 128:
    torch 2.11 finds no kernel for such lengths ("NoValidChoicesError"); one-token decode is fine.
    """
    kv = -(-kv_len // FLEX_BLOCK) * FLEX_BLOCK
    q = FLEX_BLOCK if device.type == "cuda" and 1 < q_len < FLEX_BLOCK else q_len
    return q, kv


@functools.lru_cache(maxsize=64)
def _make_block_mask(q_len: int, q_pad: int, kv_len: int, kv_pad: int, window: int | None, device: str) -> BlockMask:
    # Offsets live in tensors, not Python ints: compiled flex guards on closure constants and would
    # recompile for every new length (and fall back to eager after the recompile limit).
    offset = torch.tensor(kv_len - q_len, device=device)
    limit = torch.tensor(kv_len, device=device)
    span = torch.tensor(window if window is not None else kv_len + 1, device=device)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return visible(q_idx + offset, kv_idx, span) & (kv_idx < limit)

    return create_block_mask(mask_mod, None, None, q_pad, kv_pad, device=device)


def resolve_backend(
    name: str,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    n_heads: int = 8,
    n_kv_heads: int | None = None,
    head_dim: int = 64,
    seq_len: int = 256,
    window: int | None = None,
    training: bool = False,
) -> tuple[str, str]:
    """What will run for backend ``name`` on this device and shape: (kernel name, reason).

    Raises ValueError with a one-line reason when a forced kernel cannot run.
    """
    ran, reason, _ = _probe(
        name, torch.device(device), dtype, n_heads, n_kv_heads or n_heads, head_dim, seq_len, window, training
    )
    return ran, reason


def make_kernel(
    name: str,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    n_heads: int = 8,
    n_kv_heads: int | None = None,
    head_dim: int = 64,
    seq_len: int = 256,
    window: int | None = None,
    training: bool = False,
) -> tuple[AttentionKernel, str]:
    """An AttentionKernel for ``name`` checked against this device and shape, plus the reason text."""
    _, reason, expand = _probe(
        name, torch.device(device), dtype, n_heads, n_kv_heads or n_heads, head_dim, seq_len, window, training
    )
    return AttentionKernel(name, window, expand), reason


def _probe(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    seq_len: int,
    window: int | None,
    training: bool,
) -> tuple[str, str, bool]:
    check(name, window)  # not AttentionKernel(...): flex's would load the compiler (seconds) to say yes
    shape = f"{device.type} {str(dtype).removeprefix('torch.')} head_dim {head_dim}"
    shape += f", window {window}" if window is not None else ", causal"
    if name == "flex":
        return "flex", _flex_reason(device, head_dim, training, shape), False
    if name in ("cudnn", "efficient") and device.type != "cuda":
        raise ValueError(f"{name}: the SDPA {_SDPA[name].name} kernel is CUDA-only, device is {device.type}")
    gqa = n_heads != n_kv_heads
    q = torch.zeros(1, n_heads, seq_len, head_dim, device=device, dtype=dtype, requires_grad=training)
    mask = causal_mask(seq_len, seq_len, window, device) if window is not None else None
    seen: list[str] = []
    for expand in (False, True) if gqa else (False,):
        kv_heads = n_heads if expand else n_kv_heads
        k = torch.zeros(1, kv_heads, seq_len, head_dim, device=device, dtype=dtype, requires_grad=training)
        ctx = sdpa_kernel(_SDPA[name]) if name != "auto" else nullcontext()
        with ctx, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                choice = torch._fused_sdp_choice(
                    q, k, k, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa and not expand
                )
            except RuntimeError as e:
                choice, caught = -1, [*caught, warnings.WarningMessage(str(e), RuntimeWarning, "", 0)]
        for w in caught:  # torch explains per kernel: "X kernel not used because:" then the reasons
            line = str(w.message).strip().split(" (Triggered internally")[0].strip()
            noise = line.endswith(":") or "runtime disabled" in line or line.startswith("No available kernel")
            if line and not noise and line not in seen:
                seen.append(line)
        ran = _CHOICE_NAMES.get(int(choice))
        # auto: prefer a fused kernel on expanded heads to math with native GQA
        if ran is not None and not (name == "auto" and ran == "math" and gqa):
            how = " (k/v heads expanded for GQA)" if expand else ""
            cpu = " (the CPU kernel)" if device.type == "cpu" and ran == "flash" else ""
            verb = "SDPA picks" if name == "auto" else "SDPA forced to"
            return ran, f"{name}: {verb} {ran}{cpu}{how} for {shape}", expand
    if name == "auto":
        return "math", f"auto: SDPA picks math for {shape}", False
    why = "; ".join(seen)[:300] if seen else "torch reports no usable kernel"
    raise ValueError(f"{name}: the SDPA {_SDPA[name].name} kernel cannot run for {shape}: {why}")


def _flex_reason(device: torch.device, head_dim: int, training: bool, shape: str) -> str:
    if head_dim < 16:
        raise ValueError(f"flex: FlexAttention needs head_dim >= 16, got {head_dim}")
    if device.type == "cpu":
        if training:
            raise ValueError("flex: FlexAttention has no backward on CPU; use auto or math to train on CPU")
        if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
            raise ValueError("flex: compiling FlexAttention on CPU needs a C++ compiler (none on PATH)")
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError("flex: compiling FlexAttention on CUDA needs triton, which is not importable")
    else:
        raise ValueError(f"flex: FlexAttention is not supported on {device.type}")
    return f"flex: compiled FlexAttention with block masks for {shape}"
