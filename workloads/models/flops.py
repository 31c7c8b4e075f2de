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


def memory_estimate(
    cfg: ModelConfig,
    batch: int,
    seq_len: int,
    mode: str,
    dtype_bytes: int,
    optimizer: str = "adamw",
    activation_checkpointing: bool = False,
) -> dict[str, int]:
    """Approximate device bytes: weights, grads, optimizer, activations, kv_cache, total.

    Assumptions (a lower-bound-ish estimate, not an allocator trace):
    weights and grads in ``dtype_bytes``; AdamW keeps two fp32 moments (8 bytes/param), SGD none
    (momentum-free); training activations per layer follow Korthikanti et al. with a fused
    (flash-style) attention kernel that keeps no T×T score matrix: about 34·B·T·d + 2·B·T·d_ff extra for
    SwiGLU's gate, times ``dtype_bytes``/2, plus the logits (B·T·V in dtype and once more in fp32 for
    the loss). With checkpointing only each block's input (B·T·d) is kept plus one block's working set.
    Inference keeps one layer's working set plus logits; prefill/decode fill a KV cache of
    2·L·B·seq_len·n_kv_heads·head_dim elements. CUDA context, allocator fragmentation and
    workspace buffers are not included.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    counts = param_counts(cfg)
    p = counts["total"]
    b, t, d, L = batch, seq_len, cfg.d_model, cfg.n_layers
    weights = p * dtype_bytes
    scale = dtype_bytes / 2  # the per-layer constants below are for 2-byte activations
    layer_act = int((34 * b * t * d + (2 * b * t * cfg.d_ff if cfg.arch == "llama" else 0)) * scale)
    if mode == "train":
        grads = p * dtype_bytes
        if optimizer == "adamw":
            opt = p * 8
        elif optimizer == "sgd":
            opt = 0
        else:
            raise ValueError(f"optimizer {optimizer!r} is not one of adamw, sgd")
        logits = b * t * cfg.vocab_size * (dtype_bytes + 4)
        kept = L * b * t * d * dtype_bytes + layer_act if activation_checkpointing else L * layer_act
        acts = kept + logits
        kv = 0
    else:
        grads = opt = 0
        q_len = t if mode == "prefill" else 1
        acts = int((34 * b * q_len * d + 2 * b * q_len * cfg.d_ff) * scale) + b * q_len * cfg.vocab_size * 4
        kv = 2 * L * b * t * cfg.n_kv_heads * cfg.head_dim * dtype_bytes
    total = weights + grads + opt + acts + kv
    return {"weights": weights, "grads": grads, "optimizer": opt, "activations": acts, "kv_cache": kv, "total": total}


def sharded(estimate: dict[str, int], shard: int, block_bytes: int) -> dict[str, int]:
    """A per-rank estimate under FSDP over ``shard`` ranks: a 1/shard slice of the weights, gradients and optimizer
    state, plus ``gathered``: two blocks' parameters unsharded (the one running and the next, prefetched)."""
    if shard <= 1:
        return estimate
    out = dict(estimate)
    for part in ("weights", "grads", "optimizer"):
        out[part] = -(-out[part] // shard)
    out["gathered"] = 2 * block_bytes
    out["total"] = sum(v for k, v in out.items() if k != "total")
    return out

