"""One lifecycle for every workload: a workload module brings its plan, its model and its step function.

The :class:`Harness` owns what every run does the same way: the Emitter, joining torchrun's process group
(and the TP mesh), the device and dtype, classifying failures into exit codes, the ``meta`` event of every
rank, the peak-memory reset, the summary and leaving the process group. ``Harness.run`` is the whole
lifecycle of a step-loop workload (dense, MoE)::

    def setup(h: Harness, p: dict) -> Steps:        # the model for plan p, and its step function
        ...
    def run(opts):
        return Harness("dense", opts).run(plan, setup)

A workload with a loop of its own (serving, TP validation) calls the same pieces in order: ``join``,
``resolve``, ``setup_failed``, ``meta``, ``oom``, ``finish``.

Exit codes: 0 ok, 1 failed (a TP mismatch, an engine error), 2 a configuration this machine cannot run,
3 out of memory, 130 interrupted (the console's cancel), 75 the console is gone (``workloads.protocol``).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from workloads import parallel
from workloads.loop import LoopSpec, run_steps
from workloads.protocol import UNSET, Emitter

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_OOM, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class SetupError(Exception):
    """A configuration this machine cannot run; the message is one line."""


#: What a failed setup raises: a configuration this machine cannot run (exit 2), or out of memory (exit 3).
SETUP_ERRORS = (SetupError, ValueError, torch.OutOfMemoryError)


def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda when a GPU is visible, else cpu; ``cuda`` without a GPU is a SetupError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SetupError("--device cuda: no CUDA GPU is visible to torch")
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_uuid(device: torch.device) -> str | None:
    """The GPU's UUID as NVML writes it (``GPU-9a48c30d-…``), for the ``meta`` event: the summary charges the
    run the energy of the GPUs its ranks name. torch prints it without the prefix; None off CUDA."""
    if device.type != "cuda":
        return None
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid).strip()
    except Exception:  # an older torch without .uuid, or no device: the summary falls back
        return None
    if not uuid:
        return None
    return uuid if uuid.upper().startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


@dataclass
class Steps:
    """What a step-loop workload brings: its step function and the tokens a step processes (global, counted
    once; a function of the step index where steps differ), what ran (``meta``'s backends) and its other meta
    fields, an optional per-step callback adding step fields (``extra(step)``) and an optional ``end()`` run after
    the last step, returning summary fields."""

    step: Callable[[int], torch.Tensor | None]
    tokens_per_step: int | Callable[[int], int]
    backends: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    extra: Callable[[int], dict[str, Any]] | None = None
    end: Callable[[], dict[str, Any]] | None = None


Plan = Callable[[dict[str, Any], str], dict[str, Any]]


def _larger(a: int | None, b: int | None) -> int | None:
    return a if b is None else b if a is None else max(a, b)


class Harness:
    """One run of ``workload`` with options ``opts`` (see the module docstring)."""

    def __init__(self, workload: str, opts: dict[str, Any]) -> None:
        self.workload, self.opts = workload, opts
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # inherited from a background job (``cmd &``):
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the console's cancel is a SIGINT
        self.em = Emitter()
        self.rank, self.world = parallel.rank(), parallel.world_size()
        self.mesh: Any = None
        self.dp_mesh: Any = None
        self.cp_mesh: Any = None
        self.data_rank = 0
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def phase(self, name: str, detail: str | None = None, k: int | None = None, n: int | None = None) -> None:
        """Where the run is (workloads.protocol.PHASES), said once, by rank 0."""
        if self.rank == 0:
            self.em.phase(name, detail, k, n)

    # -- setup: raises SETUP_ERRORS, which ``setup_failed`` turns into an error event and an exit code ----------

    def join(self) -> Any:
        """Join torchrun's process group: the TP mesh for ``--tp`` (``self.mesh``) and the data-parallel mesh for
        ``--dp-shard``/``--dp-replicate`` (``self.dp_mesh``, over ``--cp``'s ranks too), the context-parallel mesh
        (``self.cp_mesh``), each None at degree 1, and which batch this rank reads (``self.data_rank``);
        ValueError when torchrun's world size is not their product."""
        self.mesh, self.dp_mesh, self.cp_mesh, self.data_rank = parallel.join(
            self.opts["tp"], self.opts["device"], int(self.opts.get("dp_shard") or 1),
            int(self.opts.get("dp_replicate") or 1), int(self.opts.get("cp") or 1))
        return self.mesh

    def join_replicas(self, replicas: int, tp: int) -> Any:
        """Serving: join as one of ``replicas`` x ``tp`` ranks; this rank's tensor-parallel group (None at one
        process or tp 1)."""
        if self.world != replicas * tp:
            raise SetupError(f"--replicas {replicas} x --tp {tp} but {self.world} processes: launch with torchrun "
                             f"--nproc-per-node {replicas * tp} -m workloads.{self.workload} --replicas {replicas} "
                             f"--tp {tp} ...")
        if self.world == 1:
            return None
        cuda = self.opts["device"] != "cpu" and torch.cuda.is_available()
        return parallel.replica_groups("cuda" if cuda else "cpu", replicas, tp)

    def resolve(self, plan: Plan) -> dict[str, Any]:
        """The device, then ``plan(opts, device type)``, then the plan's dtype; seeds torch. Returns the plan."""
        self.device = resolve_device(self.opts["device"])
        p = plan(self.opts, self.device.type)
        self.dtype = resolve_dtype(p["dtype"], self.device)
        torch.manual_seed(self.opts["seed"])
        return p

    # -- failures: an error event, one line on stderr, the exit code ---------------------------------------------

    def setup_failed(self, exc: BaseException, what: str = "the model") -> int:
        """A setup that raised one of SETUP_ERRORS: 3 when out of memory, else 2 (a configuration)."""
        if isinstance(exc, torch.OutOfMemoryError):
            return self.oom(exc, f"out of memory building {what}")
        self.em.error(str(exc), kind="config")
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    def oom(self, exc: BaseException, what: str = "out of memory") -> int:
        """Out of memory (setup or a step): exit 3."""
        self.em.error(f"{what}: {str(exc).splitlines()[0]}", kind="oom")
        print(f"error: CUDA out of memory: {exc}", file=sys.stderr)
        return EXIT_OOM

    def failed(self, what: str, exc: BaseException) -> int:
        """A run that failed on its way (e.g. a forced kernel that cannot run the decode shapes): exit 1."""
        self.em.error(f"{what}: {str(exc).splitlines()[0]}", kind="error")
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED

    # -- the run -------------------------------------------------------------------------------------------------

    def meta(self, plan: dict[str, Any], backends: dict[str, Any] = UNSET, **fields: Any) -> None:
        """Every rank's ``meta`` event (each names its GPU, whose energy the summary counts: design.md, "Energy");
        the peak-memory counter starts from here. Precision: fp8 when FP8 ran, else the plan's dtype."""
        fp8_ran = backends is not UNSET and backends.get("fp8", {}).get("library", "off") != "off"
        fields.setdefault("precision", "fp8" if fp8_ran else plan["dtype"])
        self.em.meta(workload=self.workload, options=self.opts, plan=plan, device=str(self.device),
                     device_name=device_name(self.device), n_devices=self.world, torch_version=torch.__version__,
                     backends=backends, device_uuid=device_uuid(self.device), **fields)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def finish(self, code: int, summary: dict[str, Any] | None = None,
               release: Callable[[], None] | None = None) -> int:
        """End the run the same way everywhere: rank 0 sends ``summary`` (before the teardown, which NCCL can
        stall), ``release()`` frees what holds the process group (captured CUDA graphs), every rank leaves the
        group (a teardown stuck for a minute ends the process with ``code``); the exit code."""
        if self.rank == 0 and summary is not None:
            self.em.summary(**summary)
        if release is not None:
            release()
        parallel.shutdown(code)
        self.em.close()
        return code

    def peak_memory_bytes(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None

    def run(self, plan: Plan, setup: Callable[[Harness, dict[str, Any]], Steps]) -> int:
        """The whole run of a step-loop workload: join, resolve, ``setup(harness, plan)``, meta, the measured
        steps (``workloads.loop``), the summary; the exit code."""
        try:
            self.phase("building")
            self.join()
            p = self.resolve(plan)
            steps = setup(self, p)
        except SETUP_ERRORS as exc:
            return self.setup_failed(exc)
        self.meta(p, steps.backends, **steps.meta)
        try:
            res = run_steps(self.em, self.device, LoopSpec(self.opts["warmup"], p["steps"], self.opts["duration"]),
                            steps.step, steps.tokens_per_step, extra=steps.extra, phase=self.phase,
                            compiled=self.opts["compile_mode"] != "none",
                            memory_profile=self.opts.get("memory_profile") or 0)
        except torch.OutOfMemoryError as exc:
            return self.oom(exc)
        end = steps.end() if steps.end is not None else {}
        first = res["first_step_ms"]
        compiled = self.opts["compile_mode"] != "none"
        return self.finish(EXIT_INTERRUPTED if res["interrupted"] else EXIT_OK, {
            "first_step_ms": first, "compile_s": first / 1000.0 if compiled and first else None,
            "memory_estimate_bytes": p["memory_estimate_bytes"],
            "torch_mem_peak_bytes": _larger(self.peak_memory_bytes(), res["peak_before_profile"]),
            "steps_run": res["steps"], "interrupted": res["interrupted"], **end})
