"""Perplexity workload: a model's mean negative log-likelihood on a token stream, in sliding windows.

Run alone: ``python -m workloads.perplexity --checkpoint DIR --data tokens.npy --seq-len 1024 --stride 256``
(events as JSON lines on stdout). The windows are Hugging Face's sliding-window recipe
(https://huggingface.co/docs/transformers/perplexity, ``workloads.tokens.windows``): each token is scored at most
once, the overlap between windows is context only. A step is one batch of ``--batch-size`` windows (the last
batch padded with empty windows, so every forward has one shape); it reports the tokens it scored, their summed
and mean NLL (``loss``: the mean) and the bytes they stand for. The console computes mean NLL, perplexity and
bits per byte from those raw sums (``tuner.quality``).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from workloads.dry_run import print_plan
from workloads.models.config import PRESETS, ModelConfig
from workloads.models.flops import flops_per_token, memory_estimate, param_counts
from workloads.options import run_main
from workloads.specs.dense import apply_overrides, model_overrides
from workloads.specs.perplexity import PERPLEXITY, data_format, model_checks, seq_len, shape_checks, tokenizer_path
from workloads.tokens import (
    Tokens,
    check_ids,
    decoded_bytes,
    read_ids,
    sha256_file,
    sha256_ids,
    tokenize,
    windows,
)

if TYPE_CHECKING:  # torch only once a run starts (the plan, --dry-run, option errors stay torch-free)
    from workloads.harness import Harness, Steps

_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_LOADED: dict[tuple[Any, ...], Tokens] = {}  # the plan's tokens, for the setup of the same process


def load_tokens(opts: dict[str, Any], vocab: int) -> Tokens:
    """The run's token stream (capped at --max-tokens) with the bytes of each token where a tokenizer gives them;
    DataError (a ValueError, one line) for a file that cannot be scored with this model."""
    fmt = data_format(opts)
    tok = tokenizer_path(opts)
    key = (opts["data"], fmt, opts["data_dtype"], tok, opts["max_tokens"], vocab)
    if key in _LOADED:
        return _LOADED[key]
    path = str(opts["data"])
    if fmt == "text":
        assert tok is not None  # the spec's checks refuse text without a tokenizer
        tokens = tokenize(path, tok)
    else:
        tokens = Tokens(read_ids(path, fmt, opts["data_dtype"]), None, fmt, tok,
                        None if tok else "bits per byte unknown: no tokenizer to decode the token file (--tokenizer)")
    check_ids(tokens.ids, vocab, path)
    if opts["max_tokens"]:
        tokens = replace(tokens, ids=tokens.ids[: opts["max_tokens"]],
                         nbytes=None if tokens.nbytes is None else tokens.nbytes[: opts["max_tokens"]])
    if len(tokens.ids) < 2:
        raise ValueError(f"--data {path}: {len(tokens.ids)} token; scoring needs at least 2")
    if fmt != "text" and tok is not None:
        nbytes, note = decoded_bytes(np.asarray(tokens.ids), tok)
        tokens = replace(tokens, nbytes=nbytes, bytes_note=note)
    _LOADED[key] = tokens
    return tokens


def model_config(opts: dict[str, Any], seq: int) -> tuple[ModelConfig, dict[str, Any] | None]:
    """The model's config with the model knobs applied (``--rope-theta``) and, for a checkpoint, the record's
    ``checkpoint`` block (``workloads.checkpoint``'s cheap checks run here: nothing is allocated)."""
    cfg, ckpt = _stored_config(opts, seq)
    return apply_overrides(cfg, opts), ckpt


def _stored_config(opts: dict[str, Any], seq: int) -> tuple[ModelConfig, dict[str, Any] | None]:
    """The config of the checkpoint (and its record block) or of the preset, as stored."""
    if opts["checkpoint"]:
        from workloads import checkpoint

        cfg, block = checkpoint.read_dense(opts["checkpoint"], uses="perplexity")
        if seq > cfg.max_seq_len:
            raise ValueError(f"--seq-len {seq} exceeds the checkpoint's context of {cfg.max_seq_len} positions")
        return cfg, block
    cfg = PRESETS[opts["preset"]]
    return (replace(cfg, max_seq_len=seq) if seq > cfg.max_seq_len else cfg), None


def plan(opts: dict[str, Any], device_type: str = "cpu") -> dict[str, Any]:
    """The resolved run: the model (random weights said so), the data and its hashes, the windows and batches,
    parameter counts, FLOPs per scored token and a memory estimate. Reads the data; allocates no model."""
    problems = model_checks(opts) or shape_checks(opts)
    if problems:
        raise ValueError(problems[0][1])
    seq = seq_len(opts)
    stride = opts["stride"] or seq
    cfg, ckpt = model_config(opts, seq)
    tokens = load_tokens(opts, cfg.vocab_size)
    n = len(tokens.ids)
    w = windows(n, seq, stride)
    batch = opts["batch_size"]
    batches = -(-len(w) // batch)
    warmup = min(opts["warmup"], batches - 1)
    steps = batches - warmup if not opts["steps"] else min(opts["steps"], batches - warmup)
    scored = int((w[:, 1] - w[:, 2]).sum())
    processed = int((w[:, 1] - w[:, 0]).sum())
    scored_bytes = None
    if tokens.nbytes is not None:
        cum = np.concatenate([[0], np.cumsum(tokens.nbytes)])
        scored_bytes = int((cum[w[:, 1]] - cum[w[:, 2]]).sum())
    dtype = opts["dtype"] if opts["dtype"] != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    data = {"path": str(opts["data"]), "format": tokens.format, "sha256": sha256_file(str(opts["data"])),
            "tokens": n, "tokens_sha256": sha256_ids(np.asarray(tokens.ids)), "max_tokens": opts["max_tokens"],
            "tokenizer": tokens.tokenizer,
            "tokenizer_sha256": sha256_file(tokens.tokenizer) if tokens.tokenizer else None,
            "scored_bytes": scored_bytes, "bytes_note": tokens.bytes_note}
    return {
        "model": asdict(cfg),
        "weights": "checkpoint" if ckpt is not None else "random",
        "checkpoint": ckpt,
        "data": data,
        "windows": {"seq_len": seq, "stride": stride, "count": len(w), "tokens_scored": scored,
                    "tokens_processed": processed, "batch_size": batch, "batches": batches},
        "mode": "eval",
        "batch_size": batch,
        "seq_len": seq,
        "steps": steps,
        "warmup": warmup,
        "duration": opts["duration"],
        "dtype": dtype,
        "params": param_counts(cfg),
        # the forward passes read every window's tokens, overlap included: FLOPs per scored token count them all
        "flops_per_token": flops_per_token(cfg, seq, "prefill") * processed / scored,
        "memory_estimate_bytes": memory_estimate(cfg, batch, seq, "prefill", _DTYPE_BYTES[dtype]),
    }


def batch_targets(w: np.ndarray, ids: np.ndarray, batch: int, seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every scored token, in window order: its place in its batch's flattened logits (row * seq + position of
    the token before it), its id, and each batch's [start, end) into those arrays (``bounds``)."""
    begin, end, score_from = w[:, 0], w[:, 1], w[:, 2]
    counts = end - score_from
    win = np.repeat(np.arange(len(w)), counts)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    pos = (score_from - begin - 1)[win] + within  # the logits at pos predict token begin + pos + 1
    flat = (win % batch) * seq + pos
    target = np.asarray(ids)[begin[win] + pos + 1]
    per_batch = np.bincount(np.arange(len(w)) // batch, weights=counts).astype(np.int64)
    return flat, target, np.concatenate([[0], np.cumsum(per_batch)])


def setup(h: Harness, p: dict[str, Any]) -> Steps:
    """The model (a checkpoint through ``workloads.checkpoint``, or random weights) built for the run's knobs,
    and the step that scores one batch of windows."""
    import torch
    import torch.nn.functional as F

    from workloads.build import build
    from workloads.harness import Steps

    opts = h.opts  # the plan read the data (phase building); it is cached for this process
    # the loop's warm-up (never more steps than the data gives), and its steps in meta for the progress bar
    h.opts = {**opts, "warmup": p["warmup"], "steps": p["steps"]}
    cfg = ModelConfig(**p["model"])
    seq, batch = p["seq_len"], p["batch_size"]
    tokens = load_tokens(opts, cfg.vocab_size)
    ids = np.asarray(tokens.ids)
    w = windows(len(ids), seq, p["windows"]["stride"])
    flat, target, bounds = batch_targets(w, ids, batch, seq)
    nbytes = None
    if tokens.nbytes is not None:
        cum = np.concatenate([[0], np.cumsum(tokens.nbytes)])
        per_window = cum[w[:, 1]] - cum[w[:, 2]]
        nbytes = np.bincount(np.arange(len(w)) // batch, weights=per_window).astype(np.int64)
    knobs = {**opts, "tp": 1}
    if not opts["attention_window"] and cfg.sliding_window:  # the checkpoint's window, in the kernel probe too
        knobs["attention_window"] = cfg.sliding_window
    if opts["checkpoint"]:
        from workloads import checkpoint

        h.phase("loading", "checkpoint")

        def make(kernel: Any) -> torch.nn.Module:
            return checkpoint.load(opts["checkpoint"], h.device, h.dtype, attention=kernel,
                                   overrides=model_overrides(opts))[0]
    else:
        from workloads.models.transformer import Transformer

        def make(kernel: Any) -> torch.nn.Module:
            return Transformer(cfg, attention=kernel)

    b = build(make, knobs, h.device, h.dtype, heads=(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim), seq_len=seq,
              training=False)
    dev = h.device
    ids_dev = torch.from_numpy(ids.astype(np.int32 if cfg.vocab_size < 2**31 else np.int64)).to(dev)
    begins = np.zeros(p["windows"]["batches"] * batch, dtype=np.int64)
    begins[: len(w)] = w[:, 0]  # padding windows read from 0 and score nothing
    begins_dev = torch.from_numpy(begins).to(dev)
    flat_dev = torch.from_numpy(flat.astype(np.int64)).to(dev)
    target_dev = torch.from_numpy(target.astype(np.int64)).to(dev)
    arange = torch.arange(seq, device=dev)
    last = len(ids) - 1
    sums: dict[int, torch.Tensor] = {}
    fwd, autocast, no_backward = b.forward, b.autocast, b.no_backward

    def step(i: int) -> torch.Tensor:
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        pos = (begins_dev[i * batch:(i + 1) * batch, None] + arange).clamp_(max=last)
        with no_backward(), autocast():
            logits = fwd(ids_dev[pos].long())
            picked = logits.reshape(-1, logits.shape[-1]).index_select(0, flat_dev[lo:hi]).float()
            nll = F.cross_entropy(picked, target_dev[lo:hi], reduction="sum")
        sums[i] = nll
        return nll / (hi - lo)

    def tokens_of(i: int) -> int:
        return int(bounds[i + 1] - bounds[i])

    def extra(i: int) -> dict[str, Any]:
        nll = float(sums.pop(i).item())
        fields = {"nll_sum": nll, "nll_mean": nll / tokens_of(i), "window": i * batch,
                  "windows": min(batch, len(w) - i * batch)}
        if nbytes is not None:
            fields["scored_bytes"] = int(nbytes[i])
        return fields

    meta = {"flops_per_token": p["flops_per_token"], "params": p["params"], "weights": p["weights"],
            "data": p["data"], "windows": p["windows"]}
    if p["checkpoint"] is not None:
        meta["checkpoint"] = p["checkpoint"]
    return Steps(step, tokens_of, b.ran, meta=meta, extra=extra)


def run(opts: dict[str, Any]) -> int:
    if opts["dry_run"]:
        return print_plan(opts, plan)
    from workloads.harness import Harness

    return Harness("perplexity", {**opts, "tp": 1}).run(plan, setup)


def main(argv: list[str] | None = None) -> int:
    return run_main(PERPLEXITY, argv, run)


if __name__ == "__main__":
    sys.exit(main())

