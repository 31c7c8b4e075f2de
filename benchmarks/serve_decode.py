"""Where a serving decode step's time goes: the engine's decode variants side by side, against the HBM roofline.

For each variant (decode attention as the split-KV kernels, matmuls, SDPA efficient, or flex; ``-autotune``:
inductor's max-autotune) and batch, on the llama-3.1-8b shapes truncated to ``--layers``, with the engine's CUDA graphs:

- ``gpu ms``: the decode graph alone, 100 replays back to back timed by CUDA events (the host stays ahead);
- ``step ms``: ``Engine.run`` on a decode-only plan, one step at a time, host clock after the device sync
  (what the serving loop pays per step: staging inputs, the replay, copying the tokens back);
- roofline: bytes a step must read (every weight but the input embedding, plus the live KV cache) over the
  device-to-device copy bandwidth measured here.

``--settings``: the same variants under each of several library settings, '+'-joined: ``lt`` (cuBLASLt as torch's
BLAS), ``cd`` (inductor's coordinate-descent tuning of its Triton kernels everywhere: the engine already turns it
on for its decode step), ``pdl`` (programmatic dependent launch between inductor's Triton kernels), ``base``
(none of them), ``combo`` (inductor's combo kernels: independent small kernels launched as one).

usage: python benchmarks/serve_decode.py [--layers 8] [--batches 1,32] [--variants flex,matmul,...]
       [--settings base,lt,cd,pdl,cd+pdl]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import itertools
import statistics
import time

import torch
from serve import copy_bandwidth  # benchmarks/serve.py

from workloads.engine.engine import Engine
from workloads.engine.loadgen import RequestSpec
from workloads.engine.request import Request
from workloads.engine.scheduler import Plan
from workloads.models.attention import AttentionKernel
from workloads.models.config import PRESETS
from workloads.models.transformer import Transformer

VARIANTS = ("split", "flex", "matmul", "efficient")  # and "matmul-autotune"


def llama_model(layers: int, kernel: AttentionKernel) -> Transformer:
    """llama-3.1-8b's shapes at ``layers`` layers on the GPU, bf16, seeded initialisation, eval mode."""
    cfg = PRESETS["llama-3.1-8b"].with_layers(layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(cfg, attention=kernel)
    return model.to(torch.bfloat16).eval()


def step_kernels(engine: Engine, b: int, context: int,
                 reps: int = 20) -> tuple[float, float, list[tuple[str, float, float]]]:
    """The decode graph of batch ``b`` profiled over ``reps`` replays: kernels per step, their summed ms per step,
    and each kernel name with its launches per step and microseconds each (largest total first)."""
    from torch.profiler import ProfilerActivity, profile

    work = engine._work(decode_plan(engine, b, context))
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            engine._decode_bucket(work.bucket, work.stage)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "Memcpy" not in e.name and "Memset" not in e.name]
    per: dict[str, list[float]] = collections.defaultdict(list)
    for e in kernels:
        per[e.name].append(e.device_time)
    rows = [(name, len(ts) / reps, sum(ts) / len(ts)) for name, ts in sorted(per.items(), key=lambda kv: -sum(kv[1]))]
    return len(kernels) / reps, sum(e.device_time for e in kernels) / 1000.0 / reps, rows


def kernels_markdown(rows: list[tuple[str, float, float]], top: int) -> str:
    """``step_kernels``' rows as an indented markdown table, the ``top`` largest."""
    lines = ["  | kernel | per step | us each | us per step |", "  |---|---:|---:|---:|"]
    lines += [f"  | {name[:100]} | {n:.0f} | {us:.2f} | {n * us:.1f} |" for name, n, us in rows[:top]]
    return "\n".join(lines)


def build(layers: int, variant: str, max_batch: int, cache_len: int) -> Engine:
    attn, *extra = variant.split("-")
    mode = "max-autotune" if "autotune" in extra else "reduce-overhead"
    backend = {"matmul": "auto", "efficient": "efficient", "flex": "flex", "split": "auto"}[attn]
    kernel = AttentionKernel(backend)
    model = llama_model(layers, kernel)
    engine = Engine(model, kernel, max_batch, cache_len, torch.device("cuda"), torch.bfloat16, mode)
    if attn == "matmul":  # auto decodes with the split-KV kernels on a GPU; "matmul" forces the matmuls
        engine.step_module.mode = "dense"
    return engine


