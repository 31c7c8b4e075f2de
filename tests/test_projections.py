"""The fused projections' layouts (workloads.models.projections), checked against layouts written out here by hand
with explicit loops over KV groups and heads, not through projections.py's own code: q/k/v grouped by KV head
(group g: its rep query heads, then key head g, then value head g), gate/up rows interleaved; a contiguous
tensor-parallel split of either is each rank's own heads / pairs; and a model with fused weights computes what
separate q, k, v, gate and up matrices compute."""

import math

import pytest
import torch
import torch.nn.functional as F

from workloads.models.config import ModelConfig
from workloads.models.projections import (
    QKVLayout,
    fuse_gate_up,
    gate_up_block,
    gate_up_part,
    gate_up_refusal,
    split_gate_up,
)
from workloads.models.transformer import Transformer

H, HKV, HD, D = 6, 2, 4, 24  # rep 3


def rows(t: torch.Tensor, head: int, hd: int = HD) -> torch.Tensor:
    return t[head * hd:(head + 1) * hd]


def hand_fuse(q, k, v, n_heads=H, n_kv=HKV, hd=HD):
    """The grouped layout, by hand: for each KV group g, query heads g*rep..g*rep+rep-1, key head g, value head g."""
    rep = n_heads // n_kv
    out = []
    for g in range(n_kv):
        for r in range(rep):
            out.append(rows(q, g * rep + r, hd))
        out.append(rows(k, g, hd))
        out.append(rows(v, g, hd))
    return torch.cat(out)


def hand_unfuse(fused, n_heads=H, n_kv=HKV, hd=HD):
    """q, k, v out of a grouped fused weight (or bias), by hand."""
    rep = n_heads // n_kv
    q, k, v = [], [], []
    i = 0
    for _g in range(n_kv):
        for _r in range(rep):
            q.append(rows(fused, i, hd))
            i += 1
        k.append(rows(fused, i, hd))
        v.append(rows(fused, i + 1, hd))
        i += 2
    return torch.cat(q), torch.cat(k), torch.cat(v)


def hand_gate_up(gate, up, block):
    out = []
    for i in range(0, gate.shape[0], block):
        out += [gate[i:i + block], up[i:i + block]]
    return torch.cat(out)


def qkv(extra=(D,)):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(H * HD, *extra, generator=gen), torch.randn(HKV * HD, *extra, generator=gen),
            torch.randn(HKV * HD, *extra, generator=gen))


@pytest.mark.parametrize("extra", [(D,), ()], ids=["weight", "bias"])
def test_qkv_fuse_get_put_round_trip(extra):
    layout = QKVLayout(H, HKV, HD)
    q, k, v = qkv(extra)
    fused = layout.fuse(q, k, v)
    assert fused.shape == (layout.rows, *extra) and layout.rows == (H + 2 * HKV) * HD
    assert torch.equal(fused, hand_fuse(q, k, v))
    for name, want in zip("qkv", (q, k, v), strict=True):
        assert torch.equal(layout.get(fused, name), want)
    filled = torch.zeros_like(fused)
    for name, t in zip("qkv", (q, k, v), strict=True):
        layout.put(filled, name, t)
    assert torch.equal(filled, fused)


def test_qkv_split_of_the_fused_output_is_each_projection_per_head():
    layout = QKVLayout(H, HKV, HD)
    q, k, v = qkv()
    x = torch.randn(2, 5, D)
    sq, sk, sv = layout.split(x @ layout.fuse(q, k, v).T)
    assert sq.shape == (2, 5, H, HD) and sk.shape == sv.shape == (2, 5, HKV, HD)
    torch.testing.assert_close(sq, (x @ q.T).view(2, 5, H, HD))
    torch.testing.assert_close(sk, (x @ k.T).view(2, 5, HKV, HD))
    torch.testing.assert_close(sv, (x @ v.T).view(2, 5, HKV, HD))


