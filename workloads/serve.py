"""Inference serving load test: the dense model behind a KV-cache engine with continuous batching.

Run alone: ``python -m workloads.serve --preset tiny --num-requests 16`` (events as JSON lines on stdout).
Several replicas: ``torchrun --nproc-per-node N -m workloads.serve --replicas N ...``.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from typing import Any

from workloads.models.config import PRESETS, ModelConfig
from workloads.models.flops import bytes_moved, param_counts, serve_flops
from workloads.options import run_main
from workloads.protocol import CLOCK_HOST, Emitter
from workloads.specs.serve import SERVE, cache_len, lengths, load_checks, resolved

_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_POSITION_ROOM = 128  # the cache rounds positions up (scratch column, padded chunks, flex blocks)


def plan(opts: dict[str, Any], device_type: str = "cpu") -> dict[str, Any]:
    """The resolved run: model, cache, load shape, parameter counts, FLOPs per output token (torch-free)."""
    cfg: ModelConfig = PRESETS[opts["preset"]]
    if opts["layers"]:
        cfg = cfg.with_layers(opts["layers"])
    prompt, output = lengths(opts)
    n = cache_len(opts, prompt, output)
    room = -(-(n + 16) // _POSITION_ROOM) * _POSITION_ROOM
    if room > cfg.max_seq_len:  # position tables must cover the cache's spare columns
        cfg = replace(cfg, max_seq_len=room)
    max_batch = int(resolved(opts, "max_batch"))
    dtype = opts["dtype"] if opts["dtype"] != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    rate = opts["request_rate"]
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
    }


def _build(opts: dict[str, Any], p: dict[str, Any], device: Any, dtype: Any,
           group: Any = None) -> tuple[Any, dict[str, Any]]:
    """The engine on ``device`` with the attention kernel, FP8 and compile applied, sharded over ``group`` (a
    tensor-parallel replica's ranks) when given; and what actually ran."""
    import torch
    import torch.distributed as dist

    from workloads.engine import tensor_parallel
    from workloads.engine.engine import Engine
    from workloads.engine.work import StepChannel
    from workloads.models import fp8
    from workloads.models.attention import make_kernel
    from workloads.models.transformer import Transformer

    cfg = ModelConfig(**p["model"])
    tp = opts["tp"]
    kernel, attn_reason = make_kernel(
        opts["attention_backend"], device, dtype, n_heads=cfg.n_heads // tp, n_kv_heads=cfg.n_kv_heads // tp,
        head_dim=cfg.head_dim, seq_len=min(p["max_prefill_tokens"], p["cache_len"]),
        window=opts["attention_window"] or None, training=False,
    )
    recipe = None if opts["fp8_recipe"] == "auto" else opts["fp8_recipe"]
    fp8_choice = fp8.resolve(opts["fp8_mode"], recipe, device)
    with torch.device(device):
        model = Transformer(cfg, attention=kernel)
    model = model.to(dtype=dtype)
    channel = None
    if group is not None:  # every rank built the same seeded weights; each keeps its slice
        tensor_parallel.shard(model, dist.get_rank(group), tp, group)
        channel = StepChannel(group, max(p["max_batch"], 16 if fp8_choice.library == "te" else 1),
                              p["max_prefill_tokens"], device)
    autocast = fp8.apply(model, fp8_choice, head=opts.get("fp8_head", False))
    model.eval()
    engine = Engine(model, kernel, p["max_batch"], p["cache_len"], device, dtype, opts["compile_mode"], autocast,
                    pad_multiple=16 if fp8_choice.library == "te" else 1, channel=channel)
    if engine.step_module.flex:
        decode_attn = "flex decoding over each slot's live key blocks"
    elif kernel.backend == "auto":
        decode_attn = "matmul + masked fp32 softmax over the cache, grouped queries"
    else:
        decode_attn = f"SDPA {kernel.backend} with a per-slot length mask, grouped queries"
    ran = {
        "attention": {"requested": opts["attention_backend"], "prefill": attn_reason, "decode": decode_attn,
                      "window": kernel.window},
        "fp8": {"requested": opts["fp8_mode"], "library": fp8_choice.library, "recipe": fp8_choice.recipe,
                "reason": fp8_choice.reason},
        "compile": {"decode": opts["compile_mode"], "decode_inductor_options": engine.decode_options,
                    "prefill": engine.prefill_mode,
                    "cuda_graphs": opts["compile_mode"] == "reduce-overhead"},
        "decode_buckets": engine.buckets,
        "cache_positions": engine.cache.positions,
        "kv_cache_bytes": engine.cache.nbytes(),
        "tp": tp,
    }
    if tp > 1:
        ran["tensor_parallel"] = ("q/k/v, gate/up and the LM head split by output rows, wo and down by input "
                                  "columns with one all-reduce each; greedy over the vocabulary shards; embedding "
                                  "replicated; the leader broadcasts each step's plan to its group")
    return engine, ran


def _dry_run(opts: dict[str, Any]) -> int:
    problems = load_checks(opts)
    if problems:
        print(f"error: {problems[0][1]}", file=sys.stderr)
        return 2
    try:
        import torch

        cuda = opts["device"] != "cpu" and torch.cuda.is_available()
    except ImportError:
        cuda = False
    print(json.dumps(plan(opts, "cuda" if cuda else "cpu"), indent=2, default=str))
    return 0


def _generator(p: dict[str, Any], replica: int, replicas: int) -> Any:
    from workloads.engine.loadgen import ClosedLoop, LengthDist, OpenLoop

    load = p["load"]
    prompt, output = LengthDist.parse(load["prompt_len"]), LengthDist.parse(load["output_len"])
    common = {"num_requests": load["num_requests"], "duration": load["duration_s"], "replica": replica,
              "replicas": replicas}
    if load["mode"] == "open":
        return OpenLoop(load["request_rate"], load["burstiness"], prompt, output, load["seed"], **common)
    return ClosedLoop(load["concurrency"], prompt, output, load["seed"], **common)


def run(opts: dict[str, Any]) -> int:
    if opts["dry_run"]:
        return _dry_run(opts)

    import torch

    from workloads import parallel
    from workloads.engine.driver import Hooks, LoadResult, run_load
    from workloads.engine.loadgen import RequestSpec, prompt_tokens
    from workloads.engine.request import Request
    from workloads.engine.scheduler import Scheduler
    from workloads.loop import (
        SetupError,
        device_name,
        device_uuid,
        memory_fields,
        resolve_device,
        resolve_dtype,
        setup_failed,
    )

    em = Emitter()
    world, replicas, tp = parallel.world_size(), opts["replicas"], opts["tp"]
    rank = parallel.rank()
    replica, leader = rank // tp, rank % tp == 0
    try:
        problems = load_checks(opts)
        if problems:
            raise SetupError(problems[0][1])
        if world != replicas * tp:
            raise SetupError(f"--replicas {replicas} x --tp {tp} but {world} processes: launch with torchrun "
                             f"--nproc-per-node {replicas * tp} -m workloads.serve --replicas {replicas} --tp {tp} ...")
        group = None
        if world > 1:
            group = parallel.replica_groups("cuda" if opts["device"] != "cpu" and torch.cuda.is_available()
                                            else "cpu", replicas, tp)
        device = resolve_device(opts["device"])
        p = plan(opts, device.type)
        dtype = resolve_dtype(p["dtype"], device)
        torch.manual_seed(opts["seed"])
        engine, ran = _build(opts, p, device, dtype, group)
        gen = _generator(p, replica, replicas)
    except (SetupError, ValueError, torch.OutOfMemoryError) as exc:
        return setup_failed(em, exc, "the engine")

    precision = "fp8" if ran["fp8"]["library"] != "off" else p["dtype"]
    # every rank: each names its GPU, whose energy the summary counts (design.md, "Energy")
    em.meta(workload="serve", options=opts, plan=p, device=str(device), device_name=device_name(device),
            n_devices=world, precision=precision, flops_per_token=p["flops_per_output_token"],
            flops_per_token_note="per output token, the prompt's prefill included, at the mean lengths",
            params=p["params"], torch_version=torch.__version__, backends=ran, replicas=replicas, tp=tp,
            step_tokens="output tokens produced by one engine step of this rank's replica",
            device_uuid=device_uuid(device), **bytes_moved(ModelConfig(**p["model"]), _DTYPE_BYTES[p["dtype"]]))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_idx = 0
    cuda = device.type == "cuda"

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
                  series=lambda f: em.series("engine", replica=replica, **f))
    sched = Scheduler(p["max_batch"], p["max_prefill_tokens"], p["cache_len"])
    try:
        warm_s = engine.warmup(rounds, warm_step)
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
        em.error(f"out of memory: {str(exc).splitlines()[0]}", kind="oom")
        print(f"error: CUDA out of memory: {exc}", file=sys.stderr)
        return 3
    except RuntimeError as exc:  # e.g. a forced SDPA kernel that cannot run the decode shapes
        em.error(f"engine failed: {str(exc).splitlines()[0]}", kind="error")
        print(f"error: {exc}", file=sys.stderr)
        return 1
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
    code = 130 if interrupted else 0
    if rank == 0:  # reported before the teardown, which NCCL can stall; the console computes the figures
        em.summary(
            load_duration_s=max(ends),
            slo={"ttft_ms": opts["slo_ttft_ms"], "tpot_ms": opts["slo_tpot_ms"]},
            warmup_s=warm_s,
            warmup_rounds=rounds,
            compile_s=warm_s if opts["compile_mode"] != "none" else None,
            engine={"steps": res.steps, "stopped": res.stopped, "buckets": ran["decode_buckets"],
                    "kv_cache_bytes": ran["kv_cache_bytes"]},
            replicas=replicas,
            tp=tp,
            torch_mem_peak_bytes=torch.cuda.max_memory_allocated(device) if cuda else None,
            interrupted=interrupted,
        )
    em.close()
    engine.close()
    parallel.shutdown(code)
    return code


def main(argv: list[str] | None = None) -> int:
    return run_main(SERVE, argv, run)


if __name__ == "__main__":
    sys.exit(main())
