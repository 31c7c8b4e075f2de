"""Parameter counts, FLOPs per token and a memory estimate for MoE configs (torch-free).

FLOPs follow design.md with N = *active* matmul parameters: attention, dense MLPs, and per MoE layer
the router (d·E), the shared experts and ``top_k`` routed experts, plus the LM head (the input
embedding excluded). train = 6·N + 12·L·d·T, prefill = train / 3. Tokens dropped by a capacity
factor are still counted (the formula is the model's, not the step's).
"""

from __future__ import annotations

from dataclasses import replace

from workloads.models.flops import memory_estimate, param_counts, peak_total, tp_share
from workloads.models.moe_config import MoEConfig

MODES = ("train", "prefill")


def expert_params(cfg: MoEConfig) -> int:
    """Matmul parameters of one routed (or shared) SwiGLU expert: w1, w3 and w2."""
    return 3 * cfg.base.d_model * cfg.expert_d_ff


def moe_param_counts(cfg: MoEConfig) -> dict[str, int]:
    """``total`` (all experts), ``active`` (top-k routed, the rest as total), ``matmul`` (N, all experts),
    ``matmul_active`` (N for FLOPs), ``routed_experts``, ``embedding``, ``other`` (norms)."""
    dense = param_counts(cfg.base)  # every layer with a dense MLP of width base.d_ff
    d, n_moe = cfg.base.d_model, cfg.n_moe_layers
    dense_mlp = 3 * d * cfg.base.d_ff
    router = d * cfg.n_experts
    shared = cfg.n_shared * expert_params(cfg)
    routed_all = cfg.n_experts * expert_params(cfg)
    routed_active = cfg.top_k * expert_params(cfg)
    matmul = dense["matmul"] + n_moe * (router + shared + routed_all - dense_mlp)
    matmul_active = dense["matmul"] + n_moe * (router + shared + routed_active - dense_mlp)
    total = dense["total"] + n_moe * (router + shared + routed_all - dense_mlp)
    return {
        "total": total,
        "active": total - n_moe * (routed_all - routed_active),
        "matmul": matmul,
        "matmul_active": matmul_active,
        "routed_experts": n_moe * routed_all,
        "embedding": dense["embedding"],
        "other": dense["other"],
    }


def moe_flops_per_token(cfg: MoEConfig, seq_len: int, mode: str = "train") -> float:
    """Training or prefill FLOPs per token counting only active experts."""
    n = moe_param_counts(cfg)["matmul_active"]
    attn = cfg.base.n_layers * cfg.base.d_model * seq_len
    if mode == "train":
        return 6.0 * n + 12.0 * attn
    if mode == "prefill":
        return (6.0 * n + 12.0 * attn) / 3
    raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")


def moe_memory_estimate(
    cfg: MoEConfig, batch: int, seq_len: int, mode: str, dtype_bytes: int, activation_checkpointing: bool = False,
    compiled: bool = False, fp8: bool = False, tp: int = 1, cp: int = 1, cp_attention: str = "gather",
) -> dict[str, int]:
    """Device bytes at the peak, as ``flops.memory_estimate`` with every expert's weights (and their grads and
    AdamW moments, in the parameters' dtype) and the activations of a dense MLP as wide as the active experts
    (top_k + shared). TP splits the experts' and attention's projections, the embedding and the head.

    Training keeps more per MoE layer than that MLP (``routing_bytes``), counted at the start of backward, with
    the last MoE layer's backward working set (``backward_layer``, against the loss's); not in the tail (the end
    of backward: the first layer's combine frees them before its experts' gradients are allocated, and the H200
    peaks measured there agree without them), nor under checkpointing (each block's tensors live only while it
    is recomputed)."""
    width = (cfg.top_k + cfg.n_shared) * cfg.expert_d_ff
    est = memory_estimate(replace(cfg.base, d_ff=width), batch, seq_len, mode, dtype_bytes,
                          activation_checkpointing=activation_checkpointing, compiled=compiled, fp8=fp8, tp=tp,
                          cp=cp, cp_attention=cp_attention)
    p = tp_share(moe_param_counts(cfg), tp)
    est["weights"] = p * dtype_bytes
    if mode == "train":
        est["grads"], est["optimizer"] = p * dtype_bytes, 2 * p * dtype_bytes
        tokens = batch * (seq_len // cp)  # this rank's
        if not activation_checkpointing:  # the start of backward: every MoE layer's
            est["activations"] += cfg.n_moe_layers * routing_bytes(cfg, tokens, dtype_bytes, compiled)
        est["backward_layer"] = backward_layer_bytes(cfg, tokens, dtype_bytes, compiled, tp)
    est["total"] = peak_total(est)
    return est


def backward_layer_bytes(cfg: MoEConfig, tokens: int, dtype_bytes: int, compiled: bool, tp: int = 1) -> int:
    """The working set of the last MoE layer's backward while every layer's activations are still kept, read off
    the sites live at the H200 peak of compiled Mixtral at batch 4: the down projection's weight gradient for
    every expert, and per routed assignment the gradients of the expert's hidden activation and of its gate/up
    output (ff + 2·ff), less, eager, the hidden activation itself (ff, counted in the activations), which eager
    frees before the gate/up gradient is allocated and compiled does not."""
    rows = tokens * cfg.top_k
    return (rows * cfg.expert_d_ff * (3 if compiled else 2)
            + cfg.n_experts * cfg.expert_d_ff * cfg.base.d_model) * dtype_bytes // tp


def routing_bytes(cfg: MoEConfig, tokens: int, dtype_bytes: int, compiled: bool = False) -> int:
    """What one MoE layer saves for backward beyond a dense MLP as wide as its active experts, for ``tokens``
    tokens: the router's fp32 copy of its input (4·d a token) and, per routed assignment, the gathered input in
    the activations' dtype; eager also the expert's output and the gate-weighted output in fp32 (``index_add_``
    keeps its source), which inductor's fused combine does not keep. Eager counted on CPU from the tensors
    autograd saves (tests/test_memory_estimate.py: (4·top_k + 1.5)·d bf16 elements a token; this says
    4·top_k + 2); compiled read off the sites live at H200 peaks (docs/benchmarks.md "The memory estimate")."""
    d = cfg.base.d_model
    return tokens * (4 * d + cfg.top_k * d * (dtype_bytes if compiled else 2 * dtype_bytes + 4))
