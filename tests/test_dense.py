"""The dense workload's modes and knobs on CPU, through `btune run` (real subprocesses)."""

import subprocess
from pathlib import Path

import orjson
import pytest
from support import btune, record_of

from tuner.runs import load_record as record_of_file

pytestmark = pytest.mark.slow  # every test runs btune in a subprocess


def run_ok(tmp_path: Path, *args: str) -> dict:
    return record_of(btune("run", "dense", *args, "--out", str(tmp_path)))


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_inference_modes_count_their_tokens(tmp_path, mode):
    rec = run_ok(tmp_path, "--preset", "tiny-llama", "--mode", mode, "--steps", "4", "--warmup", "1",
                 "--batch-size", "2", "--seq-len", "32")
    s = rec["summary"]
    per_step = 2 * (32 if mode == "prefill" else 1)
    assert s["tokens_total"] == 5 * per_step
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    cfg = meta["plan"]["model"]
    n = meta["params"]["matmul"]
    expected = 2 * n + 4 * cfg["n_layers"] * cfg["d_model"] * 32
    assert meta["flops_per_token"] == pytest.approx(expected)
    assert "loss" not in rec["series"]["step"]["0"]


def test_knobs_are_recorded_as_they_ran(tmp_path):
    rec = run_ok(tmp_path, "--preset", "tiny-llama", "--steps", "3", "--warmup", "1", "--attention-backend", "math",
                 "--attention-window", "16", "--activation-checkpointing", "--fp8-mode", "auto")
    b = next(e for e in rec["events"] if e["type"] == "meta")["backends"]
    assert b["attention"]["requested"] == "math" and "math" in b["attention"]["reason"]
    assert b["attention"]["window"] == 16 and b["activation_checkpointing"] is True
    assert b["fp8"]["library"] == "off" and b["fp8"]["reason"].startswith("auto:")


def test_compiled_run_reports_its_first_step_apart(tmp_path):
    rec = run_ok(tmp_path, "--steps", "3", "--warmup", "1", "--compile-mode", "default")
    s = rec["summary"]
    assert s["workload"]["compile_s"] > 0
    assert s["steps"]["warmup"] == 1 and len(s["warmup_step_ms"]) == 1
    assert s["warmup_step_ms"][0] > s["step_ms"]["max"], "the compile step is excluded from steady state"


#: Dense knobs this machine (CPU only) cannot run, and the line that refuses them
#: (tests/test_refusals.py runs them in process too).
REFUSED_KNOBS = [
    (["--fp8-mode", "te"], "FP8 needs an NVIDIA GPU"),
    (["--fp8-mode", "torchao"], "FP8 needs an NVIDIA GPU"),
    (["--attention-backend", "cudnn"], "needs a CUDA GPU"),
    (["--attention-backend", "flex"], "no backward on CPU"),
    (["--attention-backend", "flash", "--attention-window", "8"], "takes no mask"),
    (["--compile-mode", "reduce-overhead"], "need a GPU"),
    (["--fp8-recipe", "rowwise"], "--fp8-recipe is only valid with --fp8-mode"),
]


@pytest.mark.parametrize(("args", "words"), REFUSED_KNOBS)
def test_knobs_this_machine_cannot_run_are_refused_before_launch(tmp_path, args, words):
    res = btune("run", "dense", *args, "--out", str(tmp_path))
    assert res.returncode == 2 and words in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """``btune sweep`` of dense (the CPU preset, tiny) over batch sizes 2,4 x modes train,prefill: the finished
    process and its output directory (four runs, also the runs the dry-run plan is checked against)."""
    out = tmp_path_factory.mktemp("sweep")
    res = btune("sweep", "dense", "--steps", "2", "--warmup", "1", "--batch-size", "2,4", "--mode", "train,prefill",
                "--out", str(out), timeout=600)
    return res, out


def test_dry_run_plan_matches_the_run(sweep):
    """The plan --dry-run prints is what the run of the same options reports (the sweep's tiny, batch 2, train)."""
    plan = orjson.loads(btune("run", "dense", "--preset", "tiny", "--batch-size", "2", "--dry-run").stdout)
    res, out = sweep
    assert res.returncode == 0, res.stderr[-2000:]
    runs = [record_of_file(p) for p in sorted(out.glob("*.json"))]
    opts = [r["config"]["options"] for r in runs]
    rec = next(r for r, o in zip(runs, opts, strict=True) if (o["batch_size"], o["mode"]) == (2, "train"))
    assert rec["config"]["options"]["preset"] == "tiny"
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    assert meta["flops_per_token"] == plan["flops_per_token"] and meta["params"] == plan["params"]


def test_sweep_runs_the_product_and_compares(sweep):
    res, tmp_path = sweep
    assert res.returncode == 0, res.stderr[-2000:]
    assert "btune sweep: 4 runs" in res.stdout and res.stdout.count("  ok: ") == 4
    head = res.stdout[res.stdout.index("\n#  "):].splitlines()[1]  # the sweep table: a row per run
    assert sorted(head.split()[1:3]) == ["batch_size", "mode"] and "step vs #1" in head  # declaration order
    assert len(list(tmp_path.glob("*.json"))) == 4
    bad = btune("sweep", "dense", "--mode", "train,bogus", "--out", str(tmp_path))
    assert bad.returncode == 2 and "'bogus' is not allowed" in bad.stderr
    assert len(list(tmp_path.glob("*.json"))) == 4, "nothing runs when one combination is invalid"
