"""Decode-step changes side by side: one model, one engine per setting, every engine measured in every round.

A single record per setting is not enough on the H200 (docs/benchmarks.md: the same engine measured 5.30 and
4.66 ms in one call). Here the settings' engines are built first (each compiles and captures its own decode
graphs over the one model's weights), then measured in ``--rounds`` rounds, the order rotated each round, so a
GPU warming up or a clock settling falls on every setting alike. Per setting and batch: the decode graph alone
(100 replays timed by CUDA events) and ``Engine.run`` steps (the host clock between the ends of consecutive
steps, each step's tokens fed to the next as the serving loop does: what a request's inter-token latency is),
medians over the rounds with their range, against the roofline (weights but the input embedding, plus the live
KV cache, over the copy bandwidth measured here). Each setting's greedy tokens are checked equal to the first's.

Settings, '+'-joined: ``base`` (the engine as it is); ``pdl`` (inductor's programmatic dependent launch);
``flex`` (FlexAttention's decoding kernel instead of the split-KV kernels); ``kvN`` (flex with SPLIT_KV = N);
``inlined`` / ``bounded`` (RMSNorm and SiLU x up left to inductor, which inlines them into the projections, or
written once by ``workloads.models.boundaries``' kernels); ``noahead`` (the engine without look-ahead: each step
launched after the host read the previous one's tokens); ``twokernel`` (the split-KV attention as two kernels,
split then combine, instead of one whose last program per KV head combines); ``norope`` (RoPE and the cache
write by inductor before the attention kernel, instead of inside it); ``nocd`` (the decode step compiled without
coordinate-descent tuning); ``cdwide`` (coordinate descent that tries every direction, two steps out).
``SETTING#k`` builds another engine of the same setting (how much builds of the same code differ).
``--fresh-caches``: every engine compiled in its own empty inductor cache (nothing reused from an earlier build:
each compile tunes afresh), and the block sizes each build's tuning chose printed where builds of one setting
chose differently.

usage: python benchmarks/decode_ab.py [--layers 32] [--batches 1] [--settings base,bounded,flex]
       [--rounds 5] [--profile base,flex] [--fresh-caches]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve import copy_bandwidth  # benchmarks/serve.py
from serve_decode import decode_plan, kernels_markdown, llama_model, read_bytes, step_kernels, step_times
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

from workloads.engine import decode_attention
from workloads.engine import engine as engine_module
from workloads.engine.engine import Engine
from workloads.models import boundaries
from workloads.models.attention import AttentionKernel


def apply(setting: str, default_bounded: bool = boundaries.ENABLED) -> dict[str, int] | None:
    """Set the global switches of ``setting``; its flex kernel options (None: the split-KV kernels, not flex)."""
    names = set(setting.split("#")[0].split("+")) - {"base", "noahead"}
    engine_module.COORDINATE_DESCENT = "nocd" not in names
    torch._inductor.config.coordinate_descent_check_all_directions = "cdwide" in names
    torch._inductor.config.coordinate_descent_search_radius = 2 if "cdwide" in names else 1
    names -= {"nocd", "cdwide"}
    torch._inductor.config.triton.enable_pdl = "pdl" in names
    decode_attention.FUSED = "twokernel" not in names
    decode_attention.ROPE = "norope" not in names
    boundaries.ENABLED = "bounded" in names or (default_bounded and "inlined" not in names)
    flex: dict[str, int] | None = {} if "flex" in names else None
    for n in names - {"pdl", "flex", "inlined", "bounded", "twokernel", "norope"}:
        if not n.startswith("kv"):
            raise SystemExit(f"unknown setting {n!r} in {setting!r}")
        flex = {"SPLIT_KV": int(n[2:])}
    return flex


def graph_ms(engine: Engine, b: int, context: int, reps: int = 100) -> float:
    work = engine._work(decode_plan(engine, b, context))
    with torch.inference_mode():
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            engine._decode_bucket(work.bucket, work.stage)
        e.record()
        e.synchronize()
    return s.elapsed_time(e) / reps


def step_ms(engine: Engine, b: int, context: int, reps: int = 100) -> float:
    return statistics.median(step_times(engine, decode_plan(engine, b, context), reps))


def tokens(engine: Engine, b: int, context: int) -> list[int]:
    work = engine._work(decode_plan(engine, b, context))
    with torch.inference_mode():
        return engine._decode_bucket(work.bucket, work.stage).tolist()


def best_configs(cache: Path) -> dict[str, dict]:
    """The block sizes inductor's autotuning chose for each Triton kernel compiled into ``cache`` (its
    ``.best_config`` files), keyed by the kernel's name and cache key (the same source in two builds: the same key)."""
    out = {}
    for f in sorted(cache.rglob("*.best_config")):
        names = sorted({m for py in f.parent.glob("*.py") for m in re.findall(r"def (triton_\w+)\(", py.read_text())})
        out[f"{'/'.join(names)[:60]} {f.stem[:8]}"] = json.loads(f.read_text())
    return out


