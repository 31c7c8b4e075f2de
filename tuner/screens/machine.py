"""What this machine can run, for the launch form: the core's probe (tuner.launch.probe_machine) and checks.

The rules themselves live in the catalog (``workloads.options.machine_checks``: the common device rule
and ``WorkloadSpec.checks``); this module only asks them, per option value, so the form can disable
what this machine cannot run and say why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from workloads.options import Machine, Option, WorkloadSpec, machine_checks


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
    """Probe through the core (NVML inventory, installed modules); never raises. Call it off the UI thread."""
    from tuner.launch import probe_machine

    return MachineInfo(probe_machine())