def test_a_two_way_row_split_is_each_ranks_own_kv_groups():
    layout = QKVLayout(H, HKV, HD)
    q, k, v = qkv()
    fused = layout.fuse(q, k, v)
    halves = fused.chunk(2)  # Shard(0) over 2 ranks
    rep, per_rank = H // HKV, HKV // 2
    x = torch.randn(3, D)
    for rank, half in enumerate(halves):
        groups = range(rank * per_rank, (rank + 1) * per_rank)
        my_q = torch.cat([rows(q, g * rep + r) for g in groups for r in range(rep)])
        my_k = torch.cat([rows(k, g) for g in groups])
        my_v = torch.cat([rows(v, g) for g in groups])
        assert torch.equal(half, hand_fuse(my_q, my_k, my_v, H // 2, HKV // 2))
        local = QKVLayout(H // 2, HKV // 2, HD)
        assert torch.equal(local.get(half, "q"), my_q)
        assert torch.equal(local.get(half, "k"), my_k)
        assert torch.equal(local.get(half, "v"), my_v)
        sq, sk, sv = layout.split(x @ half.T)  # the full model's layout reads a rank's whole groups
        torch.testing.assert_close(sq, (x @ my_q.T).view(3, -1, HD))
        torch.testing.assert_close(sk, (x @ my_k.T).view(3, -1, HD))
        torch.testing.assert_close(sv, (x @ my_v.T).view(3, -1, HD))


@pytest.mark.parametrize(("f", "block"), [(6, 1), (64, 8), (1024, 64)])
def test_gate_up_interleave_split_and_a_two_way_row_split(f, block):
    """Rows interleaved in blocks of 64 where TP up to 8 leaves whole blocks (else smaller); a 2-way row split gives
    each rank its own gate and up rows."""
    assert gate_up_block(f) == block
    gate, up = torch.randn(f, D), torch.randn(f, D)
    fused = fuse_gate_up(gate, up)
    assert torch.equal(fused, hand_gate_up(gate, up, block))
    for i in range(f):
        at = (i // block) * 2 * block + i % block
        assert torch.equal(fused[at], gate[i]) and torch.equal(fused[at + block], up[i])
    assert torch.equal(gate_up_part(fused, 0).reshape(f, D), gate)
    assert torch.equal(gate_up_part(fused, 1).reshape(f, D), up)
    filled = torch.zeros_like(fused)
    gate_up_part(filled, 0).copy_(gate.view(-1, block, D))
    gate_up_part(filled, 1).copy_(up.view(-1, block, D))
    assert torch.equal(filled, fused)
    x = torch.randn(4, D)
    g, u = split_gate_up(x @ fused.T, block)
    torch.testing.assert_close(g, x @ gate.T)
    torch.testing.assert_close(u, x @ up.T)
    for rank, half in enumerate(fused.chunk(2)):
        mine = slice(rank * f // 2, (rank + 1) * f // 2)
        assert torch.equal(half, hand_gate_up(gate[mine], up[mine], block))
        g, u = split_gate_up(x @ half.T, block)
        torch.testing.assert_close(g, x @ gate[mine].T)
        torch.testing.assert_close(u, x @ up[mine].T)
    assert gate_up_refusal(f, 2) is None
    assert gate_up_refusal(f, 8) is None if f % 8 == 0 else "--tp 8 must divide" in gate_up_refusal(f, 8)
    if block == 64:
        assert "whole blocks of 64" in gate_up_refusal(f, 32)


def _reference(model: Transformer, cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """The model's logits written out with separate q, k, v, gate and up matrices (taken out of the fused weights
    by hand), rotate-half RoPE, GQA by repeating each KV head for its rep query heads, causal softmax, SwiGLU."""
    b, t = tokens.shape
    h, hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    rep = h // hkv
    cos, sin = model.rope[0, :t][None, :, None, :], model.rope[1, :t][None, :, None, :]

    def rope(x):
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    x = model.tok_embeddings(tokens)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for layer in model.layers:
        a = layer.attn
        wq, wk, wv = hand_unfuse(a.wqkv.weight, h, hkv, hd)
        bq, bk, bv = hand_unfuse(a.wqkv.bias, h, hkv, hd)
        y = layer.attn_norm(x)
        q = rope((y @ wq.T + bq).view(b, t, h, hd))
        k = rope((y @ wk.T + bk).view(b, t, hkv, hd))
        v = (y @ wv.T + bv).view(b, t, hkv, hd)
        heads = []
        for i in range(h):
            s = q[:, :, i] @ k[:, :, i // rep].transpose(1, 2) / math.sqrt(hd)
            p = s.masked_fill(~causal, float("-inf")).softmax(-1)
            heads.append(p @ v[:, :, i // rep])
        x = x + torch.cat(heads, dim=-1) @ a.wo.weight.T
        w13 = layer.mlp.w13.weight
        gate, up = w13[0::2], w13[1::2]
        y = layer.mlp_norm(x)
        x = x + (F.silu(y @ gate.T) * (y @ up.T)) @ layer.mlp.w2.weight.T
    return model.output(model.norm(x))


def test_a_fused_model_matches_separate_projections_by_hand():
    cfg = ModelConfig("t", "llama", 2, H * HD, H, HKV, 20, 64, 32, qkv_bias=True).validate()
    torch.manual_seed(0)
    model = Transformer(cfg).float().eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.wqkv.bias.normal_()  # initialised to zero: make the bias layout matter
    tokens = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        got, want = model(tokens), _reference(model, cfg, tokens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
