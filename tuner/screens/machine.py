"""What this machine can run: the NVML GPU inventory and the option values it rules out (with reasons).

The rules are few and explicit; an option the catalog adds later is matched by name (``device``,
FP8 mode, tensor-parallel degree) and anything unknown is left allowed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

from workloads.options import Option

FP8_OPTIONS = frozenset({"fp8", "fp8_mode"})
GPU_COUNT_OPTIONS = frozenset({"tp", "tp_degree", "tp_size", "tensor_parallel", "nproc_per_node", "gpus"})
CUDA_ONLY_ATTENTION = frozenset({"flash", "cudnn", "efficient"})


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class Machine:
    """The GPUs NVML reports (none, with the reason, on a machine without them)."""

    gpus: tuple[dict[str, Any], ...] = ()
    reason: str | None = None
    installed: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def from_inventory(cls, inventory: dict[str, Any]) -> Machine:
        gpus = tuple(d for d in inventory.get("devices") or () if isinstance(d, dict))
        reason = None if gpus else (inventory.get("reason") or "NVML reports no GPU")
        return cls(gpus, reason, {m: _installed(m) for m in ("transformer_engine", "torchao")})

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def describe(self) -> str:
        """One line: the GPUs, or why there are none."""
        if not self.gpus:
            return f"no GPU ({self.reason}): CPU-sized defaults"
        names: dict[str, int] = {}
        for g in self.gpus:
            names[str(g.get("name"))] = names.get(str(g.get("name")), 0) + 1
        return ", ".join(f"{n} × {name}" for name, n in names.items())

    def unavailable(self, opt: Option) -> dict[Any, str]:
        """Choices of ``opt`` this machine cannot run, each with the reason."""
        if not opt.choices:
            return {}
        out: dict[Any, str] = {}
        no_gpu = f"no GPU: {self.reason}"
        for choice in opt.choices:
            if opt.dest == "device" and choice == "cuda" and not self.has_gpu:
                out[choice] = no_gpu
            elif opt.dest == "attention_backend" and choice in CUDA_ONLY_ATTENTION and not self.has_gpu:
                out[choice] = f"needs a CUDA GPU ({no_gpu})"
            elif opt.dest in FP8_OPTIONS and choice not in ("off", "auto", None):
                lib = "transformer_engine" if str(choice).startswith(("te", "transformer")) else "torchao"
                if not self.has_gpu:
                    out[choice] = f"FP8 needs a GPU ({no_gpu})"
                elif not self.installed.get(lib, False):
                    out[choice] = f"{lib.replace('_', '-')} is not installed"
        return out

    def problem(self, opt: Option, value: Any) -> str | None:
        """Why this machine cannot run ``value`` for ``opt`` (None if it can)."""
        if opt.dest in GPU_COUNT_OPTIONS and self.has_gpu and isinstance(value, int) and value > len(self.gpus):
            return f"this machine has {len(self.gpus)} GPU(s)"
        return self.unavailable(opt).get(value)

    def default_preset(self, presets: tuple[str, ...], default: str, cpu_preset: str) -> str:
        """The workload's preset for this machine: its CPU-sized one when there is no GPU."""
        return cpu_preset if not self.has_gpu and cpu_preset in presets else default


def detect() -> Machine:
    """The NVML inventory (never raises; may take a moment: call it off the UI thread)."""
    from tuner.telemetry import NvmlSampler

    return Machine.from_inventory(NvmlSampler(lambda e: None).inventory())
