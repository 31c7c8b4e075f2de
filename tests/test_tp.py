"""Tensor parallelism on CPU: torchrun with gloo, 2 processes; validation against TP=1; two nodes on 127.0.0.1."""

import functools
from pathlib import Path

import psutil
import pytest
import support
from support import ONE_THREAD, free_port, live_journal, record_of, running, start_btune, wait_until

from tuner.runs import load_record

pytestmark = pytest.mark.slow  # every test runs btune, most of them torchrun with two ranks

btune = functools.partial(support.btune, env=ONE_THREAD)  # ranks share 2 cores: one thread each


def test_dense_tp2_runs_and_counts_tokens_once(tmp_path):
    res = btune("run", "dense", "--preset", "tiny-llama", "--tp", "2", "--steps", "4", "--warmup", "1",
                "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = record_of(res)
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


#: Tensor-parallel options refused before launch, and the line that says why
#: (tests/test_refusals.py runs them in process too).
REFUSED_TP = [
    (["dense", "--preset", "tiny", "--tp", "3"], "--tp 3 must divide the attention heads (4)"),
    (["dense", "--preset", "tiny-llama", "--tp", "4"], "KV heads (2)"),
    (["dense", "--tp", "2", "--nnodes", "2"], "needs --rdzv-endpoint"),
    (["dense", "--tp", "3", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:1"], "multiple of --nnodes 2"),
    (["tp-validate", "--tp", "1"], "nothing to validate: give --tp, --dp-shard or --dp-replicate > 1"),
]


@pytest.mark.parametrize(("args", "words"), REFUSED_TP)
def test_bad_tp_is_refused_before_launch(tmp_path, args, words):
    res = btune("run", *args, "--out", str(tmp_path))
    assert res.returncode == 2 and words in res.stderr, res.stderr
    assert not list(tmp_path.iterdir())


def test_two_nodes_meet_on_localhost(tmp_path):
    port = free_port()
    procs = [start_btune("run", "dense", "--preset", "tiny-llama", "--tp", "2", "--steps", "3", "--warmup", "1",
                         "--nnodes", "2", "--node-rank", str(r), "--rdzv-endpoint", f"127.0.0.1:{port}",
                         "--out", str(tmp_path / f"node{r}"), env=ONE_THREAD)
             for r in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-2000:] + err[-2000:]
    recs = [load_record(Path(out.strip().splitlines()[-1])) for out, _ in outs]
    assert "--rdzv-endpoint" in recs[0]["config"]["argv"]
    # each node's console sees its own rank; the c10d rendezvous may hand out ranks in arrival order
    ranks = [set(r["series"]["step"]) for r in recs]
    assert all(len(r) == 1 for r in ranks) and ranks[0] | ranks[1] == {"0", "1"}
    losses = [r["series"]["step"][next(iter(k))]["loss"] for r, k in zip(recs, ranks, strict=True)]
    assert losses[0] == pytest.approx(losses[1])


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
