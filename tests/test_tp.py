"""Tensor parallelism on CPU: torchrun with gloo, 2 processes; validation against TP=1 (two nodes on 127.0.0.1:
tests/test_slurm.py)."""

import functools
import time
from pathlib import Path

import psutil
import pytest
import support
from support import ONE_THREAD, live_journal, record_of, running, start_btune, wait_until
from test_loopback import ENV as LOOPBACK_ENV
from test_loopback import LOOPBACK, listeners

from tuner.runs import load_record

pytestmark = pytest.mark.slow  # every test runs btune, most of them torchrun with two ranks

btune = functools.partial(support.btune, env=ONE_THREAD)  # ranks share 2 cores: one thread each


@pytest.fixture(scope="module")
def dense_tp2(tmp_path_factory):
    """One dense --tp 2 run (4 steps) that two tests look at, its process tree sampled all along (the rendezvous
    store first, gloo later): (its record, the listening sockets seen as (role, ip, port), each rank's
    environment)."""
    out = tmp_path_factory.mktemp("tp2")
    proc = start_btune("run", "dense", "--preset", "tiny-llama", "--tp", "2", "--steps", "4", "--warmup", "1",
                       "--out", str(out), env=LOOPBACK_ENV)
    root = psutil.Process(proc.pid)
    seen: set[tuple[str, str, int]] = set()
    envs: dict[int, dict[str, str]] = {}
    deadline = time.monotonic() + 240  # a guard against a hang
    while proc.poll() is None and time.monotonic() < deadline:
        found, ranks = listeners(root)
        seen |= found
        envs.update(ranks)
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    return load_record(Path(stdout.strip().splitlines()[-1])), seen, envs


def test_dense_tp2_runs_and_counts_tokens_once(dense_tp2, tmp_path):
    rec = dense_tp2[0]
    assert rec["status"] == "ok"
    assert rec["config"]["argv"][1:6] == ["-m", "workloads.torchrun", "--standalone", "--nproc-per-node", "2"]
    steps = rec["series"]["step"]
    assert sorted(steps) == ["0", "1"], "per-rank step times are kept"
    assert steps["0"]["loss"] == pytest.approx(steps["1"]["loss"])
    s = rec["summary"]
    assert s["steps"]["steady"] == 4
    assert s["tokens_total"] == 5 * 8 * 128, "TP ranks share tokens: counted once"
    slowest = [max(a, b) for a, b in zip(steps["0"]["step_ms"][1:], steps["1"]["step_ms"][1:], strict=True)]
    assert s["step_ms"]["max"] == pytest.approx(max(slowest))
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    assert meta["n_devices"] == 2 and meta["backends"]["tp"] == 2
    # the same seed at TP=1 gives the same losses (fp32 on CPU)
    one = record_of(btune("run", "dense", "--preset", "tiny-llama", "--steps", "4", "--warmup", "1",
                          "--out", str(tmp_path)))
    assert one["series"]["step"]["0"]["loss"] == pytest.approx(steps["0"]["loss"], rel=1e-4)


def test_tp_validate_passes_and_catches_a_wrong_shard(tmp_path):
    ok = btune("run", "tp-validate", "--preset", "tiny-llama", "--tp", "2", "--out", str(tmp_path))
    assert ok.returncode == 0, ok.stdout[-3000:]
    rec = record_of(ok)
    w = rec["summary"]["workload"]
    assert w["passed"] is True and w["tp"] == 2 and not w["mismatches"]
    assert any(t["tensor"] == "grad layers.0.attn.wo.weight" for t in w["tensors"])
    # a planted fault failing the check: tests/test_tp_validate_tolerance.py (GPT arch)


def test_tp2_run_listens_on_loopback_only(dense_tp2):
    """A single-node multi-process run listens on 127.0.0.1 only (workloads.torchrun): the rendezvous store and
    every rank's sockets; the ranks get MASTER_ADDR 127.0.0.1 and an interface for gloo and NCCL."""
    _, seen, envs = dense_tp2
    assert {ip for _, ip, _ in seen} <= LOOPBACK, f"listeners off loopback: {sorted(seen)}"
    assert any(role == "launcher" for role, _, _ in seen), f"the rendezvous store was never seen: {sorted(seen)}"
    assert len(envs) == 2, "both ranks were seen"
    for env in envs.values():
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert env["GLOO_SOCKET_IFNAME"] and env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"]


#: Tensor-parallel options refused before launch, and the line that says why
#: (tests/test_refusals.py runs them in process too).
REFUSED_TP = [
    (["dense", "--preset", "tiny", "--tp", "3"], "--tp 3 must divide the attention heads (4)"),
    (["dense", "--preset", "tiny-llama", "--tp", "4"], "KV heads (2)"),
    (["dense", "--tp", "2", "--nnodes", "2"], "needs --rdzv-endpoint"),
    (["dense", "--tp", "3", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:1"], "multiple of --nnodes 2"),
    (["tp-validate", "--tp", "1"], "nothing to validate: give --tp, --dp-shard, --dp-replicate or --cp > 1"),
]


@pytest.mark.parametrize(("args", "words"), REFUSED_TP)
def test_bad_tp_is_refused_before_launch(tmp_path, args, words):
    res = btune("run", *args, "--out", str(tmp_path))
    assert res.returncode == 2 and words in res.stderr, res.stderr
    assert not list(tmp_path.iterdir())


# Two nodes meeting on 127.0.0.1 (--nnodes 2, a rank each, the same losses): tests/test_slurm.py runs btune slurm's
# run line that way, the same btune run --nnodes 2 --node-rank R --rdzv-endpoint 127.0.0.1:PORT on each "node".


def test_a_rank_that_dies_fails_the_run_without_a_hang(tmp_path):
    proc = start_btune("run", "dense", "--preset", "tiny-llama", "--dp-shard", "2", "--tp", "1", "--steps", "100000",
                       "--out", str(tmp_path), env=ONE_THREAD)  # any mesh: the launcher's rule, here FSDP's
    live_journal(tmp_path, 4)

    def rank_1() -> psutil.Process | None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == "1" and "workloads.dense" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        return None

    victim = wait_until(rank_1, 60, "rank 1's process")
    run = psutil.Process(proc.pid).children(recursive=True)  # the launcher and both ranks
    victim.kill()
    out, _ = proc.communicate(timeout=120)  # a guard against the hang this test is about
    assert proc.returncode == 1
    wait_until(lambda: not running(run), 30, "every process of the run to end with it")
    rec = load_record(Path(out.strip().splitlines()[-1]))
    assert rec["status"] in ("failed", "killed")
    assert "rank" in rec["error"]["stderr_tail"].lower() or "signal" in rec["error"]["stderr_tail"].lower()


def test_moe_tp2_runs_with_tp_inside_the_experts(tmp_path):
    res = btune("run", "moe", "--preset", "tiny", "--tp", "2", "--steps", "3", "--warmup", "1", "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = record_of(res)
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    assert meta["backends"]["tp"] == 2 and "inside the routed experts" in meta["backends"]["parallel"]
    one = record_of(btune("run", "moe", "--preset", "tiny", "--steps", "3", "--warmup", "1", "--out", str(tmp_path)))
    assert one["series"]["step"]["0"]["loss"] == pytest.approx(rec["series"]["step"]["0"]["loss"], rel=1e-4)
    # its validation against one process, on a larger mesh (TP x FSDP): tests/test_dp.py
