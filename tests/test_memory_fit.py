"""A run predicted not to fit its GPUs is refused before launch with the estimate, unless forced (issue 23).

The machine is described, not probed (this one has no GPU): a GPU's name and memory are what NVML would report.
"""

from __future__ import annotations

import pytest
from support import btune

from tuner import catalog
from tuner.launch import FIT_SHARE, LaunchError, build_config
from tuner.tune.prune import check
from workloads import dense, moe
from workloads.options import Machine

H100 = Machine(({"name": "NVIDIA H100 80GB HBM3", "mem_total_mb": 81559.0, "compute_capability": "9.0"},),
               frozenset({"torchao"}))
BIG = {"preset": "llama-3.1-8b", "device": "cuda", "batch_size": 4, "seq_len": 8192}


def estimate(module, **opts) -> int:
    spec = catalog.get(module.__name__.rsplit(".", 1)[-1])
    return module.plan(catalog.validate(spec, opts), "cuda")["memory_estimate_bytes"]["total"]


def test_a_run_over_the_gpu_is_refused_with_its_estimate_and_forced_runs():
    total = estimate(dense, **BIG)
    limit = FIT_SHARE * 81559 * 2**20
    assert total > limit
    with pytest.raises(LaunchError) as exc:
        build_config("dense", dict(BIG), machine=H100)
    msg = str(exc.value)
    assert msg.startswith("predicted not to fit: the memory estimate is ") and "\n" not in msg
    assert f"{total / 2**30:.1f} GiB per GPU" in msg and "NVIDIA H100 80GB HBM3" in msg and "--force" in msg
    assert build_config("dense", dict(BIG), machine=H100, force=True).options["batch_size"] == 4


@pytest.mark.parametrize("opts", [
    {**BIG, "layers": 4, "batch_size": 1},  # fits
    {**BIG, "dry_run": True},  # a dry run prints the estimate instead
    {**BIG, "compile_mode": "default", "activation_checkpointing": True, "layers": 16},
])
def test_what_fits_or_only_plans_is_not_refused(opts):
    fits = opts.get("dry_run") or estimate(dense, **opts) <= FIT_SHARE * 81559 * 2**20
    assert fits
    build_config("dense", dict(opts), machine=H100)


def test_the_moe_estimate_refuses_too_and_a_cpu_run_never_is():
    opts = {"preset": "mixtral-8x7b", "device": "cuda", "batch_size": 1, "seq_len": 4096}
    assert estimate(moe, **opts) > FIT_SHARE * 81559 * 2**20
    with pytest.raises(LaunchError, match="predicted not to fit"):
        build_config("moe", dict(opts), machine=H100)
    build_config("dense", {"preset": "tiny", "device": "cpu"}, machine=H100)


def test_the_tuner_records_a_setting_over_the_gpu_as_refused():
    cand = check(catalog.get("dense"), {"preset": "llama-3.1-8b", "device": "cuda", "seq_len": 8192},
                 {"batch_size": 4}, H100, "cuda")
    assert cand.refused is not None and cand.refused.startswith("predicted not to fit")


@pytest.mark.slow
def test_force_is_a_run_flag(tmp_path):
    """--force goes to the console, not the workload: a CPU run with it runs (nothing to refuse there)."""
    res = btune("run", "dense", "--preset", "tiny", "--device", "cpu", "--steps", "1", "--force",
                "--out", str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr
