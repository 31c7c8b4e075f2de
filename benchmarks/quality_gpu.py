"""Checkpoints and the quality gate on one GPU (issue 19).

1. The trained tiny model (tests/data/tiny_model, made by btune: tests/data/tiny_model/make.py) scored on its
   held-out text by the ``perplexity`` workload under each setting: fp32, bf16, FP8 (torchao tensorwise and
   rowwise) and each attention backend, each gated against bf16 with ``tuner.quality.gate`` (0.5%); a
   deliberately wrong setting (``--rope-theta`` 10x) must fail it.
2. Loading a llama-3.1-8b-shaped checkpoint (random weights saved here by transformers' ``save_pretrained``,
   bf16, 16 GB in 4 shards): ``workloads.checkpoint.load`` against ``LlamaForCausalLM.from_pretrained`` of the
   same directory onto the GPU, alternated, each twice (the first pair reads a cold page cache for whichever
   goes first: both orders are shown), and the two models' logits on one prompt.

3. The no-backward paths under FP8 rowwise, eager (forward passes run under no_grad there: torchao's rowwise
   tensors cannot be reshaped in inference mode): dense prefill and decode on tiny-llama.
4. ``serve --checkpoint``: the load test on the trained tiny model and on the llama-3.1-8b-shaped checkpoint of
   (2), bf16 and FP8.

usage: python benchmarks/quality_gpu.py [--skip-load] [--skip-quality] [--skip-serve] [--rows WORD,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner.quality import gate  # noqa: E402
from tuner.runs import load_record  # noqa: E402

MODEL = ROOT / "tests" / "data" / "tiny_model"


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("BTUNE_")}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return out


def perplexity(runs: Path, *flags: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "tuner", "run", "perplexity", "--out", str(runs), "--checkpoint",
                          str(MODEL), "--data", str(MODEL / "heldout.txt"), "--device", "cuda", *flags],
                         env=env(), capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr.strip() or res.stdout.strip()).splitlines() or ["?"]
        return {"refused": tail[-1][:300]}
    return load_record(Path(res.stdout.strip().splitlines()[-1]))


def btune_run(runs: Path, *args: str) -> dict:
    """``btune run ARGS`` on the GPU; its record, or {"refused": last line}."""
    res = subprocess.run([sys.executable, "-m", "tuner", "run", "--out", str(runs), *args], env=env(),
                         capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr.strip() or res.stdout.strip()).splitlines() or ["?"]
        return {"refused": tail[-1][:300]}
    return load_record(Path(res.stdout.strip().splitlines()[-1]))


def quality_table(work: Path, rows: list[str] | None = None) -> None:
    runs = work / "runs"
    settings = [
        ("bf16 (baseline)", ["--dtype", "bf16"]),
        ("fp32", ["--dtype", "fp32"]),
        ("bf16 + FP8 torchao tensorwise", ["--dtype", "bf16", "--fp8-mode", "torchao", "--fp8-recipe", "tensorwise"]),
        ("bf16 + FP8 torchao rowwise (eager)", ["--dtype", "bf16", "--fp8-mode", "torchao", "--fp8-recipe", "rowwise"]),
        ("bf16 + FP8 torchao rowwise, compiled", ["--dtype", "bf16", "--fp8-mode", "torchao", "--fp8-recipe",
                                                  "rowwise", "--compile-mode", "default"]),
        *[(f"bf16, attention {b}", ["--dtype", "bf16", "--attention-backend", b])
          for b in ("math", "flash", "efficient", "cudnn", "flex")],
        ("bf16, compiled (default)", ["--dtype", "bf16", "--compile-mode", "default"]),
        ("bf16, --rope-theta 10x (wrong on purpose)", ["--dtype", "bf16", "--rope-theta", "__ROPE__"]),
    ]
    config = json.loads((MODEL / "config.json").read_text())
    rope = float(config.get("rope_theta", 10000.0)) * 10
    base = None
    print("| setting | perplexity | mean NLL | tokens scored | gate vs bf16 (0.5%) |")
    print("|---|---|---|---|---|")
    for name, flags in settings:
        if rows and base is not None and not any(w in name for w in rows):
            continue
        flags = [str(rope) if f == "__ROPE__" else f for f in flags]
        rec = perplexity(runs, *flags)
        if "refused" in rec:
            print(f"| {name} | failed: {rec['refused']} | | | |")
            continue
        s = rec["summary"]
        q = s.get("quality") or s
        if base is None:
            base = s
            verdict = "baseline"
        else:
            ok, message = gate(base, s, 0.005)
            verdict = f"{'pass' if ok else 'FAIL'}: {message}"
        print(f"| {name} | {q.get('perplexity')} | {q.get('mean_nll')} | {q.get('tokens_scored')} | {verdict} |")
    print()


def no_backward_table(work: Path) -> None:
    runs = work / "runs"
    print("| dense tiny-llama, eager | bf16 tokens/s | FP8 rowwise tokens/s | status |")
    print("|---|---|---|---|")
    for mode in ("prefill", "decode"):
        common = ["dense", "--preset", "tiny-llama", "--mode", mode, "--device", "cuda", "--steps", "20",
                  "--dtype", "bf16"]
        a = btune_run(runs, *common)
        b = btune_run(runs, *common, "--fp8-mode", "torchao", "--fp8-recipe", "rowwise")
        speed = [f"{r['summary'].get('throughput_tokens_per_s') or 0:,.0f}" if "summary" in r else "-" for r in (a, b)]
        status = "; ".join(r.get("refused") or r["status"] for r in (a, b))
        print(f"| {mode} | {speed[0]} | {speed[1]} | {status} |")
    print()


def serve_table(work: Path) -> None:
    runs = work / "runs"
    big = work / "llama8b"
    small = ["--prompt-len", "uniform:16,160", "--output-len", "uniform:8,64", "--num-requests", "64",
             "--max-batch", "16"]
    large = ["--prompt-len", "uniform:128,1024", "--output-len", "uniform:32,256", "--num-requests", "128",
             "--max-batch", "32"]
    settings = [("tiny_model, bf16", MODEL, small, []),
                ("tiny_model, FP8 torchao rowwise (eager)", MODEL, small,
                 ["--fp8-mode", "torchao", "--fp8-recipe", "rowwise"]),
                ("llama-3.1-8b shape, bf16", big, large, []),
                ("llama-3.1-8b shape, FP8 torchao tensorwise", big, large, ["--fp8-mode", "torchao"])]
    print("| serve --checkpoint | status | load s | output tok/s | TTFT p50 ms | TPOT p50 ms |")
    print("|---|---|---|---|---|---|")
    for name, path, load, knobs in settings:
        if not (path / "config.json").exists():
            print(f"| {name} | no checkpoint at {path} | | | | |")
            continue
        rec = btune_run(runs, "serve", "--checkpoint", str(path), "--device", "cuda", "--dtype", "bf16", *load, *knobs)
        if "refused" in rec:
            print(f"| {name} | failed: {rec['refused']} | | | | |")
            continue
        meta = next(e for e in rec["events"] if e["type"] == "meta")
        sv = rec["summary"]["serving"]
        print(f"| {name} | {rec['status']} | {meta['checkpoint']['load_s']:.2f} | {sv['output_tokens_per_s']:,.0f} | "
              f"{sv['ttft_ms']['p50']:.1f} | {sv['tpot_ms']['p50']:.2f} |")
    print()


def load_table(work: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from workloads import checkpoint

    d = work / "llama8b"
    if not (d / "config.json").exists():
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                          rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
        t0 = time.perf_counter()
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(d, max_shard_size="5GB")
        del model
        gc.collect()
        torch.cuda.empty_cache()
        size = sum(f.stat().st_size for f in d.iterdir())
        print(f"saved a random llama-3.1-8b-shaped checkpoint: {size / 1e9:.2f} GB in "
              f"{len(list(d.glob('*.safetensors')))} shards, {time.perf_counter() - t0:.1f} s")

    def btune_load() -> object:
        model, _, _ = checkpoint.load(str(d), "cuda", torch.bfloat16)
        return model

    def hf_load() -> object:
        return LlamaForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map="cuda")

    rows = []
    prompt = torch.randint(0, 128256, (1, 64), device="cuda")
    logits = {}
    for order in (("btune", "transformers"), ("transformers", "btune"), ("btune", "transformers")):
        for who in order:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model = btune_load() if who == "btune" else hf_load()
            torch.cuda.synchronize()
            rows.append((who, time.perf_counter() - t0))
            if who not in logits:
                with torch.no_grad():
                    out = model(prompt)
                    logits[who] = (out if who == "btune" else out.logits).float()
            del model
            gc.collect()
            torch.cuda.empty_cache()
    print("| load (in order) | seconds |")
    print("|---|---|")
    for who, s in rows:
        print(f"| {who} | {s:.2f} |")
    diff = (logits["btune"] - logits["transformers"]).abs().max().item()
    scale = logits["transformers"].abs().max().item()
    print(f"logits on one 64-token prompt, bf16: max |btune - transformers| {diff:.4g} (max |logit| {scale:.4g})")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--rows", default="", help="quality rows whose name holds one of these words (the baseline always)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="btune-quality-"))
    import torch

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    if not args.skip_quality:
        quality_table(work, [w for w in args.rows.split(",") if w])
        no_backward_table(work)
    if not args.skip_load:
        load_table(work)
    if not args.skip_serve:
        serve_table(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
