"""Serving load test on one GPU: decode against the HBM roofline, Hugging Face generate side by side, and a
request-rate sweep showing where goodput falls off.

Every btune figure comes from a real `python -m tuner run serve ...` record. The roofline divides the bytes a
batch-1 decode step must read (every weight but the input embedding, plus the slot's KV cache) by the
device-to-device copy bandwidth measured here, and compares it with the median pure-decode engine step
(host clock after a device sync, Python included). The Hugging Face figures come from LlamaForCausalLM
(transformers) with the same config, layers, dtype and weights (btune's seeded initialisation copied in,
checked by comparing logits), the same prompts (btune's seeded load generator) and lengths, generating with
a static cache, compiled where transformers supports it; output tokens/s = batch x output tokens / time of
one generate call (median, after warm-up), against btune's closed-loop run of the same batch.
usage: python benchmarks/serve.py [--layers 32] [--part all|roofline|hf|sweep|table|start] [--sweep-duration 30]
``--part table --batches 1,8,32,64 [--repeats 3]``: the decode roofline at each batch with MBU and Hugging Face
side by side (medians of interleaved records with --repeats);
``--part start``: launch to the first measured request, cold (empty compile caches) and warm.
Prints markdown tables. `--device cpu --preset tiny-llama` smoke-tests the script without a GPU (eager, fp32).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any

from tuner.launch import run_record

SEED = 0


@dataclass(frozen=True)
class Bench:
    """What every run of this benchmark shares."""

    preset: str = "llama-3.1-8b"
    layers: int = 32
    prompt: int = 512
    output: int = 256
    device: str = "cuda"
    out: str = ""

    @property
    def graphs(self) -> str:
        """The decode compile mode: CUDA graphs on a GPU; eager on CPU (smoke test)."""
        return "reduce-overhead" if self.device == "cuda" else "none"


def btune_run(b: Bench, args: list[str]) -> dict[str, Any]:
    """A serve run through the console core (tuner.launch.run_record), as `btune run serve ARGS` runs it."""
    return run_record("serve", ["--preset", b.preset, "--layers", str(b.layers), "--device", b.device,
                                "--seed", str(SEED), *args], b.out)


def failed(rec: dict[str, Any]) -> str | None:
    if rec.get("status") == "ok" and (rec.get("summary") or {}).get("workload"):
        return None
    return f"{rec.get('status')}: {((rec.get('error') or {}).get('message') or '')[:150]}"


def serving(rec: dict[str, Any]) -> dict[str, Any]:
    return rec["summary"]["serving"]


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of 20 copies of 2 GiB (256 MiB on CPU)."""
    import torch

    n = 2 << 30 if device == "cuda" else 256 << 20
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for i in range(25):
        if device == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            b.copy_(a)
            e.record()
            e.synchronize()
            t = s.elapsed_time(e) / 1000.0
        else:
            t0 = time.perf_counter()
            b.copy_(a)
            t = time.perf_counter() - t0
        if i >= 5:
            times.append(t)
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2 * n / statistics.median(times)


