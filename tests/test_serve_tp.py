"""Tensor-parallel serving replicas: a 2-way replica's tokens equal full recompute on the whole model (gloo on
CPU; NCCL with CUDA graphs where two GPUs are visible), and `btune run serve --tp 2 --replicas 2` runs four
ranks as two replicas, counting each request once."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from support import ONE_THREAD, PROGRAMS, environ, free_port

from tuner.launch import build_config, make_runner


def run_program(device: str, *configs: str) -> dict[str, list[dict]]:
    """tests/programs/tp_serve_tokens.py under torchrun (2 ranks) for each PRESET,BACKEND,COMPILE_MODE in turn:
    the lines both ranks printed, by configuration."""
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(PROGRAMS / "tp_serve_tokens.py"), device, *configs], capture_output=True, text=True,
                         env=environ(ONE_THREAD), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return {c: [x for x in lines if x["config"] == c] for c in configs}


#: A 2-way replica on CPU, eager and compiled, both in one torchrun (one start-up of the two ranks).
CPU_CONFIGS = ("tiny-llama,auto,none", "tiny,math,default")


@pytest.fixture(scope="module")
def cpu_replicas() -> dict[str, list[dict]]:
    return run_program("cpu", *CPU_CONFIGS)


def check(lines: list[dict]) -> dict:
    leader = next(x for x in lines if "requests" in x)
    follower = next(x for x in lines if "follower_steps" in x)
    assert leader["requests"] == leader["finished"] == 9
    assert leader["mismatched"] == [], "requests whose tokens differ from full recompute"
    assert follower["follower_steps"] == leader["steps"], "the follower ran every step the leader ran"
    for x in lines:
        assert x["logits_max_diff"] < 1e-4, "sharded logits equal the whole model's"
    return leader


@pytest.mark.slow
@pytest.mark.parametrize("config", CPU_CONFIGS)
def test_tp2_replica_tokens_equal_full_recompute(cpu_replicas, config):
    """PRESET,BACKEND,COMPILE_MODE: every request's tokens equal full recompute on the whole model."""
    check(cpu_replicas[config])


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tp2_replica_with_cuda_graphs_equals_full_recompute():
    leader = check(run_program("cuda", "tiny-llama,auto,reduce-overhead")["tiny-llama,auto,reduce-overhead"])
    assert leader["graphs"] == leader["buckets"], "every decode bucket ran as a captured CUDA graph"


