"""What this machine has and can run: the probe (NVML's GPUs, optional libraries) and, for the launch form,
the catalog's checks per option value.

The rules themselves live in the catalog (``workloads.options.machine_checks``: the common device rule
and ``WorkloadSpec.checks``); this module only asks them, per option value, so the form can disable
what this machine cannot run and say why.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from workloads.options import Machine, Option, WorkloadSpec, machine_checks

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
class MachineInfo:
    """The core's Machine (GPUs, optional modules) and, without GPUs, why there are none."""

    machine: Machine = field(default_factory=Machine)

    @property
    def reason(self) -> str | None:
        return self.machine.reason

    @property
    def has_gpu(self) -> bool:
        return bool(self.machine.gpus)

    def describe(self) -> str:
        """One line: the GPUs, or why there are none."""
        if not self.has_gpu:
            return f"no GPU ({self.reason or 'none visible'}): CPU-sized defaults"
        names: dict[str, int] = {}
        for g in self.machine.gpus:
            names[str(g.get("name"))] = names.get(str(g.get("name")), 0) + 1
        return ", ".join(f"{n} × {name}" for name, n in names.items())

    def default_preset(self, spec: WorkloadSpec) -> str:
        """The workload's preset for this machine: its CPU-sized one when there is no GPU."""
        default = spec.default_preset or spec.presets[0]
        return spec.cpu_preset if not self.has_gpu and spec.cpu_preset in spec.presets else default

    def problems(self, spec: WorkloadSpec, values: Mapping[str, Any]) -> dict[str, str]:
        """Option (dest) -> why this machine cannot run ``values``, from the catalog's checks."""
        out: dict[str, str] = {}
        for name, reason in machine_checks(values, self.machine, spec):
            out.setdefault(name.replace("-", "_"), reason)
        return out

    def unavailable(self, spec: WorkloadSpec, values: Mapping[str, Any], opt: Option) -> dict[Any, str]:
        """The choices of ``opt`` this machine cannot run with the other ``values``, each with the reason."""
        out: dict[Any, str] = {}
        for choice in opt.choices or ():
            reason = self.problems(spec, {**values, opt.dest: choice}).get(opt.dest)
            if reason is not None:
                out[choice] = reason.split(": ", 1)[-1] if reason.startswith("--") else reason
        return out


def detect() -> MachineInfo:
    """Probe (NVML inventory, installed modules); never raises. Call it off the UI thread."""
    return MachineInfo(probe_machine())
