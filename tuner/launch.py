"""From a workload name and its options to a run ready to start: RunConfig, the argv, the Runner.

The terminal side of a CLI run (status line, JSON lines, signals, the run loop) is tuner.console."""

from __future__ import annotations

import importlib
import ipaddress
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tuner import catalog, runs
from tuner.command import WORKLOAD as COMMAND
from tuner.command import Command, CommandError, redact_argv, torchrun_devices
from tuner.machine import probe_machine
from tuner.runner import Runner
from workloads.options import Machine, OptionError, WorkloadSpec, machine_checks
from workloads.specs.dense import processes


class LaunchError(Exception):
    """A run that cannot be launched as asked; the message is one line."""


@dataclass(frozen=True)
class RunConfig:
    """A validated request to run one workload."""

    workload: str
    options: dict[str, Any]
    argv: tuple[str, ...]
    timeout: float = 0.0
    sample_hz: float = 10.0
    defaults: dict[str, Any] = field(default_factory=dict)
    repeat: tuple[int, int] = (1, 1)  #: (this run, of how many) of ``--repeat``
    command: Command | None = None  #: a command run (``btune run -- CMD``): its cwd, environment, --parse

    def as_record(self) -> dict[str, Any]:
        argv = redact_argv(self.argv) if self.command is not None else list(self.argv)
        rec = {"workload": self.workload, "options": self.options, "argv": argv,
               "timeout_s": self.timeout or None, "sample_hz": self.sample_hz, "defaults": self.defaults}
        if self.repeat[1] > 1:
            rec["repeat"] = {"index": self.repeat[0], "of": self.repeat[1]}
        return rec

    def repeats(self, n: int) -> list[RunConfig]:
        """``n`` copies of this config, numbered (run-level statistics need repeats as separate processes)."""
        return [replace(self, repeat=(i + 1, n)) for i in range(n)]

    @property
    def command_line(self) -> str:
        """The argv as one copyable shell line (display only; it is never run through a shell)."""
        import shlex

        return shlex.join(redact_argv(self.argv) if self.command is not None else self.argv)


_HOST = re.compile(r"[\w.-]+")  # a host name or an IPv4 address (torch's rendezvous also takes these)
_PORT = re.compile(r"[0-9]{1,5}")


