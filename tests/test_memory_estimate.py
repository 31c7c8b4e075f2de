"""The dry-run memory estimate against memory counted independently: the tensors autograd saves on CPU, and the
peaks measured on an H200 (benchmarks/results/memory-h200-*.json, written by benchmarks/memory_gpu.py)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest
import torch
from support import ROOT, saved_bytes

from tuner import catalog
from tuner.launch import estimate_parts
from workloads.models.attention import AttentionKernel
from workloads.models.config import PRESETS
from workloads.models.moe import MoETransformer
from workloads.models.moe_config import MOE_PRESETS
from workloads.models.moe_flops import moe_memory_estimate

sys.path.insert(0, str(ROOT / "benchmarks"))
import memory_gpu


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_eager_moe_layer_activations_equal_what_autograd_saves(top_k: int) -> None:
    """One MoE layer's saved tensors (4 layers less 2, halved: the embedding, head and RoPE table cancel) with the
    grouped experts as on a Hopper GPU, bf16, against the estimate's activations per layer."""
    base = replace(PRESETS["llama-3.1-8b"], d_model=256, n_heads=4, n_kv_heads=1, d_ff=704, vocab_size=512)
    cfg = replace(MOE_PRESETS["mixtral-8x7b"], base=base, expert_d_ff=704, top_k=top_k)
    batch, seq = 2, 128
    torch.manual_seed(0)
    tokens = torch.randint(0, base.vocab_size, (batch, seq))
    saved, est = [], []
    for layers in (2, 4):
        model = MoETransformer(cfg.with_layers(layers), AttentionKernel("auto"), gemm="grouped_mm").to(torch.bfloat16)
        saved.append(saved_bytes(model, lambda m=model: m(tokens)))
        est.append(moe_memory_estimate(cfg.with_layers(layers), batch, seq, "train", 2)["activations"])
    per_layer, estimated = (saved[1] - saved[0]) / 2, (est[1] - est[0]) / 2
    assert 0.97 < estimated / per_layer < 1.05, (estimated, per_layer)


def measured_cases() -> list[tuple[str, list[str], int]]:
    cases = {**memory_gpu.CASES, **memory_gpu.HELD_OUT, **memory_gpu.VALIDATE, **memory_gpu.MOE_CHECK}
    rows = []
    for f in sorted((ROOT / "benchmarks" / "results").glob("memory-h200-*.json")):
        rows += [(r["name"], cases[r["name"]], r["torch_peak"]) for r in json.loads(f.read_text())
                 if r.get("status") == "ok"]
    return rows


def test_the_measured_h200_cases_are_all_here() -> None:
    cases = measured_cases()
    assert len(cases) == 31 and {n for n, _, _ in cases} == {*memory_gpu.CASES, *memory_gpu.HELD_OUT,
                                                             *memory_gpu.VALIDATE, *memory_gpu.MOE_CHECK}


@pytest.mark.parametrize(("name", "args", "peak"), measured_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_estimate_within_ten_percent_of_the_h200_peak(name: str, args: list[str], peak: int) -> None:
    """Each case's estimate, computed by today's code from the options it ran with, against torch's peak then."""
    spec = catalog.get(args[0])
    opts = catalog.parse_args(spec, [*args[1:], "--steps", "4", "--warmup", "1", "--memory-profile", "2"])
    est = estimate_parts(spec, opts, "cuda")
    assert est is not None
    assert abs(est["total"] / peak - 1) <= 0.10, f"{name}: estimate {est['total'] / 2**30:.2f} GiB, " \
                                                 f"measured {peak / 2**30:.2f} GiB"