def decode_plan(engine: Engine, b: int, context: int) -> Plan:
    reqs = []
    for i in range(b):
        r = Request(RequestSpec(i, context, 10**6, 0.0), torch.zeros(context, dtype=torch.long), slot=i,
                    prefilled=context)
        r.tokens.append(1)
        reqs.append(r)
    return Plan(decode=reqs)


def step_times(engine: Engine, plan: Plan, reps: int) -> list[float]:
    """ms between the ends of consecutive ``Engine.run`` steps of ``plan``, each step's tokens fed to the next as
    the serving loop does (so look-ahead queues what the next step takes): what a request's inter-token latency is."""
    ends = [time.perf_counter()]
    for _ in range(reps + 1):
        for r, tok in engine.run(plan):
            r.tokens.append(tok)
        ends.append(time.perf_counter())
    return [(e - s) * 1000.0 for s, e in itertools.pairwise(ends[1:])]


def read_bytes(engine: Engine, b: int, context: int) -> int:
    m = engine.model
    weights = sum(p.numel() * p.element_size() for n, p in m.named_parameters() if n != "tok_embeddings.weight")
    kv = 2 * len(engine.cache.k) * b * engine.cache.k[0].shape[1] * context * engine.cache.k[0].shape[3] * 2
    return weights + kv


def measure(engine: Engine, b: int, context: int) -> tuple[float, float, float]:
    """(compile + capture s, gpu ms per replay, step ms) for a decode-only batch of b at ``context``."""
    plan = decode_plan(engine, b, context)
    t0 = time.perf_counter()
    for _ in range(3):
        engine.run(plan)
    compile_s = time.perf_counter() - t0
    work = engine._work(plan)
    with torch.inference_mode():
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(100):
            engine._decode_bucket(work.bucket, work.stage)
        e.record()
        e.synchronize()
    gpu = s.elapsed_time(e) / 100
    return compile_s, gpu, statistics.median(step_times(engine, plan, 200))


def kernel_table(engine: Engine, b: int, context: int, top: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    plan = decode_plan(engine, b, context)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.run(plan)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60)


def apply(setting: str) -> None:
    """Set torch's BLAS and inductor's options for ``setting`` ('+'-joined names; see the module docstring)."""
    names = set(setting.split("+")) - {"base"}
    if names - {"lt", "cd", "pdl", "combo"}:
        raise SystemExit(f"unknown setting in {setting!r}")
    torch.backends.cuda.preferred_blas_library("cublaslt" if "lt" in names else "cublas")
    torch._inductor.config.coordinate_descent_tuning = "cd" in names
    torch._inductor.config.triton.enable_pdl = "pdl" in names
    torch._inductor.config.combo_kernels = "combo" in names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--context", type=int, default=640, help="every slot's position (prompt 512 + half of 256)")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of the first variant")
    ap.add_argument("--settings", default="base", help="library settings to run each variant under (docstring)")
    args = ap.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    bw = copy_bandwidth("cuda")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}, "
          f"llama-3.1-8b x {args.layers} layers, context {args.context}, copy bandwidth {bw / 1e12:.2f} TB/s\n")
    print("| variant | settings | batch | compile s | gpu ms | step ms | roofline ms | gpu % roof | step % roof "
          "| tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    runs = [(v, s) for s in args.settings.split(",") for v in args.variants.split(",")]
    for i, (variant, setting) in enumerate(runs):
        apply(setting)
        engine = build(args.layers, variant, max(batches), 1024)
        for b in batches:
            c, gpu, step = measure(engine, b, args.context)
            roof = read_bytes(engine, b, args.context) / bw * 1000.0
            print(f"| {variant} | {setting} | {b} | {c:.1f} | {gpu:.3f} | {step:.3f} | {roof:.3f} | "
                  f"{roof / gpu * 100:.1f}% | {roof / step * 100:.1f}% | {b / step * 1000:,.0f} |", flush=True)
            if args.profile and i == 0:
                print(kernel_table(engine, b, args.context))
        del engine
        torch.cuda.empty_cache()
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
