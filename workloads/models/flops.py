"""Parameter counts, FLOPs per token and memory estimates from a ModelConfig (torch-free).

FLOP convention (design.md, torchtitan / PaLM): N = matmul parameters excluding the input
embedding (attention and MLP weights plus the LM head, counted even when tied);
train = 6·N + 12·L·d·T, prefill = train / 3, decode = 2·N + 4·L·d·context.
Attention is counted in full (no causal discount), as FlopCounterMode does.

Serving (``serve_flops``) counts a request as the engine (workloads/engine) runs it, from those parts: prefill
runs the layers for every prompt token and the LM head once per chunk, decode one step per output token after
the first.
"""

from __future__ import annotations

from workloads.models.config import ModelConfig

MODES = ("train", "prefill", "decode")


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts: ``total``, ``matmul`` (N), ``embedding`` (token + position), ``other`` (norms, biases)."""
    d, hd, L = cfg.d_model, cfg.head_dim, cfg.n_layers
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2
    mlp = d * cfg.d_ff * (3 if cfg.arch == "llama" else 2)
    head = d * cfg.vocab_size
    matmul = L * (attn + mlp) + head
    embedding = cfg.vocab_size * d + (cfg.max_seq_len * d if cfg.arch == "gpt" else 0)
    norm = d if cfg.arch == "llama" else 2 * d  # RMSNorm: weight; LayerNorm: weight + bias
    other = (2 * L + 1) * norm
    if cfg.bias:
        other += L * ((cfg.n_heads + 2 * cfg.n_kv_heads) * hd + d + cfg.d_ff + d)
    elif cfg.qkv_bias:
        other += L * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
    total = matmul + embedding + other - (head if cfg.tie_embeddings else 0)
    return {"total": total, "matmul": matmul, "embedding": embedding, "other": other}


def flops_per_token(cfg: ModelConfig, seq_len: int, mode: str = "train") -> float:
    """FLOPs per token; ``seq_len`` is T for train/prefill and the attended context for decode."""
    n = param_counts(cfg)["matmul"]
    attn = cfg.n_layers * cfg.d_model * seq_len
    if mode == "train":
        return 6.0 * n + 12.0 * attn
    if mode == "prefill":
        return (6.0 * n + 12.0 * attn) / 3
    if mode == "decode":
        return 2.0 * n + 4.0 * attn
    raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")


def prefill_chunks(prompt_len: int, chunk: int | None = None) -> list[tuple[int, int]]:
    """(start, length) of each prefill chunk of a prompt cut at ``chunk`` tokens (None: one chunk)."""
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    step = chunk or prompt_len
    if step < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [(s, min(step, prompt_len - s)) for s in range(0, prompt_len, step)]


def serve_flops(cfg: ModelConfig, prompt_len: int, output_len: int, chunk: int | None = None,
                chunks: list[tuple[int, int]] | None = None) -> dict[str, float]:
    """FLOPs of one served request as the engine runs them: ``prefill``, ``decode``, ``total`` and
    ``per_output_token`` (total / output_len).

    Prefill, per chunk of n prompt tokens at ``start`` (``chunks``, else the prompt cut at ``chunk`` tokens, as
    the scheduler does when no other prompt shares the step's budget): the transformer layers for the n tokens,
    each attending the chunk's start + n keys (the prefill part per token, 2·(N - N_head) + 4·L·d·(start + n)),
    and the LM head once, on the chunk's last position (2·d·V). Every chunk computes that token, the last
    chunk's becomes the first output token. Decode: one step per output token after the first, step j
    (1..output_len - 1) feeding token j at position prompt_len + j - 1 with a context of prompt_len + j keys,
    each the decode token of the design, 2·N + 4·L·d·context (layers and LM head for one token).
    """
    if output_len < 1:
        raise ValueError(f"output_len must be >= 1, got {output_len}")
    head = 2.0 * cfg.d_model * cfg.vocab_size  # the LM head for one position
    parts = chunks if chunks is not None else prefill_chunks(prompt_len, chunk)
    if sum(n for _, n in parts) != prompt_len:
        raise ValueError(f"chunks {parts} do not cover the {prompt_len}-token prompt")
    prefill = sum(n * (flops_per_token(cfg, start + n, "prefill") - head) + head for start, n in parts)
    decode = sum(flops_per_token(cfg, prompt_len + j, "decode") for j in range(1, output_len))
    total = prefill + decode
    return {"prefill": prefill, "decode": decode, "total": total, "per_output_token": total / output_len}


def bytes_moved(cfg: ModelConfig, dtype_bytes: int) -> dict[str, int]:
    """What an inference forward must move from memory (MBU, design.md): ``weight_bytes`` read once per
    forward pass (every matmul weight, the LM head included even when tied, norms and biases; of the input
    embedding only the looked-up rows, left out) and ``kv_bytes_per_token``, the keys and values of one
    position across the layers, read once for each position a query attends."""
    counts = param_counts(cfg)
    return {"weight_bytes": (counts["matmul"] + counts["other"]) * dtype_bytes,
            "kv_bytes_per_token": 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype_bytes}


#: Elements each layer keeps for backward per token, per unit of d_ff, d and the KV width (``_layer_bytes``; times
#: the activations' bytes; the d part is not split under TP, so TP estimates err high). Read off the allocation
#: sites live at the training peak of llama-3.1-8b shapes on an H200 (benchmarks/memory_gpu.py, docs/benchmarks.md
#: "The memory estimate"): eager keeps SwiGLU's gate, up, silu and product (4 d_ff), the two RMSNorms' fp32
#: working copies (9 d), q and k after RoPE (d + kv), the attention output (d) and v (kv); inductor's
#: partitioner recomputes the norms and the silu (3 d_ff, 6.5 d); torchao's float8 under compile keeps the
#: matmul inputs in one byte.
_EAGER = {"ff": 4.0, "d": 11.0, "kv": 2.0}
_COMPILED = {"ff": 3.0, "d": 6.5, "kv": 2.0}
#: GPT-2 style (GELU, LayerNorm, no RoPE): fc1's output and GELU's (2 d_ff) and 8.5 d, read off gpt-large shapes
#: eager; under compile the same (not measured)
_GELU = {"ff": 2.0, "d": 8.5, "kv": 0.0}


def _layer_bytes(cfg: ModelConfig, tokens: int, act_bytes: int, compiled: bool, fp8: bool, tp: int) -> int:
    """One layer's saved activations for ``tokens`` tokens (its TP shard of the projections' outputs)."""
    d, kv, ff = cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    coef = _GELU if cfg.arch != "llama" else _COMPILED if compiled else _EAGER
    if compiled and fp8 and cfg.arch == "llama":  # gate, up in bf16; the down, gate/up, qkv, o inputs in fp8
        per = (2 * ff * act_bytes + ff) / tp + 2 * d + (2.25 * d + 2 * kv / tp) * act_bytes
    else:
        per = (coef["ff"] * ff / tp + coef["d"] * d + coef["kv"] * kv / tp) * act_bytes
    return int(tokens * per)


def memory_estimate(
    cfg: ModelConfig,
    batch: int,
    seq_len: int,
    mode: str,
    dtype_bytes: int,
    optimizer: str = "adamw",
    activation_checkpointing: bool = False,
    compiled: bool = False,
    fp8: bool = False,
    tp: int = 1,
    cp: int = 1,
    cp_attention: str = "gather",
) -> dict[str, int]:
    """Device bytes per rank at the peak as torch's allocator counts it: weights, grads, optimizer, activations,
    logits, tail, kv_cache, and ``total`` (``peak_total``). Read off allocation sites at measured H200 peaks
    (benchmarks/memory_gpu.py; docs/benchmarks.md "The memory estimate").

    Weights and grads in ``dtype_bytes``; AdamW's two moments in the parameters' dtype (torch allocates them
    like the parameter), SGD none. Under ``tp`` every projection, the embedding and the head are split, and the
    loss runs on vocabulary-parallel logits outside compile.

    Training peaks at the start of backward or near its end, whichever is larger: weights + optimizer +
    max(activations + logits, grads + tail). Activations: every layer's saved tensors (``_layer_bytes``: eager,
    compiled, torchao FP8 compiled); logits: the loss's working set (eager: the logits, the log-softmax of their
    fp32 copy and its gradient, B·T·V·(2·dtype + 8); compiled, the loss is fused: the logits and the head's
    gradient); tail: the first block's tensors, freed last. With checkpointing, eager keeps each block's input
    and output and recomputes one block at a time; compiled, the partitioner keeps less and recomputes more at
    once: a tail of 1.5 blocks with every gradient (a fit to three measurements, 4 and 12 layers, within 3%).

    Under ``cp`` each rank holds seq_len / cp of each sequence and keeps every layer's gathered keys and values
    (2·L·B·seq_len·kv width) for backward; under PyTorch's ring (``cp_attention`` ring, ring-gather) its own
    keys and values expanded to every query head instead (2·L·B·(seq_len/cp)·(n_heads - n_kv_heads)·head_dim
    beyond the kernel's own). Neither measured on a GPU yet.

    Inference (no grad): the residual and the logits at the head, or one block's working set, the larger; decode
    fills a KV cache of 2·L·B·seq_len·kv_heads·head_dim elements (the dense workload's prefill is a plain forward,
    no cache). The CUDA context and the allocator's rounding and fragmentation are not included.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    p_rank = tp_share(param_counts(cfg), tp)
    b, t, d, L = batch, seq_len // cp, cfg.d_model, cfg.n_layers  # t: this rank's share of each sequence
    weights = p_rank * dtype_bytes
    kv_heads_bytes = cfg.n_kv_heads * cfg.head_dim * dtype_bytes // tp
    out = {"weights": weights, "grads": 0, "optimizer": 0, "activations": 0, "logits": 0, "tail": 0, "kv_cache": 0}
    if mode == "train":
        out["grads"] = p_rank * dtype_bytes
        if optimizer == "adamw":
            out["optimizer"] = 2 * p_rank * dtype_bytes
        elif optimizer != "sgd":
            raise ValueError(f"optimizer {optimizer!r} is not one of adamw, sgd")
        if activation_checkpointing and compiled:  # the partitioner's recompute (FP8 or not): a fit, see above
            out["tail"] = int(1.5 * _layer_bytes(cfg, b * t, dtype_bytes, compiled, False, tp))
        else:
            layer = _layer_bytes(cfg, b * t, dtype_bytes, compiled, fp8, tp)
            if activation_checkpointing:  # each block's input and output kept; a block recomputed at a time
                out["activations"] = 2 * L * b * t * d * dtype_bytes
                out["tail"] = out["activations"] + layer
            else:
                out["activations"] = L * layer
                out["tail"] = layer  # the first block's saved tensors, freed last
        if cp > 1 and cp_attention == "gather":  # every layer's all-gathered keys and values, saved for backward
            out["activations"] += L * 2 * b * seq_len * kv_heads_bytes
        elif cp > 1:  # the ring saves this rank's keys and values expanded to the query heads
            out["activations"] += L * 2 * b * t * (cfg.n_heads - cfg.n_kv_heads) * cfg.head_dim * dtype_bytes // tp
        btv = b * t * cfg.vocab_size // tp  # vocabulary-parallel logits under TP, their loss outside compile
        out["logits"] = (btv * dtype_bytes + cfg.vocab_size * d * dtype_bytes if compiled and tp == 1
                         else btv * (2 * dtype_bytes + 8))
    else:  # no grad: the residual and the logits at the head, or one block's working set (tail), the larger
        q_len = t if mode == "prefill" else 1
        ff = cfg.d_ff * (3 if cfg.arch == "llama" else 2) // tp
        out["activations"] = 2 * b * q_len * d * dtype_bytes
        out["logits"] = b * q_len * cfg.vocab_size // tp * dtype_bytes
        out["tail"] = b * q_len * (2 * d + ff) * dtype_bytes
        out["kv_cache"] = 2 * L * b * t * kv_heads_bytes if mode == "decode" else 0  # prefill: a no-grad forward
    out["total"] = peak_total(out)
    return out


def tp_share(counts: dict[str, int], tp: int) -> int:
    """One TP rank's parameters of ``counts`` (``param_counts`` or ``moe_param_counts``): every matmul, the
    embedding and the head split ``tp`` ways, the norms whole."""
    return counts["other"] + (counts["total"] - counts["other"]) // tp


def peak_total(parts: dict[str, int]) -> int:
    """The peak from the parts: weights + optimizer + FSDP's gathered blocks + KV cache + the larger of two
    candidate peaks: training's start of backward (activations + the larger of the loss's working set and the
    backward of the last MoE layer, the first to run, ``backward_layer``) and its end (grads + tail); inference's
    head (activations + logits) and one block's working set (tail)."""
    start = parts.get("activations", 0) + max(parts.get("logits", 0), parts.get("backward_layer", 0))
    end = parts.get("grads", 0) + parts.get("tail", 0)
    return (parts.get("weights", 0) + parts.get("optimizer", 0) + parts.get("gathered", 0) + parts.get("kv_cache", 0)
            + max(start, end))


def sharded(estimate: dict[str, int], shard: int, block_bytes: int) -> dict[str, int]:
    """A per-rank estimate under FSDP over ``shard`` ranks: a 1/shard slice of the weights, gradients and optimizer
    state, plus ``gathered``: two blocks' parameters unsharded (the one running and the next, prefetched)."""
    if shard <= 1:
        return estimate
    out = dict(estimate)
    for part in ("weights", "grads", "optimizer"):
        out[part] = -(-out[part] // shard)
    out["gathered"] = 2 * block_bytes
    out["total"] = peak_total(out)
    return out