def decode_bytes(rec: dict[str, Any]) -> int:
    """Bytes one batch-1 decode step reads: every parameter but the input embedding, and one slot's KV cache."""
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    plan, params = meta["plan"], meta["params"]
    m = plan["model"]
    elt = {"bf16": 2, "fp16": 2, "fp32": 4}[plan["dtype"]]
    weights = (params["matmul"] + params["other"]) * elt
    kv = 2 * m["n_layers"] * m["n_kv_heads"] * meta["backends"]["cache_positions"] * (m["d_model"] // m["n_heads"])
    return weights + kv * elt


def lengths_args(batch: int, prompt: int, output: int, reps: int) -> list[str]:
    """A closed loop of ``batch`` clients sending ``reps`` equal requests each, at the engine's default prefill
    budget (2048 tokens a step; a budget of the whole batch's prompts, prefilling each wave in one step as
    Hugging Face's ``generate`` does, measured slower at batch 32: docs/benchmarks.md)."""
    return ["--max-batch", str(batch), "--concurrency", str(batch), "--num-requests", str(batch * reps),
            "--prompt-len", f"fixed:{prompt}", "--output-len", f"fixed:{output}",
            "--max-prefill-tokens", str(max(2048, prompt))]


def part_roofline(b: Bench) -> dict[str, dict[str, Any]]:
    bw = copy_bandwidth(b.device)
    print(f"device-to-device copy bandwidth: {bw / 1e12:.2f} TB/s (read + write, median of 20 copies)\n")
    print("| batch-1 decode | engine decode step p50 ms | roofline ms | % of HBM roofline | TPOT p50 ms "
          "| roofline / TPOT | output tok/s (run) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    recs = {}
    modes = {"eager": "none", "reduce-overhead (CUDA graphs)": b.graphs}
    for label, mode in modes.items() if b.device == "cuda" else [("eager", "none")]:
        rec = btune_run(b, [*lengths_args(1, b.prompt, b.output, 4), "--compile-mode", mode])
        recs[mode] = rec
        why = failed(rec)
        if why:
            print(f"| {label} | {why} | | | | | |")
            continue
        step = rec["summary"]["engine"]["decode_step_ms"]["p50"]
        roof = decode_bytes(rec) / bw * 1000.0
        tpot = serving(rec)["tpot_ms"]["p50"]
        print(f"| {label} | {step:.3f} | {roof:.3f} | {roof / step * 100:.1f}% | {tpot:.3f} | "
              f"{roof / tpot * 100:.1f}% | {serving(rec)['output_tokens_per_s']:,.1f} |", flush=True)
    return recs


def hf_child(b: Bench, batch: int, reps: int, compiled: bool) -> None:
    """One Hugging Face measurement (its own process): prints RESULT tokens/s, ms per generate, label.

    ``--device cpu`` checks the weight mapping and the generate call (tiny presets) where there is no GPU.
    """
    import numpy as np
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from workloads.checkpoint import hf_tensors
    from workloads.engine.loadgen import prompt_tokens
    from workloads.models.config import PRESETS, ModelConfig
    from workloads.models.transformer import Transformer
    from workloads.serve import plan
    from workloads.specs.serve import SERVE

    layers, prompt, output, device = b.layers, b.prompt, b.output, b.device
    opts = {**SERVE.defaults(), "preset": b.preset, "layers": layers, "max_batch": batch, "concurrency": batch,
            "prompt_len": f"fixed:{prompt}", "output_len": f"fixed:{output}"}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = ModelConfig(**plan(opts, device)["model"])  # the config btune builds (same init, same weights)
    torch.manual_seed(SEED)
    with torch.device(device):
        ours = Transformer(cfg)
    ours = ours.to(dtype).eval()
    base = PRESETS[b.preset]
    hf_cfg = LlamaConfig(hidden_size=base.d_model, intermediate_size=base.d_ff, num_hidden_layers=layers,
                         num_attention_heads=base.n_heads, num_key_value_heads=base.n_kv_heads,
                         vocab_size=base.vocab_size, max_position_embeddings=base.max_seq_len,
                         rope_theta=base.rope_theta, rms_norm_eps=base.norm_eps, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(dtype)  # built in the run's dtype: no fp32 copy next to btune's model
    with torch.device(device):
        hf = LlamaForCausalLM(hf_cfg).eval()
    torch.set_default_dtype(torch.float32)
    sd = hf_tensors(ours, replace(cfg, tie_embeddings=False), "llama")  # the checkpoint format's names and layout
    hf.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=True)
    ids = torch.tensor(np.stack([prompt_tokens(SEED, rid, prompt, base.vocab_size) for rid in range(batch)]),
                       device=device)
    with torch.inference_mode():  # same weights: the next-token logits agree
        x, y = ours(ids[:1])[0, -1].float(), hf(input_ids=ids[:1]).logits[0, -1].float()
        agree = f"logits max |diff| {(x - y).abs().max().item():.3f}, argmax equal {bool(x.argmax() == y.argmax())}"
    del ours
    if device == "cuda":
        torch.cuda.empty_cache()
    gc = hf.generation_config
    gc.eos_token_id, gc.pad_token_id = None, 0
    how = "eager"
    if compiled and device != "cuda":
        how = "eager (transformers compiles generate on GPUs only)"
    elif compiled:
        if hasattr(gc, "disable_compile"):  # transformers compiles generate's forward itself with a static cache
            gc.disable_compile = False
            how = "compiled by transformers (static cache)"
        else:
            hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
            how = "forward compiled reduce-overhead"
    elif not compiled and hasattr(gc, "disable_compile"):
        gc.disable_compile = True
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def generate() -> torch.Tensor:
        return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output, do_sample=False,
                           cache_implementation="static")

    with torch.inference_mode():
        for _ in range(3):
            generate()
        times = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            out = generate()
            sync()
            times.append(time.perf_counter() - t0)
    assert out.shape[1] == prompt + output, out.shape
    s = statistics.median(times)
    print(f"RESULT {batch * output / s:.1f} {s * 1000:.1f} transformers {transformers.__version__}, static cache, "
          f"{how}; {agree}")


def part_hf(b: Bench, batches: tuple[int, ...], modes: tuple[bool, ...] = (False, True)) -> dict[int, Any]:
    print("\n| batch | btune output tok/s | HF eager tok/s | HF compiled tok/s | btune / best HF | HF setup |")
    print("|---:|---:|---:|---:|---:|---|")
    recs = {}
    for batch in batches:
        rec = btune_run(b, [*lengths_args(batch, b.prompt, b.output, 4), "--compile-mode", b.graphs])
        recs[batch] = rec
        why = failed(rec)
        ours = None if why else serving(rec)["output_tokens_per_s"]
        hf: dict[bool, float | None] = {}
        note = ""
        for compiled in (False, True):
            if compiled not in modes:
                hf[compiled] = None
                continue
            res = subprocess.run([sys.executable, __file__, "--hf-child", str(batch), str(int(compiled)), "--layers",
                                  str(b.layers), "--prompt", str(b.prompt), "--output", str(b.output), "--preset",
                                  b.preset, "--device", b.device], capture_output=True, text=True)
            line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT")), None)
            if line is None:
                hf[compiled] = None
                note += f"{'compiled' if compiled else 'eager'} failed: " \
                        f"{(res.stderr.strip().splitlines() or ['?'])[-1][:100]}; "
                continue
            parts = line.split(maxsplit=3)
            hf[compiled] = float(parts[1])
            note = parts[3] if compiled else note or parts[3]
        best = max((v for v in hf.values() if v), default=None)
        ratio = f"{ours / best:.2f}x" if ours and best else "-"
        cell = f"{ours:,.1f}" if ours else why
        eager, comp = (f"{hf[c]:,.1f}" if hf[c] else "-" for c in (False, True))
        print(f"| {batch} | {cell} | {eager} | {comp} | {ratio} | {note} |", flush=True)
    return recs


def find(d: Any, key: str) -> Any:
    """The first value under ``key`` anywhere in a nested record."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            if (hit := find(v, key)) is not None:
                return hit
    return None


def mbu_cell(rec: dict[str, Any]) -> str:
    """The record's MBU (achieved bytes/s over the datasheet peak) as a table cell."""
    mbu = (find(rec["summary"], "mbu") or {}).get("value")
    return f"{mbu * 100:.1f}%" if isinstance(mbu, float) else "-"


def live_bytes(rec: dict[str, Any], batch: int, context: float) -> float:
    """Bytes one decode step of ``batch`` slots must read: every weight but the input embedding, and each slot's
    live KV cache at ``context`` tokens (what flex decode reads; not the whole cache)."""
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    plan, params = meta["plan"], meta["params"]
    m = plan["model"]
    elt = {"bf16": 2, "fp16": 2, "fp32": 4}[plan["dtype"]]
    kv = 2 * m["n_layers"] * m["n_kv_heads"] * (m["d_model"] // m["n_heads"]) * context * batch
    return (params["matmul"] + params["other"] + kv) * elt


def part_table(b: Bench, batches: tuple[int, ...], hf_batches: tuple[int, ...], repeats: int = 1) -> None:
    """The decode roofline at each batch (closed-loop `btune run serve` records) with Hugging Face's compiled
    static-cache generate at the same batch, prompt and output lengths, side by side. With ``repeats`` > 1 each
    batch gets that many records, interleaved (batch 1, 8, ..., then again), and the table shows their medians
    and the decode step's range: single records of one setting differ by more than the changes measured."""
    bw = copy_bandwidth(b.device)
    print(f"device-to-device copy bandwidth: {bw / 1e12:.2f} TB/s (read + write, median of 20 copies)\n")
    context = b.prompt + b.output / 2  # a slot's mean live context over its decode
    recs: dict[int, list[dict[str, Any]]] = {batch: [] for batch in batches}
    for _ in range(repeats):
        for batch in batches:
            rec = btune_run(b, [*lengths_args(batch, b.prompt, b.output, 4), "--compile-mode", b.graphs])
            why = failed(rec)
            if why:
                print(f"  (batch {batch}: {why})")
                continue
            recs[batch].append(rec)
    print("| batch | records | decode step p50 ms | step range ms | ITL p50 ms | TPOT p50 ms | roofline ms "
          "| roofline / step | roofline / ITL | MBU (datasheet) | btune output tok/s | HF compiled tok/s "
          "| btune / HF |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in batches:
        rs = recs[batch]
        if not rs:
            print(f"| {batch} | 0 | failed ||||||||||")
            continue
        steps = [r["summary"]["engine"]["decode_step_ms"]["p50"] for r in rs]
        step = statistics.median(steps)
        itl = statistics.median(serving(r)["itl_ms"]["p50"] for r in rs)
        tpot = statistics.median(serving(r)["tpot_ms"]["p50"] for r in rs)
        ours = statistics.median(serving(r)["output_tokens_per_s"] for r in rs)
        mid = min(rs, key=lambda r: abs(r["summary"]["engine"]["decode_step_ms"]["p50"] - step))
        roof = live_bytes(mid, batch, context) / bw * 1000.0
        hf = None
        if batch in hf_batches:
            res = subprocess.run([sys.executable, __file__, "--hf-child", str(batch), "1", "--layers", str(b.layers),
                                  "--prompt", str(b.prompt), "--output", str(b.output), "--preset", b.preset,
                                  "--device", b.device], capture_output=True, text=True)
            line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT")), None)
            hf = float(line.split()[1]) if line else None
            if line is None:
                print(f"  (HF at batch {batch} failed: {(res.stderr.strip().splitlines() or ['?'])[-1][:120]})")
        print(f"| {batch} | {len(rs)} | {step:.3f} | {min(steps):.3f}–{max(steps):.3f} | {itl:.3f} | {tpot:.3f} | "
              f"{roof:.3f} | {roof / step * 100:.1f}% | {roof / itl * 100:.1f}% | {mbu_cell(mid)} | {ours:,.0f} | "
              f"{f'{hf:,.0f}' if hf else '-'} | {f'{ours / hf:.2f}x' if hf else '-'} |", flush=True)


def part_start(b: Bench) -> None:
    """Launch to the first measured request of a batch-1 `btune run serve` with CUDA graphs: once with empty compile
    caches (inductor's and Triton's, in a fresh directory), then again with the caches the first run left."""
    import os

    print("\n| start | launch to first measured request s | warm-up s | compile caches |")
    print("|---|---:|---:|---|")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        for label in ("cold", "warm"):
            rec = btune_run(b, [*lengths_args(1, b.prompt, b.output, 2), "--compile-mode", b.graphs])
            why = failed(rec)
            if why:
                print(f"| {label} | {why} | | |")
                continue
            # the load (and its first request, arriving at 0) starts with the "measuring" phase
            load = next(e for e in rec["events"] if e["type"] == "phase" and e.get("phase") == "measuring")
            at = load["t"] - rec["started_ts"]
            warm = find(rec["summary"], "warmup_s")
            print(f"| {label} | {at:.1f} | {warm:.1f} | {'empty' if label == 'cold' else 'from the cold run'} |",
                  flush=True)
        del os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"]


def part_sweep(b: Bench, duration: float,
               fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)) -> None:
    gpu = b.device == "cuda"
    load = ["--max-batch", "32" if gpu else "4", "--prompt-len", "uniform:128,1024" if gpu else "uniform:8,64",
            "--output-len", "uniform:32,256" if gpu else "uniform:4,32", "--compile-mode", b.graphs]
    cap = btune_run(b, [*load, "--concurrency", "64" if gpu else "8", "--duration", str(duration),
                        "--drain-timeout", "0"])
    why = failed(cap)
    if why:
        print(f"\nsaturation run failed: {why}")
        return
    capacity = serving(cap)["request_throughput"]
    slo = serving(cap)["slo"]
    print(f"\nclosed loop, {load[1]} slots, twice as many clients: {capacity:.2f} req/s, "
          f"{serving(cap)['output_tokens_per_s']:,.0f} output tok/s (capacity)")
    print(f"request-rate sweep: Poisson arrivals for {duration:g} s, then up to {duration:g} s to drain; "
          f"SLO TTFT <= {slo['ttft_ms']:g} ms, TPOT <= {slo['tpot_ms']:g} ms\n")
    print("| rate req/s | x capacity | req/s done | goodput req/s | good % | TTFT p50 / p99 ms | TPOT p50 / p99 ms "
          "| ITL p99 ms | E2E p99 ms | output tok/s | MBU (datasheet) | peak conc. | unfinished |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for frac in fractions:
        rate = capacity * frac
        rec = btune_run(b, [*load, "--request-rate", f"{rate:.4f}", "--duration", str(duration),
                            "--drain-timeout", str(duration)])
        why = failed(rec)
        if why:
            print(f"| {rate:.2f} | {frac:.2f} | {why} ||||||||||")
            continue
        s = serving(rec)
        n = s["requests"]

        def pair(key: str, s: dict[str, Any] = s) -> str:
            d = s[key]
            return f"{d['p50']:,.0f} / {d['p99']:,.0f}" if d["n"] else "-"

        print(f"| {rate:.2f} | {frac:.2f} | {s['request_throughput']:.2f} | {s['goodput']:.2f} | "
              f"{n['good'] / max(n['total'], 1) * 100:.0f}% | {pair('ttft_ms')} | {pair('tpot_ms')} | "
              f"{s['itl_ms']['p99'] or 0:,.1f} | {s['e2e_ms']['p99'] or 0:,.0f} | {s['output_tokens_per_s']:,.0f} | "
              f"{mbu_cell(rec)} | {s['peak_concurrency']} | {n['unfinished']} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=Bench.preset, help="a llama-arch preset")
    ap.add_argument("--layers", type=int, default=Bench.layers)
    ap.add_argument("--prompt", type=int, default=Bench.prompt)
    ap.add_argument("--output", type=int, default=Bench.output)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--sweep-duration", type=float, default=30.0)
    ap.add_argument("--part", default="all", choices=("all", "roofline", "hf", "sweep", "table", "start"))
    ap.add_argument("--hf-batches", default="1,8,32,64", help="batches of --part table with HF generate beside")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke test, no figures")
    ap.add_argument("--hf-modes", default="eager,compiled", help="which Hugging Face generate setups to run")
    ap.add_argument("--fractions", default="0.25,0.5,0.75,0.9,1.0,1.1,1.25,1.5,2.0",
                    help="sweep rates as fractions of the measured capacity")
    ap.add_argument("--repeats", type=int, default=1, help="--part table: records per batch, interleaved")
    ap.add_argument("--hf-child", nargs=2, metavar=("BATCH", "COMPILED"))
    args = ap.parse_args()
    bench = Bench(args.preset, args.layers, args.prompt, args.output, args.device)
    if args.hf_child:
        hf_child(bench, int(args.hf_child[0]), 5, bool(int(args.hf_child[1])))
        return
    import torch

    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (smoke test)"
    print(f"device {name}, torch {torch.__version__}, {datetime.date.today()}, {args.preset} shapes, "
          f"{args.layers} layers, prompt {args.prompt} / output {args.output} tokens\n")
    with tempfile.TemporaryDirectory() as out:
        bench = Bench(args.preset, args.layers, args.prompt, args.output, args.device, out)
        if args.part in ("all", "roofline"):
            part_roofline(bench)
        if args.part in ("all", "hf"):
            modes = tuple(m == "compiled" for m in args.hf_modes.split(","))
            part_hf(bench, tuple(int(x) for x in args.batches.split(",")), modes)
        if args.part == "table":
            part_table(bench, tuple(int(x) for x in args.batches.split(",")),
                       tuple(int(x) for x in args.hf_batches.split(",") if x), args.repeats)
        if args.part == "start":
            part_start(bench)
        if args.part in ("all", "sweep"):
            part_sweep(bench, args.sweep_duration, tuple(float(x) for x in args.fractions.split(",")))


if __name__ == "__main__":
    main()