def configs_markdown(settings: list[str], tuned: dict[str, dict[str, dict]]) -> str:
    """Per setting built more than once: how many of its kernels' chosen configs differ between builds, and those."""
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for s in settings:
        groups[s.split("#")[0]].append(s)
    lines = []
    for name, builds in groups.items():
        if len(builds) < 2:
            continue
        keys = sorted(set().union(*(tuned[b] for b in builds)))
        shared = [k for k in keys if all(k in tuned[b] for b in builds)]
        drop = ("time_taken_ms", "triton_cache_hash", "configs_hash")
        differ = [k for k in shared if len({json.dumps({x: v for x, v in tuned[b][k].items() if x not in drop},
                                                       sort_keys=True) for b in builds}) > 1]
        lines.append(f"\n{name}: {len(builds)} builds, {len(keys)} tuned kernels, {len(shared)} in every build, "
                     f"{len(differ)} of those with different choices")
        for k in differ:
            lines.append(f"  {k}")
            for b in builds:
                c = {x: v for x, v in tuned[b][k].items() if x not in drop[1:]}
                lines.append(f"    {b}: {c}")
    return "\n".join(lines)


def profile(engine: Engine, b: int, context: int, top: int) -> None:
    count, total, rows = step_kernels(engine, b, context)
    print(f"  kernels per step {count:.0f}, their sum {total:.3f} ms")
    print(kernels_markdown(rows, top))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1")
    ap.add_argument("--settings", default="base,bounded,flex")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--context", type=int, default=640, help="every slot's position (prompt 512 + half of 256)")
    ap.add_argument("--profile", default="", help="settings whose batch-1 step is profiled kernel by kernel")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--fresh-caches", action="store_true", help="each engine compiled in its own empty inductor cache")
    args = ap.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    settings = args.settings.split(",")
    bw = copy_bandwidth("cuda")
    now = datetime.datetime.now(datetime.UTC)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, {now:%Y-%m-%d %H:%M} UTC, "
          f"llama-3.1-8b x {args.layers} layers, context {args.context}, copy bandwidth {bw / 1e12:.2f} TB/s\n",
          flush=True)
    kernel = AttentionKernel("auto")
    model = llama_model(args.layers, kernel)
    engines: dict[str, Engine] = {}
    tuned: dict[str, dict[str, dict]] = {}
    seen: dict[str, int] = {}
    scratch = Path(tempfile.mkdtemp(prefix="decode_ab-")) if args.fresh_caches else None
    if args.fresh_caches:
        torch._inductor.config.compile_threads = 1  # compiled in this process, into the build's own cache
    for s in settings:
        flex = apply(s)
        torch._dynamo.reset()  # each setting traced afresh (captured graphs replay without dynamo)
        t0 = time.perf_counter()
        decode_kernel = AttentionKernel("flex") if flex is not None else kernel
        cache = scratch / re.sub(r"\W", "_", s) if scratch else None
        with temporary_cache_dir(str(cache)) if cache else contextlib.nullcontext():
            engine = Engine(model, decode_kernel, max(batches), 1024, torch.device("cuda"), torch.bfloat16,
                            "reduce-overhead")
            engine.step_module.flex_options = flex or {}
            engine.lookahead = "noahead" not in s.split("#")[0].split("+")
            for b in batches:
                for _ in range(3):
                    engine.run(decode_plan(engine, b, args.context))
        engines[s] = engine
        counters = torch._dynamo.utils.counters
        breaks = sum(counters["graph_break"].values())
        tuned[s] = best_configs(cache) if cache else {}
        # whether this build compiled its graph or loaded an earlier build's (the same kernels and choices)
        fx = {k: counters["inductor"][f"fxgraph_cache_{k}"] - seen.get(k, 0) for k in ("hit", "miss", "bypass")}
        seen.update({k: counters["inductor"][f"fxgraph_cache_{k}"] for k in fx})
        print(f"{s}: compiled and captured in {time.perf_counter() - t0:.1f} s, {counters['stats']['unique_graphs']} "
              f"graphs, {breaks} graph breaks, FX graph cache {fx['hit']} hit / {fx['miss']} miss / {fx['bypass']} "
              "bypass" + (f", {len(tuned[s])} kernels tuned" if args.fresh_caches else ""), flush=True)
    apply("base")
    if args.fresh_caches:
        print(configs_markdown(settings, tuned))
    first = settings[0]
    for s in settings:
        for b in batches:
            same = tokens(engines[s], b, args.context) == tokens(engines[first], b, args.context)
            print(f"{s} batch {b}: tokens equal {first}'s: {same}")
    graph: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    step: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    for r in range(args.rounds):
        order = settings[r % len(settings):] + settings[:r % len(settings)]
        for s in order:
            for b in batches:
                graph[s, b].append(graph_ms(engines[s], b, args.context))
                step[s, b].append(step_ms(engines[s], b, args.context))
    print(f"\nmedians of {args.rounds} rounds (min-max)\n")
    print("| setting | batch | graph ms | step ms | roofline ms | roofline / graph | roofline / step | step vs "
          f"{first} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for b in batches:
        roof = read_bytes(engines[first], b, args.context) / bw * 1000.0
        base = statistics.median(step[first, b])
        for s in settings:
            g, st = graph[s, b], step[s, b]
            gm, sm = statistics.median(g), statistics.median(st)
            print(f"| {s} | {b} | {gm:.3f} ({min(g):.3f}-{max(g):.3f}) | {sm:.3f} ({min(st):.3f}-{max(st):.3f}) | "
                  f"{roof:.3f} | {roof / gm * 100:.1f}% | {roof / sm * 100:.1f}% | {base / sm:.3f}x |", flush=True)
    for s in filter(None, args.profile.split(",")):
        print(f"\n## profile: {s}, batch {batches[0]}")
        profile(engines[s], batches[0], args.context, args.top)


if __name__ == "__main__":
    main()
