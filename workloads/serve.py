"""Inference serving load test: the dense model behind a KV-cache engine with continuous batching.

Run alone: ``python -m workloads.serve --preset tiny --num-requests 16`` (events as JSON lines on stdout).
Several replicas: ``torchrun --nproc-per-node N -m workloads.serve --replicas N ...``.
With ``--endpoint URL --model NAME`` the same load goes over HTTP to a server speaking the OpenAI API
(``workloads.endpoint``; no torch on that path).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from workloads.dry_run import print_plan
from workloads.models.config import PRESETS, ModelConfig
from workloads.models.flops import bytes_moved, param_counts, serve_flops
from workloads.options import run_main
from workloads.protocol import CLOCK_HOST
from workloads.specs.serve import SERVE, cache_len, lengths, load_checks, position_room, request_rates, resolved

if TYPE_CHECKING:  # the module stays torch-free until a run starts (the plan, --dry-run, option errors)
    from workloads.harness import Harness

_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def plan(opts: dict[str, Any], device_type: str = "cpu") -> dict[str, Any]:
    """The resolved run: model, cache, load shape, parameter counts, FLOPs per output token.

    Torch-free but with ``--checkpoint``, whose config and tensors are checked here (``checkpoint.read_dense``):
    its shape replaces the preset's, which then gives only the load defaults. ValueError (one line) otherwise."""
    if opts.get("endpoint"):
        from workloads.endpoint import endpoint_plan

        return endpoint_plan(opts)
    checkpoint = None
    if opts.get("checkpoint"):
        from workloads import checkpoint as ck

        cfg, checkpoint = ck.read_dense(opts["checkpoint"], opts["layers"], "serve")
    else:
        cfg = PRESETS[opts["preset"]]
        if opts["layers"]:
            cfg = cfg.with_layers(opts["layers"])
    prompt, output = lengths(opts)
    n = cache_len(opts, prompt, output)
    room = position_room(n)
    if room > cfg.max_seq_len:  # position tables must cover the cache's spare columns
        if checkpoint is not None and cfg.arch == "gpt":  # a learned table cannot grow (load_checks refuse it)
            raise ValueError(f"{n} positions per sequence: the serving cache rounds up to {room}, more than "
                             f"GPT-2's {cfg.max_seq_len} learned positions")
        cfg = replace(cfg, max_seq_len=room)  # RoPE: a longer table of the same frequencies
    max_batch = int(resolved(opts, "max_batch"))
    dtype = opts["dtype"] if opts["dtype"] != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    rate = next(iter(request_rates(opts)), None)
    num = opts["num_requests"] or (0 if opts["duration"] else resolved(opts, "num_requests"))
    load = {"mode": "open" if rate is not None else "closed", "request_rate": rate,
            "burstiness": opts["burstiness"] if rate is not None else None,
            "concurrency": None if rate is not None else (opts["concurrency"] or max_batch * opts["replicas"]),
            "num_requests": num, "duration_s": opts["duration"], "drain_timeout_s": opts["drain_timeout"],
            "prompt_len": str(prompt), "output_len": str(output), "seed": opts["seed"]}
    # FLOPs per output token, the prompt's prefill included, as the engine runs a request of the mean lengths
    # (flops.serve_flops: the LM head once per prefill chunk, one decode step per output token after the first)
    fpt = serve_flops(cfg, max(1, round(prompt.mean)), max(1, round(output.mean)),
                      opts["max_prefill_tokens"])["per_output_token"]
    counts = param_counts(cfg)
    kv_heads = cfg.n_kv_heads
    return {
        "model": asdict(cfg),
        "max_batch": max_batch,
        "cache_len": n,
        "max_prefill_tokens": opts["max_prefill_tokens"],
        "load": load,
        "slo": {"ttft_ms": opts["slo_ttft_ms"], "tpot_ms": opts["slo_tpot_ms"]},
        "replicas": opts["replicas"],
        "tp": opts["tp"],
        "dtype": dtype,
        "params": counts,
        "flops_per_output_token": fpt,
        "kv_cache_bytes": 2 * cfg.n_layers * max_batch * n * kv_heads * cfg.head_dim * _DTYPE_BYTES[dtype],
        "weight_bytes": counts["total"] * _DTYPE_BYTES[dtype],
        **({"checkpoint": checkpoint} if checkpoint else {}),
    }


