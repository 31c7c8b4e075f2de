"""From a workload name and its options to a finished run: RunConfig, the argv, and the CLI's run loop."""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tuner import catalog, runs
from tuner.report import fmt
from tuner.runner import Runner, RunResult
from workloads.options import Machine, machine_checks


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

    def as_record(self) -> dict[str, Any]:
        return {"workload": self.workload, "options": self.options, "argv": list(self.argv),
                "timeout_s": self.timeout or None, "sample_hz": self.sample_hz, "defaults": self.defaults}

    @property
    def command_line(self) -> str:
        """The argv as one copyable shell line (display only; it is never run through a shell)."""
        import shlex

        return shlex.join(self.argv)


OPTIONAL_MODULES = ("transformer_engine", "torchao")


def probe_machine() -> Machine:
    """The GPUs NVML can see (none where NVML cannot run) and the optional libraries installed."""
    import importlib.util

    from tuner.telemetry import NvmlSampler

    inventory = NvmlSampler(lambda _e: None).inventory()
    gpus = inventory.get("devices", [])
    reason = None if gpus else (inventory.get("reason") or "NVML found no GPUs")
    cuda_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cuda_visible is not None and cuda_visible.strip() in ("", "-1"):
        gpus, reason = [], f"CUDA_VISIBLE_DEVICES={cuda_visible!r} hides every GPU"
    modules = frozenset(m for m in OPTIONAL_MODULES if importlib.util.find_spec(m) is not None)
    return Machine(tuple(gpus), modules, reason)