@pytest.mark.slow
def test_two_tp2_replicas_count_each_request_once(tmp_path):
    args = ["--preset", "tiny-llama", "--warmup", "1", "--max-batch", "4", "--prompt-len", "uniform:2,24",
            "--output-len", "uniform:1,12", "--num-requests", "9", "--replicas", "2", "--tp", "2",
            "--device", "cpu"]
    config = build_config("serve", args)
    assert list(config.argv[1:6]) == ["-m", "workloads.torchrun", "--standalone", "--nproc-per-node", "4"]
    rec = make_runner(config, tmp_path, telemetry=False).run().record
    assert rec["status"] == "ok", rec.get("error")
    reqs = [e for e in rec["events"] if e["type"] == "request"]
    assert sorted(r["rid"] for r in reqs) == list(range(9))
    assert {r["rank"] for r in reqs} == {0, 2}, "each replica's leader (ranks 0 and 2) reports its requests"
    assert all(r["replica"] == r["rank"] // 2 for r in reqs)
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    assert meta["n_devices"] == 4 and meta["replicas"] == 2 and meta["tp"] == 2 and meta["backends"]["tp"] == 2
    s = rec["summary"]["workload"]
    assert s["replicas"] == 2 and s["tp"] == 2 and rec["summary"]["serving"]["requests"]["finished"] == 9
    assert rec["summary"]["serving"]["output_tokens"] == sum(r["output_len"] for r in reqs)


@pytest.mark.slow
def test_a_stuck_teardown_ends_the_process_with_its_exit_code():
    """NCCL teardown can hang after CUDA graph capture (pytorch#115388): shutdown ends the process once it has
    been stuck for its limit, with the run's exit code. Only the hang is faked, as this machine has no NCCL."""
    code = (
        "import os, time, torch.distributed as dist\n"
        "from workloads import parallel\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=os.environ['PORT'], RANK='0', WORLD_SIZE='1')\n"
        "parallel.init('cpu')\n"
        "dist.destroy_process_group = lambda *a, **k: time.sleep(600)\n"
        "parallel.shutdown(exit_code=7, stuck_s=1.0)\n"
        "print('not reached')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=environ({**ONE_THREAD, "PORT": str(free_port())}), timeout=120)
    assert res.returncode == 7, res.stdout + res.stderr
    assert "teardown stuck for 1 s" in res.stderr and "not reached" not in res.stdout


@pytest.mark.slow
def test_stopping_a_tp2_replica_ends_cleanly_with_its_requests_and_summary(tmp_path, monkeypatch):
    """Stop (SIGINT to every rank, as the console's stop does): the leader ends the load and releases its
    follower, and the record keeps the requests served so far and the summary, unfinished ones counted. The
    first signal is enough: the console never escalates to SIGTERM (its grace is long here, so a slow machine
    cannot make it; only ranks that ignore the stop would be escalated to)."""
    args = ["--preset", "tiny-llama", "--warmup", "1", "--max-batch", "4", "--prompt-len", "uniform:2,24",
            "--output-len", "uniform:1,12", "--request-rate", "50", "--duration", "120", "--tp", "2",
            "--device", "cpu"]
    runner = make_runner(build_config("serve", args), tmp_path, telemetry=False)
    runner.grace = 120.0
    sent: list[int] = []  # the signals the console sends the run's process group
    killpg = os.killpg

    def recorded_killpg(pgid: int, sig: int) -> None:
        if runner.proc is not None and pgid == runner.proc.pid:
            sent.append(sig)
        killpg(pgid, sig)

    monkeypatch.setattr(os, "killpg", recorded_killpg)
    finished = threading.Event()
    seen: list[int] = []

    def on_event(e: dict) -> None:
        if e.get("type") == "request":
            seen.append(e["rid"])
            if len(seen) >= 5:
                finished.set()

    runner.subscribe(on_event)
    runner.start()
    assert finished.wait(120), "requests were served"
    runner.cancel()
    rec = runner.wait().record
    assert sent[:1] == [signal.SIGINT] and signal.SIGTERM not in sent, f"both ranks ended on SIGINT: sent {sent}"
    assert rec["status"] == "cancelled", rec.get("error")
    s = rec["summary"]["workload"]
    assert s["interrupted"] is True and s["tp"] == 2
    n = rec["summary"]["serving"]["requests"]
    assert n["finished"] >= 5 and n["finished"] + n["unfinished"] == n["total"]


def test_replicas_times_tp_are_checked_against_the_gpus_before_launch():
    """One check serves dense's --tp and serve's --replicas x --tp (a two-GPU machine as the console sees it)."""
    from workloads.options import Machine
    from workloads.specs.serve import serve_checks

    two = Machine(tuple({"index": i, "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"} for i in (0, 1)))
    base = {"preset": "llama-3.1-8b", "device": "auto", "prompt_len": "fixed:8", "output_len": "fixed:8"}
    assert serve_checks({**base, "tp": 2, "replicas": 1}, two) == []
    assert ("replicas", "--replicas 2 x --tp 2 needs 4 GPUs on this node; 2 visible") in \
        serve_checks({**base, "tp": 2, "replicas": 2}, two)
    assert ("replicas", "--replicas 3 x --tp 1 needs 3 GPUs on this node; 2 visible") in \
        serve_checks({**base, "tp": 1, "replicas": 3}, two)
    assert ("tp", "--tp 4 needs 4 GPUs on this node; 2 visible") in serve_checks({**base, "tp": 4}, two)
