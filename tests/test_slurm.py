"""``btune slurm``: the sbatch script (directives, the head node, each node's btune run), refusals before anything
is written, the script's run line as two local "nodes" on loopback, and a real Slurm (slurmctld, two slurmd and
munged on 127.0.0.1, started here when the binaries are installed and this is root) running the submitted script."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import support
from support import ONE_THREAD, environ, free_port, refused

from tuner import cli
from tuner.launch import LaunchError
from tuner.runs import load_record
from tuner.slurm import btune_command, sbatch_script, script_run_line

#: Two "nodes" of one CPU rank each: the tiny preset has 4 heads, so --tp 2 fits a world of 2.
CPU_RUN = ["--preset", "tiny", "--device", "cpu", "--tp", "2", "--steps", "3", "--warmup", "1"]


def test_the_script_has_the_directives_the_head_node_and_each_nodes_btune_run(tmp_path):
    script = sbatch_script("dense", ["--preset", "tiny", "--tp", "2"], nodes=2, gpus_per_node=1, partition="gpu",
                           time_limit="1:30:00", account="proj-1", out_dir=tmp_path, job_name="tiny2", port=29600,
                           cpus_per_task=8, extra_sbatch=["--qos=high"])
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [ln.removeprefix("#SBATCH ") for ln in lines if ln.startswith("#SBATCH ")]
    assert directives == ["--job-name=tiny2", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1",
                          "--cpus-per-task=8", "--partition=gpu", "--time=1:30:00", "--account=proj-1",
                          f"--output={tmp_path}/slurm-%j.out", "--qos=high"]
    assert "set -euo pipefail" in lines
    assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in lines
    srun = next(ln for ln in lines if ln.startswith("srun "))
    assert srun.startswith("srun --ntasks-per-node=1 bash -c '")
    words = shlex.split(script_run_line(script))
    assert words[0] == "exec" and words[1:1 + len(btune_command())] == btune_command()
    assert words[1 + len(btune_command()):] == [
        "run", "--out", str(tmp_path), "--nnodes", "$SLURM_NNODES", "--node-rank", "$SLURM_NODEID",
        "--rdzv-endpoint", "$head:29600", "dense", "--preset", "tiny", "--tp", "2"]
    assert os.environ.get("HOME", "/nonexistent-home") not in script.replace(str(tmp_path), "")


def test_optional_directives_are_left_out_and_the_out_dir_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = sbatch_script("dense", ["--preset", "tiny", "--device", "cpu"], nodes=1, gpus_per_node=0,
                           out_dir="runs")
    directives = [ln for ln in script.splitlines() if ln.startswith("#SBATCH ")]
    assert directives == ["#SBATCH --job-name=btune-dense", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                          f"#SBATCH --output={tmp_path}/runs/slurm-%j.out"]
    assert f"--out {tmp_path}/runs " in script_run_line(script)


def test_option_values_are_quoted_for_the_node_and_an_out_dir_slurm_cannot_take_is_refused(tmp_path):
    save = tmp_path / "my model"
    script = sbatch_script("dense", ["--preset", "tiny", "--device", "cpu", "--save-checkpoint", str(save)],
                           nodes=1, gpus_per_node=0, out_dir=tmp_path)
    assert shlex.split(script_run_line(script))[-2:] == ["--save-checkpoint", str(save)]
    with pytest.raises(LaunchError, match="without spaces"):
        sbatch_script("dense", ["--preset", "tiny"], nodes=1, gpus_per_node=1, out_dir=tmp_path / "a b")


REFUSED = [
    (["--nodes", "2", "--gpus-per-node", "1", "dense", "--preset", "tiny", "--tp", "4"], "needs 2 GPUs on this node"),
    (["--nodes", "2", "--gpus-per-node", "2", "dense", "--preset", "tiny", "--tp", "2"],
     "do not fill --nodes 2 x --gpus-per-node 2 = 4 GPUs"),
    (["--nodes", "2", "--gpus-per-node", "1", "dense", "--preset", "tiny", "--tp", "3"], "multiple of --nnodes 2"),
    (["--nodes", "4", "--gpus-per-node", "1", "dense", "--preset", "tiny", "--tp", "4", "--dtype", "fp33"],
     "--dtype"),
    (["--nodes", "1", "dense", "--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--nodes", "0", "dense"], "--nodes: '0' must be >= 1"),
    (["--gpus-per-node", "-1", "dense"], "--gpus-per-node must be >= 0"),
    (["--nodes", "1", "--port", "70000", "dense"], "--port 70000"),
    (["--time", "1 hour", "dense"], "--time '1 hour'"),
    (["--partition", "gpu\n#SBATCH --x", "dense"], "--partition"),
    (["--sbatch-arg", "--comment=$(id)", "dense"], "--sbatch-arg"),
    (["nosuch"], "unknown workload 'nosuch'"),
]


@pytest.mark.parametrize(("argv", "words"), REFUSED)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, words):
    line = refused(capsys, ["slurm", "--out", str(tmp_path / "runs"), "-o", str(tmp_path / "job.sbatch"), *argv])
    assert words in line
    assert not list(tmp_path.iterdir())


def test_btune_slurm_writes_the_script_and_prints_its_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BTUNE_RUNS_DIR", str(tmp_path / "runs"))
    assert cli.main(["slurm", "--nodes", "2", "--gpus-per-node", "1", "--partition", "gpu", "dense",
                     "--preset", "tiny", "--tp", "2"]) == 0
    path = tmp_path / "runs" / "slurm-btune-dense.sbatch"
    assert capsys.readouterr().out.strip() == str(path)
    script = path.read_text()
    assert "#SBATCH --partition=gpu" in script and f"--out {tmp_path / 'runs'} " in script


def test_submit_without_sbatch_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    line = refused(capsys, ["slurm", "--out", str(tmp_path / "runs"), "--submit", "dense", "--preset", "tiny"])
    assert line == "error: sbatch not found: is this a Slurm login node? (without --submit the script is only written)"
    assert not (tmp_path / "runs").exists()


def _records(out: Path) -> list[dict]:
    return [load_record(p) for p in sorted(out.glob("*.json"))]


@pytest.mark.slow
def test_the_scripts_run_line_runs_two_nodes_on_loopback(tmp_path):
    """The script's run line on two local "nodes" (btune run --nnodes 2 --node-rank R --rdzv-endpoint
    127.0.0.1:PORT): they meet, each console records its own rank, and both ranks see the same losses."""
    out, port = tmp_path / "runs", free_port()
    script = sbatch_script("dense", CPU_RUN, nodes=2, gpus_per_node=0, out_dir=out, port=port)
    line = script_run_line(script)
    procs = [subprocess.Popen(["bash", "-c", line], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=environ({**ONE_THREAD, "SLURM_NNODES": "2", "SLURM_NODEID": str(r),
                                           "head": "127.0.0.1"}))
             for r in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (o, e) in zip(procs, outs, strict=True):
        assert p.returncode == 0, o[-2000:] + e[-2000:]
    recs = _records(out)
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs)
    assert all(f"127.0.0.1:{port}" in r["config"]["argv"] for r in recs)
    # each node's console sees its own rank; the c10d rendezvous may hand out ranks in arrival order
    ranks = [set(r["series"]["step"]) for r in recs]
    assert all(len(r) == 1 for r in ranks) and ranks[0] | ranks[1] == {"0", "1"}
    losses = [r["series"]["step"][next(iter(k))]["loss"] for r, k in zip(recs, ranks, strict=True)]
    assert losses[0] == pytest.approx(losses[1]), "the two nodes' TP ranks trained one model"


# -- a real Slurm on 127.0.0.1 ------------------------------------------------------------------------------
SLURM_BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol", "srun")


def _why_no_slurm() -> str | None:
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None
               and not Path("/usr/sbin", b).is_file()]
    if missing:
        return f"no {', '.join(missing)} (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd runs jobs as their user: it needs root"
    return None


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


SLURM_CONF = """ClusterName=btunetest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
AuthInfo=socket={d}/munge/sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
NodeName={host} NodeHostname={host} NodeAddr=127.0.0.1 Port={node_ports[0]} CPUs=2 State=UNKNOWN
NodeName={host}-2 NodeHostname={host} NodeAddr=127.0.0.1 Port={node_ports[1]} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={host},{host}-2 Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture
def slurm(tmp_path_factory):
    """A two-node Slurm on 127.0.0.1 (nodes HOSTNAME and HOSTNAME-2, one slurmd each, munge with its own key and
    socket): the environment to submit with. Everything started here is stopped at the end."""
    why = _why_no_slurm()
    if why:
        pytest.skip(f"no real Slurm here: {why}")
    d, host = tmp_path_factory.mktemp("slurm"), socket.gethostname()
    nodes = (host, f"{host}-2")  # the first (the head) by this host's name, which the rendezvous resolves
    for sub in ("munge", "state", "log", *(f"spool/{n}" for n in nodes)):
        (d / sub).mkdir(parents=True)
    (d / "munge").chmod(0o700)
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = d / "slurm.conf"
    conf.write_text(SLURM_CONF.format(d=d, host=host, ctld_port=free_port(),
                                        node_ports=(free_port(), free_port())))
    env = environ({"SLURM_CONF": str(conf)})

    def start(*argv: str) -> None:
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, f"{' '.join(argv)}: {res.stderr.strip()}"

    try:
        start(_sbin("munged"), "-f", f"--key-file={key}", f"--socket={d}/munge/sock", f"--pid-file={d}/munge/pid",
              f"--log-file={d}/munge/log", f"--seed-file={d}/munge/seed")
        start(_sbin("slurmctld"), "-c", "-f", str(conf))
        for node in nodes:
            start(_sbin("slurmd"), "-f", str(conf), "-N", node)
        def idle() -> bool:
            states = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, text=True, capture_output=True)
            return states.stdout.split() == ["idle", "idle"]

        support.wait_until(idle, 60, "both slurmd registered and idle", every=0.5)
        yield env, d
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=30)
        for pidfile in ("slurmctld.pid", *(f"slurmd-{n}.pid" for n in nodes), "munge/pid"):
            try:
                pid = int((d / pidfile).read_text())
                os.kill(pid, 15)
            except (OSError, ValueError):
                pass


