"""MoE model pieces on CPU: expert implementations agree, router and bias semantics, capacity, FLOPs, presets."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from workloads.models.attention import AttentionKernel
from workloads.models.moe import MoETransformer, capacity_keep
from workloads.models.moe_config import MOE_PRESETS, resolve
from workloads.models.moe_experts import RoutedExperts, _probe_grouped_mm, grouped_gemm_backend
from workloads.models.moe_flops import moe_flops_per_token, moe_param_counts
from workloads.models.moe_router import Router

TINY = MOE_PRESETS["tiny"]


def _outputs(experts: RoutedExperts, x: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor, impl: str,
             gemm: str) -> tuple[torch.Tensor, ...]:
    experts.impl, experts.gemm = impl, gemm
    for p in (*experts.parameters(), x, gates):
        p.grad = None
    y = experts(x, idx, gates)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    return y.detach(), x.grad, gates.grad, experts.w13.grad, experts.w2.grad


@pytest.mark.parametrize("dropped", [False, True], ids=["all-kept", "some-dropped"])
def test_loop_and_grouped_compute_the_same_function(dropped):
    torch.manual_seed(0)
    n, d, f, e, k = 40, 16, 8, 6, 2
    experts = RoutedExperts(e, d, f)
    x = torch.randn(n, d, requires_grad=True)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    idx[:, 0] = torch.where(torch.arange(n) < 5, 4, idx[:, 0])  # skewed, and expert 5 possibly empty
    if dropped:
        idx = torch.where(torch.rand(n, k) < 0.3, e, idx)  # index E: dropped by capacity
    gates = torch.rand(n, k, requires_grad=True)
    ref = _outputs(experts, x, idx, gates, "loop", "bmm")
    assert torch.equal(ref[2][idx == e], torch.zeros(int((idx == e).sum())))  # a dropped gate gets no gradient
    for gemm in ("bmm", "grouped_mm", "grouped_mm"):  # twice: unwritten grouped_mm rows hold whatever memory did
        got = _outputs(experts, x, idx, gates, "grouped", gemm)
        for a, b in zip(ref, got, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_grouped_gemm_backend_is_bmm_on_cpu_with_the_reason():
    gemm, reason = grouped_gemm_backend(torch.device("cpu"), torch.bfloat16, 64, 64)
    assert gemm == "bmm" and "CUDA-only" in reason
    # The probe the GPU path runs (unaligned and empty groups, forward and backward) passes on CPU fp32.
    assert _probe_grouped_mm(torch.device("cpu"), torch.float32, 64, 32) == ""


def test_router_bias_changes_selection_not_gates():
    torch.manual_seed(0)
    r = Router(16, 8, 2, "sigmoid")
    x = torch.randn(32, 16)
    before = r(x)
    r.bias[3] = 10.0
    after = r(x)
    assert (after.indices == 3).any(dim=1).all()  # expert 3 is always chosen now
    torch.testing.assert_close(after.probs, before.probs)
    scores = torch.sigmoid(x @ r.weight.T).gather(1, after.indices)
    torch.testing.assert_close(after.gates, scores / scores.sum(1, keepdim=True))
    torch.testing.assert_close(after.gates.sum(1), torch.ones(32))


def test_softmax_router_gates_are_renormalised_top_k_probabilities():
    torch.manual_seed(0)
    r = Router(16, 8, 2, "softmax", route_scale=2.5)
    out = r(torch.randn(10, 16))
    top = out.probs.topk(2, dim=1)
    assert torch.equal(out.indices, top.indices)
    torch.testing.assert_close(out.gates, 2.5 * top.values / top.values.sum(1, keepdim=True))


def test_bias_update_sign_rule_zero_mean_and_fp32_under_bf16():
    r = Router(16, 4, 1).to(torch.bfloat16)
    assert r.bias.dtype == torch.float32 and r.weight.dtype == torch.bfloat16
    r.update_bias(torch.tensor([10.0, 2.0, 2.0, 2.0]), 1e-3)  # mean 4: expert 0 over-loaded
    torch.testing.assert_close(r.bias, torch.tensor([-1.5e-3, 0.5e-3, 0.5e-3, 0.5e-3]))
    assert abs(float(r.bias.sum())) < 1e-9


def test_capacity_keeps_earlier_tokens_first():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    keep = capacity_keep(idx, 4, capacity=2)
    assert keep.tolist() == [[True, True], [True, True], [False, True], [True, False]]


def test_model_stats_row_and_capacity_drops():
    torch.manual_seed(0)
    cfg = replace(TINY, capacity_factor=0.5)
    model = MoETransformer(cfg, AttentionKernel("math"))
    out = model(torch.randint(0, cfg.base.vocab_size, (2, 16)))
    n, e, k = 32, cfg.n_experts, cfg.top_k
    assert out.stats.shape == (cfg.n_moe_layers, e + 4)
    counts, dropped, ent, aux, tokens = out.stats[:, :e], out.stats[:, e], out.stats[:, e + 1], out.stats[:, e + 2], \
        out.stats[:, e + 3]
    assert (counts.sum(1) == n * k).all() and (tokens == n).all()
    cap = cfg.capacity(n)
    assert torch.equal(dropped, (counts - cap).clamp(min=0).sum(1))
    assert ((ent / n) > 0).all() and ((ent / n) <= 1).all() and (aux > 0).all()
    assert out.aux_loss.requires_grad and out.aux_loss.item() == pytest.approx(float(aux.sum()), rel=1e-5)


def test_loop_and_grouped_models_agree_forward_and_backward():
    torch.manual_seed(0)
    model = MoETransformer(TINY, AttentionKernel("math"))
    tokens = torch.randint(0, TINY.base.vocab_size, (2, 16))
    grads = []
    for impl in ("loop", "grouped"):
        model.set_experts(impl)
        model.zero_grad()
        out = model(tokens)
        (out.logits.square().mean() + out.aux_loss).backward()
        grads.append((out.logits.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_flops_count_only_active_experts():
    cfg = TINY
    b, t = 2, 32
    model = MoETransformer(cfg, AttentionKernel("math"), impl="loop")
    tokens = torch.randint(0, cfg.base.vocab_size, (b, t))
    with FlopCounterMode(display=False) as counter:
        model(tokens).logits.sum().backward()
    assert counter.get_total_flops() / (b * t) == pytest.approx(moe_flops_per_token(cfg, t, "train"), rel=0.02)
    counts = moe_param_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["matmul_active"] < counts["matmul"]


def test_presets_and_truncation():
    ds = MOE_PRESETS["moe-64e-top6"]
    assert (ds.base.d_model, ds.n_experts, ds.top_k, ds.n_shared, ds.expert_d_ff, ds.router) == \
        (7168, 64, 6, 2, 2048, "sigmoid")
    mx = MOE_PRESETS["mixtral-8x7b"]
    assert (mx.n_experts, mx.top_k, mx.router) == (8, 2, "softmax")
    assert (MOE_PRESETS["gpt4-style"].n_experts, MOE_PRESETS["gpt4-style"].top_k) == (16, 2)
    two = ds.with_layers(2)
    assert (two.n_layers, two.n_dense_layers, two.moe_layer_ids) == (2, 1, (1,))
    assert ds.with_layers(8).n_dense_layers == 3
    base = {"preset": "moe-64e-top6", "layers": 2}
    assert resolve({**base, "num_moe_layers": 2}).n_dense_layers == 0
    assert resolve({**base, "num_experts": 16, "top_k": 4}).n_experts == 16


@pytest.mark.parametrize(
    ("opts", "words"),
    [
        ({"preset": "mixtral-8x7b", "top_k": 9}, "--top-k 9 exceeds the number of routed experts (8)"),
        ({"preset": "moe-64e-top6", "num_experts": 4}, "fewer than the preset's top-k 6"),
        ({"preset": "tiny", "num_moe_layers": 4}, "--num-moe-layers 4 exceeds the model's 3 layers"),
        ({"preset": "tiny", "capacity_factor": 0.0}, "capacity factor must be > 0"),
    ],
)
def test_inconsistent_shapes_are_refused(opts, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        resolve(opts)