@dataclass(frozen=True)
class Nodes:
    """Where the ranks run: one node (torchrun --standalone) or several meeting at a rendezvous endpoint."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""

    def check(self, tp: int) -> None:
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise LaunchError(f"--node-rank {self.node_rank} must be in 0..{self.nnodes - 1}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise LaunchError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        if tp % self.nnodes:
            raise LaunchError(f"--tp {tp} must be a multiple of --nnodes {self.nnodes}")

    def torchrun(self, python: str, tp: int) -> list[str]:
        """torchrun's own arguments (run as ``python -m torch.distributed.run``)."""
        head = [python, "-m", "torch.distributed.run"]
        if self.nnodes == 1:
            return [*head, "--standalone", "--nproc-per-node", str(tp)]
        return [*head, "--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", self.rdzv_endpoint, "--nproc-per-node", str(tp // self.nnodes)]


def build_config(workload: str, args: list[str] | dict[str, Any], timeout: float = 0.0,
                 sample_hz: float = 10.0, python: str | None = None, nodes: Nodes | None = None,
                 machine: Machine | None = None) -> RunConfig:
    """Validate options against the catalog (raises OptionError/LaunchError) and build the argv.

    ``machine`` (default: probed now) is what the checks run against; a form can pass the one it shows.
    """
    spec = catalog.get(workload)
    nodes = nodes or Nodes()
    options = catalog.parse_args(spec, args) if isinstance(args, list) else catalog.validate(spec, args)
    tp = int(options.get("tp") or 1)
    nproc = tp * int(options.get("replicas") or 1)  # serving: replicas of a tp-way model
    nodes.check(nproc)
    if timeout < 0:
        raise LaunchError("--timeout must be >= 0")
    if not 0 < sample_hz <= 100:
        raise LaunchError(f"--sample-hz {sample_hz:g}: expected a number in (0, 100]")
    machine = machine or probe_machine()
    problems = machine_checks({**options, "nnodes": nodes.nnodes}, machine, spec)
    if problems:
        raise LaunchError(problems[0][1])
    python = python or sys.executable
    launcher = nodes.torchrun(python, nproc) if nproc > 1 or nodes.nnodes > 1 else [python]
    argv = (*launcher, "-m", spec.module, *catalog.to_argv(spec, options))
    return RunConfig(workload, options, argv, timeout, sample_hz, spec.defaults())


def make_runner(config: RunConfig, out_dir: Path, telemetry: bool = True, nvml: Any = None) -> Runner:
    """A Runner for a config, with a new run id."""
    return Runner(config.argv, run_id=runs.new_run_id(config.workload), out_dir=out_dir,
                  config=config.as_record(), timeout=config.timeout, sample_hz=config.sample_hz,
                  telemetry=telemetry, nvml=nvml)


class ConsoleStatus:
    """Shows a live run on a terminal: one rewritten status line on a TTY, plain lines otherwise."""

    def __init__(self, out: TextIO, tty: bool, json_lines: bool = False) -> None:
        self.out, self.tty, self.json_lines = out, tty, json_lines
        self.step: dict[str, Any] | None = None
        self.gpus: dict[int, dict[str, Any]] = {}
        self._last_plain = 0.0
        self._lock = threading.Lock()
        self.t0 = time.time()

    def __call__(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if self.json_lines:
            import orjson

            with self._lock:
                self.out.write(orjson.dumps(ev, default=str).decode() + "\n")
            return
        if kind == "step":
            self.step = ev
            if not self.tty and time.time() - self._last_plain >= 1.0:
                self._last_plain = time.time()
                self._write(self.line())
        elif kind == "gpu":
            self.gpus[ev.get("gpu", 0)] = ev
        elif kind in ("error", "telemetry_note"):
            self._write(f"{'error' if kind == 'error' else 'note'}: {ev.get('message')}")

    def line(self) -> str:
        elapsed = time.time() - self.t0
        parts = [f"{elapsed:6.1f}s"]
        s = self.step
        if s:
            ms = s.get("step_ms") or 0
            tok_s = s["tokens"] / (ms / 1000) if ms and s.get("tokens") else None
            parts.append(f"step {s.get('step')}{' (warm-up)' if s.get('warmup') else ''}")
            parts.append(f"{fmt(ms)} ms")
            parts.append(f"{fmt(tok_s)} tok/s")
            if "loss" in s:
                parts.append(f"loss {fmt(s['loss'])}")
        else:
            parts.append("starting")
        for idx in sorted(self.gpus)[:8]:
            g = self.gpus[idx]
            parts.append(f"gpu{idx} {fmt(g.get('power_w'))}W {fmt((g.get('mem_used_mb') or 0) / 1024)}G")
        return "  ".join(parts)

    def _write(self, text: str) -> None:
        with self._lock:
            if self.tty:
                self.out.write("\r\x1b[K" + text + "\n")
            else:
                self.out.write(text + "\n")
            self.out.flush()

    def tick(self) -> None:
        if self.tty and not self.json_lines:
            with self._lock:
                self.out.write("\r\x1b[K" + self.line()[:200])
                self.out.flush()

    def done(self) -> None:
        if self.tty and not self.json_lines:
            self.out.write("\r\x1b[K")
            self.out.flush()


def execute(config: RunConfig, out_dir: Path, json_lines: bool = False, telemetry: bool = True,
            out: TextIO | None = None) -> int:
    """Run to the end with a console status; Ctrl+C cancels the run (its record is still written)."""
    out = out or sys.stdout
    runner = make_runner(config, out_dir, telemetry)
    status = ConsoleStatus(out, out.isatty(), json_lines)
    runner.subscribe(status)
    if not json_lines:
        print(f"btune: {config.command_line}", file=out)
    runner.start()
    done = threading.Event()
    holder: dict[str, RunResult] = {}

    def wait_run() -> None:
        holder["r"] = runner.wait()
        done.set()

    threading.Thread(target=wait_run, daemon=True, name="btune-wait").start()
    try:
        while not done.wait(0.25):
            status.tick()
    except KeyboardInterrupt:
        runner.cancel()
        print("\nbtune: cancelling; the record is still written", file=sys.stderr)
        while True:
            try:
                done.wait()
                break
            except KeyboardInterrupt:
                continue
    result = holder["r"]
    status.done()
    if not json_lines:
        from tuner.report import show

        print(show(result.record), file=out)
    print(result.record_path, file=out)
    return 0 if result.status == "ok" else 1
