"""Each block's projections, described once: the fused q/k/v weight and the fused gate/up weight.

The model, tensor parallelism (training's DTensor plans and the serving engine's row split), the checkpoint loader
and tp-validate read these layouts; nothing else knows where q, k or v sit in the fused weight (FP8 converts a
fused projection as any other linear).

- **q/k/v** (``Attention.wqkv``, [groups x (rep + 2) x head_dim, d]): grouped by KV head, as Megatron-LM lays out
  its fused QKV. Group g holds the ``rep = n_heads / n_kv_heads`` query heads that share KV head g, then key
  head g, then value head g. Any contiguous split of the rows at group boundaries (a tensor-parallel shard:
  ``Shard(0)``) is whole groups, so a rank's slice is its own heads with no re-ordering.
- **gate/up** (``MLP.w13``, [2 x d_ff, d]): rows interleaved in blocks of ``gate_up_block(d_ff)`` (64 where
  8 x 64 divides d_ff, else a smaller power of two): gate rows 0..63, up rows 0..63, gate rows 64..127, ... A
  contiguous split at a multiple of two blocks (a tensor-parallel shard where the block divides d_ff / tp) is
  whole pairs of blocks. Blocks, not single rows, so a decode step's down projection reads SiLU(gate) x up in
  contiguous runs (which layout is fastest on the H200 is still open: docs/benchmarks.md, issue 24).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PARTS = ("q", "k", "v")


@dataclass(frozen=True)
class QKVLayout:
    """Where q, k and v sit in a fused q/k/v weight (rows) or output (last dim); module docstring."""

    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def rep(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def rows(self) -> int:
        """Rows of the fused weight: (n_heads + 2 n_kv_heads) x head_dim."""
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    def groups(self, rows: int) -> int:
        """KV groups (KV heads) in ``rows`` rows of the fused weight (a tensor-parallel rank's slice)."""
        return rows // ((self.rep + 2) * self.head_dim)

    def _slot(self, part: str) -> slice:
        i = PARTS.index(part)
        start = (0, self.rep, self.rep + 1)[i]
        return slice(start, start + (self.rep if part == "q" else 1))

    def part(self, fused: torch.Tensor, part: str) -> torch.Tensor:
        """A view of ``part``'s rows of a fused weight [rows, ...] or bias [rows]: [n_kv_heads, heads, head_dim, ...]
        (heads: rep for q, 1 for k and v); copying into it fills the fused tensor."""
        grouped = fused.view(self.n_kv_heads, self.rep + 2, self.head_dim, *fused.shape[1:])
        return grouped[:, self._slot(part)]

    def get(self, fused: torch.Tensor, part: str) -> torch.Tensor:
        """``part``'s rows as a separate tensor [heads x head_dim, ...] (a checkpoint's q_proj, k_proj, v_proj)."""
        return self.part(fused, part).reshape(-1, *fused.shape[1:])

    def put(self, fused: torch.Tensor, part: str, value: torch.Tensor) -> None:
        """Copy a separate projection [heads x head_dim, ...] into ``part``'s rows of ``fused`` (in place)."""
        view = self.part(fused, part)
        view.copy_(value.reshape(view.shape))

    def fuse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The fused weight (or bias) from separate q [n_heads x hd, ...], k, v [n_kv_heads x hd, ...]."""
        out = q.new_empty(self.rows, *q.shape[1:])
        for name, t in zip(PARTS, (q, k, v), strict=True):
            self.put(out, name, t)
        return out

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [..., H, hd], k and v [..., Hkv, hd] from a fused projection's output [..., groups x (rep + 2) x hd]:
        any whole number of groups (a tensor-parallel rank holds its own). k and v are views; q is a copy where
        rep > 1."""
        g = y.view(*y.shape[:-1], -1, self.rep + 2, self.head_dim)
        q = g[..., : self.rep, :].flatten(-3, -2)
        return q, g[..., self.rep, :], g[..., self.rep + 1, :]


GATE_UP_BLOCK = 64


def gate_up_block(d_ff: int) -> int:
    """Rows per block of the gate/up interleave for an MLP ``d_ff`` wide: 64, or the largest power of two below
    that splits into whole blocks under tensor parallelism up to 8 (d_ff 64: 8; d_ff 6: 1)."""
    block = GATE_UP_BLOCK
    while block > 1 and d_ff % (8 * block):
        block //= 2
    return block


def gate_up_part(fused: torch.Tensor, i: int) -> torch.Tensor:
    """A view of the gate (i=0) or up (i=1) rows of a whole fused gate/up weight [2 d_ff, ...], [d_ff, ...] in
    blocks ([d_ff / block, block, ...]: copy into it, or ``reshape`` it)."""
    block = gate_up_block(fused.shape[0] // 2)
    return fused.view(-1, 2, block, *fused.shape[1:])[:, i]


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The fused gate/up weight (or bias) from gate and up [d_ff, ...]."""
    block = gate_up_block(gate.shape[0])
    pair = torch.stack([gate.view(-1, block, *gate.shape[1:]), up.view(-1, block, *up.shape[1:])], dim=1)
    return pair.reshape(-1, *gate.shape[1:])


def split_gate_up(y: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) [..., f] from a fused gate/up output [..., 2 f] in blocks of ``block`` (any whole number of block
    pairs: a tensor-parallel rank's own)."""
    pairs = y.view(*y.shape[:-1], -1, 2, block)
    return pairs[..., 0, :].flatten(-2), pairs[..., 1, :].flatten(-2)


def gate_up_refusal(d_ff: int, world: int) -> str | None:
    """Why a ``world``-way row split of a fused gate/up weight of an MLP ``d_ff`` wide would break its blocks (None:
    it would not)."""
    block = gate_up_block(d_ff)
    if d_ff % (world * block) == 0:
        return None
    blocks = f" into whole blocks of {block} gate/up rows" if block > 1 else ""
    return f"--tp {world} must divide the MLP width ({d_ff}){blocks}"