def _engine(h: Harness, p: dict[str, Any], group: Any) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """The model for plan ``p`` through workloads.build, sharded over ``group`` (a tensor-parallel replica's ranks)
    when given, behind the serving engine (which compiles its own step functions); what actually ran; and the
    checkpoint's record block with its load time (None for random weights)."""
    import torch.distributed as dist

    from workloads.build import build
    from workloads.engine import tensor_parallel
    from workloads.engine.engine import Engine
    from workloads.engine.work import StepChannel
    from workloads.models.transformer import Transformer

    opts, cfg, tp = h.opts, ModelConfig(**p["model"]), h.opts["tp"]
    # every rank builds the same weights (seeded, or the checkpoint's); each keeps its slice
    shard = (lambda model: tensor_parallel.shard(model, dist.get_rank(group), tp, group)) if group is not None else None
    make: Any = lambda kernel: Transformer(cfg, attention=kernel)  # noqa: E731
    loaded: dict[str, Any] = {}
    if p.get("checkpoint"):
        from workloads import checkpoint as ck

        opts, make = ck.loader(h, opts, cfg.sliding_window, {"max_seq_len": cfg.max_seq_len}, into=loaded)

    b = build(make, opts, h.device, h.dtype,
              heads=(cfg.n_heads // tp, cfg.n_kv_heads // tp, cfg.head_dim),
              seq_len=min(p["max_prefill_tokens"], p["cache_len"]), training=False, shard=shard, tp=tp, compile=False)
    te = b.fp8.library == "te"  # Transformer Engine's FP8 GEMMs want at least 16 rows
    channel = (StepChannel(group, max(p["max_batch"], 16 if te else 1), p["max_prefill_tokens"], h.device)
               if group is not None else None)
    engine = Engine(b.model, b.kernel, p["max_batch"], p["cache_len"], h.device, h.dtype, opts["compile_mode"],
                    b.autocast, pad_multiple=16 if te else 1, channel=channel, no_backward=b.no_backward)
    if engine.step_module.mode == "split":
        decode_attn = "split-KV Triton kernels over each slot's live keys, grouped queries"
    elif engine.step_module.mode == "flex":
        decode_attn = "flex decoding over each slot's live key blocks"
    elif b.kernel.backend == "auto":
        decode_attn = "matmul + masked fp32 softmax over the cache, grouped queries"
    else:
        decode_attn = f"SDPA {b.kernel.backend} with a per-slot length mask, grouped queries"
    ran = {
        **b.ran,
        "attention": {"requested": opts["attention_backend"], "prefill": b.ran["attention"]["reason"],
                      "decode": decode_attn, "window": b.kernel.window},
        "compile": {"decode": opts["compile_mode"], "decode_inductor_options": engine.decode_options,
                    "prefill": engine.prefill_mode, "cuda_graphs": opts["compile_mode"] == "reduce-overhead"},
        "decode_buckets": engine.buckets,
        "decode_lookahead": engine.lookahead,
        "cache_positions": engine.cache.positions,
        "kv_cache_bytes": engine.cache.nbytes(),
    }
    if tp > 1:
        ran["tensor_parallel"] = ("q/k/v, gate/up and the LM head split by output rows, wo and down by input "
                                  "columns with one all-reduce each; greedy over the vocabulary shards; embedding "
                                  "replicated; the leader broadcasts each step's plan to its group")
    return engine, ran, loaded.get("checkpoint")


def _dry_run(opts: dict[str, Any]) -> int:
    problems = load_checks(opts)
    if problems:
        print(f"error: {problems[0][1]}", file=sys.stderr)
        return 2
    return print_plan(opts, plan)


def run(opts: dict[str, Any]) -> int:
    if opts["dry_run"]:
        return _dry_run(opts)
    if opts.get("endpoint"):
        from workloads.endpoint import run_endpoint

        return run_endpoint(opts)

    import torch

    from workloads.engine.driver import Hooks, LoadResult, run_load
    from workloads.engine.loadgen import RequestSpec, from_load, prompt_tokens
    from workloads.engine.request import Request
    from workloads.engine.scheduler import Scheduler
    from workloads.harness import EXIT_INTERRUPTED, EXIT_OK, SETUP_ERRORS, Harness, SetupError
    from workloads.loop import memory_fields

    h = Harness("serve", opts)
    em, world, replicas, tp, rank = h.em, h.world, opts["replicas"], opts["tp"], h.rank
    replica, leader = rank // tp, rank % tp == 0
    try:
        problems = load_checks(opts)
        if problems:
            raise SetupError(problems[0][1])
        h.phase("building")
        group = h.join_replicas(replicas, tp)
        p = h.resolve(plan)
        engine, ran, loaded = _engine(h, p, group)
        gen = from_load(p["load"], replica, replicas)
    except SETUP_ERRORS as exc:
        return h.setup_failed(exc, "the engine")

    h.meta(p, ran, flops_per_token=p["flops_per_output_token"],
           flops_per_token_note="per output token, the prompt's prefill included, at the mean lengths",
           params=p["params"], replicas=replicas, tp=tp,
           step_tokens="output tokens produced by one engine step of this rank's replica",
           **({"checkpoint": loaded} if loaded else {}),
           **bytes_moved(ModelConfig(**p["model"]), _DTYPE_BYTES[p["dtype"]]))
    device, cuda = h.device, h.device.type == "cuda"
    step_idx = 0

    # engine steps are timed on the host (the step ends when its tokens are on the host): wall time
    def warm_step(ms: float, fields: dict[str, Any]) -> None:
        nonlocal step_idx
        em.step(step_idx, ms, 0, clock=CLOCK_HOST, warmup=True, first=step_idx == 0, **fields,
                **memory_fields(device))
        step_idx += 1

    def on_step(i: int, ms: float, tokens: int, plan_: Any, t: float) -> None:
        nonlocal step_idx
        extra = memory_fields(device) if cuda and i % 16 == 0 else {}
        em.step(step_idx, ms, tokens, clock=CLOCK_HOST, warmup=False, prefill_tokens=plan_.prefill_tokens,
                decode_batch=len(plan_.decode), kv_tokens=plan_.kv_tokens,
                weight_passes=plan_.weight_passes, t_load=t, **extra)
        step_idx += 1

    vocab = engine.model.cfg.vocab_size

    def make_request(spec: RequestSpec) -> Request:
        prompt = torch.from_numpy(prompt_tokens(p["load"]["seed"], spec.rid, spec.prompt_len, vocab)).to(device)
        return Request(spec, prompt, replica=replica)

    # compiled: at least compile, CUDA-graph capture and one replay per shape before the load starts
    rounds = max(opts["warmup"], 3) if opts["compile_mode"] != "none" else opts["warmup"]
    hooks = Hooks(step=on_step, finished=lambda r: em.request(**r.record()),
                  series=lambda f: em.series("engine", replica=replica, **f), draining=lambda: h.phase("draining"))
    compiling = "compiling" if opts["compile_mode"] != "none" else "warm-up"
    sched = Scheduler(p["max_batch"], p["max_prefill_tokens"], p["cache_len"])
    try:
        warm_s = engine.warmup(rounds, warm_step, lambda k, n, what: h.phase(compiling, what, k, n))
        h.phase("measuring")
        if world > 1:
            torch.distributed.barrier()
        if leader:
            # Ctrl+C ends the load between steps, never inside one: a tensor-parallel step is a broadcast
            # and then collectives that every rank of the replica must join
            stop = threading.Event()
            previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
            try:
                res = run_load(engine, sched, gen, make_request, time.perf_counter,
                               lambda s: stop.wait(min(s, 0.1)), hooks, max_steps=opts["steps"],
                               drain_timeout=opts["drain_timeout"], stop=stop.is_set)
            finally:
                signal.signal(signal.SIGINT, previous)
                engine.stop_followers()
        else:  # a tensor-parallel follower: the leader's steps, then nothing of its own to report
            # Ctrl+C reaches every rank: the leader stops the load and then tells its followers, so a
            # follower keeps following (leaving early would strand the leader's next broadcast)
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                engine.follow()
            finally:
                signal.signal(signal.SIGINT, previous)
            res = LoadResult()
    except torch.OutOfMemoryError as exc:
        return h.oom(exc)
    except RuntimeError as exc:  # e.g. a forced SDPA kernel that cannot run the decode shapes
        return h.failed("engine failed", exc)
    for r in res.unfinished:
        em.request(**r.record())
    ends = [res.end]
    interrupted = res.stopped == "interrupted"
    if world > 1:
        gathered: list[Any] = [None] * world if rank == 0 else []
        torch.distributed.gather_object((res.end, interrupted), gathered if rank == 0 else None, dst=0)
        if rank == 0:
            ends = [end for end, _ in gathered]
            interrupted = any(i for _, i in gathered)
    summary = {  # the console computes the serving figures from the request events
        "load_duration_s": max(ends),
        "slo": {"ttft_ms": opts["slo_ttft_ms"], "tpot_ms": opts["slo_tpot_ms"]},
        "warmup_s": warm_s,
        "warmup_rounds": rounds,
        "compile_s": warm_s if opts["compile_mode"] != "none" else None,
        "engine": {"steps": res.steps, "stopped": res.stopped, "buckets": ran["decode_buckets"],
                   "kv_cache_bytes": ran["kv_cache_bytes"], "decode_steps_queued_ahead": engine.ahead_counts},
        "replicas": replicas,
        "tp": tp,
        "torch_mem_peak_bytes": h.peak_memory_bytes(),
        "interrupted": interrupted,
    }
    return h.finish(EXIT_INTERRUPTED if interrupted else EXIT_OK, summary, release=engine.close)


def main(argv: list[str] | None = None) -> int:
    return run_main(SERVE, argv, run)


if __name__ == "__main__":
    sys.exit(main())