@pytest.mark.slow
def test_a_real_slurm_runs_the_submitted_script_on_two_nodes(slurm, tmp_path):
    env, d = slurm
    out = tmp_path / "runs"
    res = subprocess.run([*support.BTUNE, "slurm", "--nodes", "2", "--gpus-per-node", "0", "--partition", "debug",
                          "--time", "10", "--port", str(free_port()), "--out", str(out), "--submit", "dense",
                          *CPU_RUN], env={**env, **ONE_THREAD}, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    path, submitted = res.stdout.strip().splitlines()
    assert Path(path).is_file() and submitted.startswith("Submitted batch job ")
    job = submitted.split()[-1]
    deadline = time.monotonic() + 300

    def state() -> str:
        show = subprocess.run(["scontrol", "show", "job", job, "-o"], env=env, capture_output=True, text=True)
        return next((w.split("=", 1)[1] for w in show.stdout.split() if w.startswith("JobState=")), "GONE")

    while state() in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") and time.monotonic() < deadline:
        time.sleep(1)
    log = out / f"slurm-{job}.out"
    text = log.read_text() if log.is_file() else "(no slurm output)"
    assert state() == "COMPLETED", text[-3000:] + (d / "log" / "slurmctld.log").read_text()[-2000:]
    recs = _records(out)
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs), text[-3000:]
    assert sorted(r["config"]["argv"][r["config"]["argv"].index("--node-rank") + 1] for r in recs) == ["0", "1"]