def valid_endpoint(endpoint: str) -> bool:
    """Whether ``endpoint`` is HOST:PORT or [IPv6]:PORT with a port in 1..65535."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        return False
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return "%" not in host  # a scope id: torch's endpoint parser refuses it
    return _HOST.fullmatch(host) is not None


@dataclass(frozen=True)
class Nodes:
    """Where the ranks run: one node (torchrun --standalone) or several meeting at a rendezvous endpoint."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""

    def check(self, tp: int) -> None:
        """Refuse (LaunchError, one line) node counts, ranks and endpoints torchrun would trip over."""
        if self.nnodes < 1:
            raise LaunchError("--nnodes must be >= 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise LaunchError(f"--node-rank {self.node_rank} must be in 0..{self.nnodes - 1}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise LaunchError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        if self.rdzv_endpoint and not valid_endpoint(self.rdzv_endpoint):
            raise LaunchError(f"--rdzv-endpoint {self.rdzv_endpoint!r}: expected HOST:PORT or [IPv6]:PORT "
                              "with a port in 1..65535")
        if tp % self.nnodes:
            raise LaunchError(f"the run's {tp} processes (the product of its parallel degrees) must be a multiple of "
                              f"--nnodes {self.nnodes}")

    def torchrun(self, python: str, tp: int) -> list[str]:
        """The launcher's argv up to the workload: one node through ``workloads.torchrun`` (torchrun with
        its rendezvous, stores and gloo/NCCL sockets on 127.0.0.1), several through torchrun itself."""
        if self.nnodes == 1:  # every listener on loopback (workloads/torchrun.py)
            return [python, "-m", "workloads.torchrun", "--standalone", "--nproc-per-node", str(tp)]
        head = [python, "-m", "torch.distributed.run"]
        return [*head, "--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", self.rdzv_endpoint, "--nproc-per-node", str(tp // self.nnodes)]


class MemoryRefusal(LaunchError):
    """A run refused before launch because its memory estimate does not fit its GPUs (``force`` launches it)."""


#: A run whose estimate per GPU is above this share of the smallest visible GPU is refused (unless forced): torch's
#: peak leaves the CUDA context and the allocator's rounding outside, as the estimate does
FIT_SHARE = 0.95
GIB = 2**30


def estimate_parts(spec: WorkloadSpec, options: Mapping[str, Any], device: str) -> dict[str, int] | None:
    """The workload's dry-run memory estimate per rank (its torch-free ``plan``), or None when it makes none."""
    plan = getattr(importlib.import_module(spec.module), "plan", None)
    if plan is None:
        return None
    try:
        est = plan(dict(options), device).get("memory_estimate_bytes")
    except (ValueError, KeyError):  # the checks refuse such a shape first; no estimate otherwise
        return None
    if not isinstance(est, dict) or not isinstance(est.get("total"), (int, float)):
        return None
    return {k: int(v) for k, v in est.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def memory_refusal(spec: WorkloadSpec, options: Mapping[str, Any], machine: Machine) -> str | None:
    """Why a GPU run is predicted not to fit (its estimate per rank over FIT_SHARE of the smallest visible GPU),
    or None; CPU runs and dry runs are never refused."""
    totals = [g["mem_total_mb"] for g in machine.gpus if isinstance(g.get("mem_total_mb"), (int, float))]
    if options.get("device") == "cpu" or options.get("dry_run") or not totals:
        return None
    est, smallest = estimate_parts(spec, options, "cuda"), min(totals)
    if est is None or est["total"] <= FIT_SHARE * smallest * 2**20:
        return None
    parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in est.items() if k != "total" and v)
    name = next((str(g.get("name")) for g in machine.gpus if g.get("mem_total_mb") == smallest), "GPU")
    return (f"predicted not to fit: the memory estimate is {est['total'] / GIB:.1f} GiB per GPU ({parts} GiB; "
            f"btune run {spec.name} --dry-run ... shows it) over {FIT_SHARE:.0%} of the {name}'s "
            f"{smallest / 1024:.1f} GiB; lower --batch-size or --seq-len, add --activation-checkpointing or "
            "--dp-shard, or pass --force to launch anyway")


def build_config(workload: str, args: list[str] | dict[str, Any], timeout: float = 0.0,
                 sample_hz: float = 10.0, python: str | None = None, nodes: Nodes | None = None,
                 machine: Machine | None = None, force: bool = False) -> RunConfig:
    """Validate options against the catalog (raises OptionError/LaunchError) and build the argv.

    ``machine`` (default: probed now) is what the checks run against; a form can pass the one it shows. A run
    predicted not to fit its GPUs is refused unless ``force``.
    """
    spec = catalog.get(workload)
    nodes = nodes or Nodes()
    options = catalog.parse_args(spec, args) if isinstance(args, list) else catalog.validate(spec, args)
    nproc = processes(options)  # the product of the degrees (serving: replicas of a tp-way model)
    nodes.check(nproc)
    if timeout < 0:
        raise LaunchError("--timeout must be >= 0")
    if not 0 < sample_hz <= 100:
        raise LaunchError(f"--sample-hz {sample_hz:g}: expected a number in (0, 100]")
    machine = machine or probe_machine()
    problems = machine_checks({**options, "nnodes": nodes.nnodes}, machine, spec)
    if problems:
        raise LaunchError(problems[0][1])
    refusal = None if force else memory_refusal(spec, options, machine)
    if refusal:
        raise MemoryRefusal(refusal)
    python = python or sys.executable
    launcher = nodes.torchrun(python, nproc) if nproc > 1 or nodes.nnodes > 1 else [python]
    argv = (*launcher, "-m", spec.module, *catalog.to_argv(spec, options))
    return RunConfig(workload, options, argv, timeout, sample_hz, spec.defaults())


def command_config(command: Command, timeout: float = 0.0, sample_hz: float = 10.0) -> RunConfig:
    """A RunConfig for any command (CommandError/LaunchError, one line, when it cannot run as given)."""
    from tuner.command import resolve

    resolve(command)
    if timeout < 0:
        raise LaunchError("--timeout must be >= 0")
    if not 0 < sample_hz <= 100:
        raise LaunchError(f"--sample-hz {sample_hz:g}: expected a number in (0, 100]")
    return RunConfig(COMMAND, command.as_options(), command.argv, timeout, sample_hz, command=command)


def make_runner(config: RunConfig, out_dir: Path, telemetry: bool = True, nvml: Any = None) -> Runner:
    """A Runner for a config, with a new run id."""
    command = config.command
    parser = None
    if command is not None and command.parse:
        from tuner.parse import LineParser

        parser = LineParser(command.parse, devices=torchrun_devices(command.argv))
    return Runner(config.argv, run_id=runs.new_run_id(config.workload), out_dir=out_dir,
                  config=config.as_record(), timeout=config.timeout, sample_hz=config.sample_hz,
                  telemetry=telemetry, nvml=nvml, env=command.environment() if command else None,
                  cwd=command.cwd if command else None, line_parser=parser)


def run_record(workload: str, args: list[str], out_dir: Path | str, telemetry: bool = True) -> dict[str, Any]:
    """Run a workload to its end and return its record (what ``btune run`` does, without a terminal); a run
    refused before launch gives ``{"status": "not launched", "error": {"message": ...}, "summary": {}}``."""
    try:
        config = build_config(workload, args)
    except (LaunchError, OptionError, CommandError) as exc:
        return {"status": "not launched", "error": {"message": str(exc)}, "summary": {}}
    out = runs.ensure_writable(Path(out_dir))
    return make_runner(config, out, telemetry).run().record
