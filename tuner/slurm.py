"""``btune slurm``: an sbatch script that runs the same ``btune run`` on every node of a Slurm allocation.

One task per node (``srun --ntasks-per-node=1``); each runs ``btune run --nnodes $SLURM_NNODES --node-rank
$SLURM_NODEID --rdzv-endpoint HEAD:PORT WORKLOAD ...``, whose torchrun starts the node's ranks and meets the
other nodes at the rendezvous on the allocation's first node. The workload's options are checked before the
script is written, as ``btune run`` checks them, against nodes of ``gpus_per_node`` GPUs. The script names
paths and options only: no environment value is written into it.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from tuner.launch import LaunchError, Nodes, build_config
from workloads.options import Machine
from workloads.specs.dense import processes

#: What an #SBATCH value may hold (no spaces, quotes or newlines: each directive is one line of the script).
_NAME = re.compile(r"[\w.+-]+")
_PARTITION = re.compile(r"[\w.+-]+(,[\w.+-]+)*")
_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|infinite|UNLIMITED", re.IGNORECASE)
_DIRECTIVE = re.compile(r"--[a-z][a-z-]*(=[^\s'\"`$\\]+)?")


def btune_command() -> list[str]:
    """How a node starts btune: the ``btune`` script beside this interpreter, else ``python -m tuner``."""
    exe = os.path.abspath(sys.executable)  # not resolved: a venv's python is a link out of the venv
    script = Path(exe).parent / "btune"
    return [str(script)] if script.is_file() else [exe, "-m", "tuner"]


def _machine(gpus_per_node: int) -> Machine:
    """One node of the allocation as the checks see it: ``gpus_per_node`` FP8-capable GPUs (Hopper)."""
    gpu = {"name": "allocated GPU", "compute_capability": "9.0", "mem_total_mb": 81920}
    return Machine(gpus=tuple(dict(gpu, index=i) for i in range(gpus_per_node)),
                   reason=None if gpus_per_node else "--gpus-per-node 0")


def check(workload: str, workload_argv: Sequence[str], nodes: int, gpus_per_node: int, port: int) -> int:
    """Refuse (LaunchError/OptionError, one line) what the script's ``btune run`` would refuse on the nodes;
    return the ranks each node starts."""
    if nodes < 1:
        raise LaunchError("--nodes must be >= 1")
    if gpus_per_node < 0:
        raise LaunchError("--gpus-per-node must be >= 0")
    if not 0 < port < 65536:
        raise LaunchError(f"--port {port}: a port is 1..65535")
    config = build_config(workload, list(workload_argv), nodes=Nodes(nodes, 0, f"head:{port}"),
                          machine=_machine(gpus_per_node))
    procs = processes(config.options)  # the product of its parallel degrees
    on_gpu = gpus_per_node > 0 and config.options.get("device") != "cpu"
    if on_gpu and procs != nodes * gpus_per_node:
        raise LaunchError(f"the run's {procs} processes (the product of its parallel degrees: --tp ...) do not fill "
                          f"--nodes {nodes} x --gpus-per-node {gpus_per_node} = {nodes * gpus_per_node} GPUs; "
                          f"give degrees whose product is {nodes * gpus_per_node} or change the allocation")
    return max(procs // nodes, 1)


def _value(flag: str, value: str, pattern: re.Pattern[str], what: str) -> str:
    if not pattern.fullmatch(value):
        raise LaunchError(f"{flag} {value!r}: expected {what}")
    return value


def sbatch_script(workload: str, workload_argv: Sequence[str], nodes: int, gpus_per_node: int,
                  partition: str | None = None, time_limit: str | None = None, account: str | None = None,
                  out_dir: str | Path = "btune_runs", job_name: str | None = None, port: int = 29500,
                  cpus_per_task: int | None = None, extra_sbatch: Sequence[str] = ()) -> str:
    """The sbatch script (text) for ``btune run WORKLOAD *workload_argv`` on ``nodes`` nodes of ``gpus_per_node``
    GPUs; the records land in ``out_dir`` (made absolute), Slurm's output in ``out_dir/slurm-JOBID.out``."""
    per_node = check(workload, workload_argv, nodes, gpus_per_node, port)
    job_name = _value("--job-name", job_name or f"btune-{workload}", _NAME, "letters, digits, . _ + -")
    out = Path(out_dir).absolute()
    if any(c.isspace() for c in str(out)) or "%" in str(out):
        raise LaunchError(f"--out {str(out)!r}: a Slurm output path without spaces or %")
    directives = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1"]
    if gpus_per_node:
        directives.append(f"--gpus-per-node={gpus_per_node}")
    if cpus_per_task:
        if cpus_per_task < 1:
            raise LaunchError("--cpus-per-task must be >= 1")
        directives.append(f"--cpus-per-task={cpus_per_task}")
    if partition:
        directives.append(f"--partition={_value('--partition', partition, _PARTITION, 'a partition name')}")
    if time_limit:
        directives.append(f"--time={_value('--time', time_limit, _TIME, 'MINUTES, HH:MM:SS or D-HH:MM:SS')}")
    if account:
        directives.append(f"--account={_value('--account', account, _NAME, 'an account name')}")
    directives.append(f"--output={out}/slurm-%j.out")
    for extra in extra_sbatch:
        directives.append(_value("--sbatch-arg", extra, _DIRECTIVE, "one sbatch option as --name=value"))
    run = shlex.join([*btune_command(), "run", "--out", str(out)])
    run += ' --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" --rdzv-endpoint "$head:' + str(port) + '"'
    run += " " + shlex.join([workload, *workload_argv])
    lines = ["#!/bin/bash", f"# btune slurm: {workload} on {nodes} node(s) x {gpus_per_node} GPU(s)",
             *(f"#SBATCH {d}" for d in directives), "",
             "set -euo pipefail", "",
             "# the rendezvous: the allocation's first node",
             'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
             "export head", "",
             f"# one btune run per node, each starting its {per_node} "
             f"rank(s) with torchrun; records in {out}",
             f"srun --ntasks-per-node=1 bash -c {shlex.quote('exec ' + run)}", ""]
    return "\n".join(lines)


def script_run_line(script: str) -> str:
    """The command each node runs (the ``bash -c`` argument of the script's srun line)."""
    line = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    words = shlex.split(line)
    return words[words.index("-c") + 1]


__all__ = ["btune_command", "check", "sbatch_script", "script_run_line"]
