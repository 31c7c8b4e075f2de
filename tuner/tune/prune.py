"""Before launch: each setting is checked as ``btune run`` would check it (the declaration's rules and this
machine's), and its memory predicted from the workload's dry-run estimate times a calibration learned from the
trials (measured peak over estimate; a trial that ran out of memory raises it). A setting refused, or predicted
over the limit, is never launched.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tuner.launch import LaunchError, RunConfig, build_config, estimate_parts
from tuner.tune import TuneError
from workloads.options import Machine, OptionError, WorkloadSpec

MIB = 1024 * 1024
_SIZE = re.compile(r"\s*([0-9.]+)\s*(%|b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*", re.I)
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def memory_limit(text: str | None, machine: Machine, device: str) -> tuple[float | None, str]:
    """``--max-memory``: a size (``30GiB``, ``500MB``, bytes) or a percentage of the smallest visible GPU (default
    90% on a GPU, no limit on the CPU); (bytes or None, how it was set)."""
    gpu = device != "cpu" and bool(machine.gpus)
    totals = [g.get("mem_total_mb") for g in machine.gpus if isinstance(g.get("mem_total_mb"), (int, float))]
    if text is None:
        if not gpu or not totals:
            return None, "no limit (CPU)"
        text = "90%"
    m = _SIZE.fullmatch(text)
    if not m:
        raise TuneError(f"--max-memory {text!r}: expected a size (30GiB, 500MB) or a percentage of the GPU (90%)")
    amount, unit = float(m.group(1)), (m.group(2) or "b").lower()
    if unit == "%":
        if not gpu or not totals:
            raise TuneError(f"--max-memory {text}: a percentage of the GPU's memory, and this tune runs on the CPU; "
                            "give a size (e.g. 2GiB)")
        if not 0 < amount <= 100:
            raise TuneError(f"--max-memory {text}: expected a percentage in (0, 100]")
        return amount / 100 * min(totals) * MIB, f"{amount:g}% of {min(totals) / 1024:.1f} GiB"
    if amount <= 0:
        raise TuneError(f"--max-memory {text}: expected a size > 0")
    return amount * _UNITS[unit], text.strip()


def estimate(spec: WorkloadSpec, options: Mapping[str, Any], device: str) -> int | None:
    """The workload's dry-run memory estimate in bytes (its torch-free ``plan``), or None when it makes none."""
    parts = estimate_parts(spec, options, device)
    return parts["total"] if parts else None


@dataclass
class Calibration:
    """Measured peak over estimate, per trial; the prediction is the estimate times the largest ratio seen (a
    trial that ran out of memory counts as at least the limit over its estimate), 1 before any trial."""

    ratios: list[float] = field(default_factory=list)
    floors: list[float] = field(default_factory=list)

    @property
    def factor(self) -> float:
        return max([*self.ratios, *self.floors], default=1.0)

    def predict(self, estimate_bytes: int | None) -> float | None:
        return None if estimate_bytes is None else estimate_bytes * self.factor

    def learn(self, estimate_bytes: int | None, measured_bytes: float | None) -> None:
        if estimate_bytes and measured_bytes:
            self.ratios.append(measured_bytes / estimate_bytes)

    def learn_oom(self, estimate_bytes: int | None, limit_bytes: float | None) -> None:
        if estimate_bytes and limit_bytes:
            self.floors.append(limit_bytes / estimate_bytes)

    def error_summary(self) -> dict[str, Any]:
        """How far the raw estimate was from the measured peaks: the median and worst relative error."""
        errs = [r - 1 for r in self.ratios]
        return {"trials": len(errs), "median_error": statistics.median(errs) if errs else None,
                "worst_error": max(errs, key=abs) if errs else None, "factor": self.factor}


@dataclass(frozen=True)
class Candidate:
    """A setting checked before launch: its run config, or why it is never launched."""

    setting: dict[str, Any]
    config: RunConfig | None
    estimate_bytes: int | None
    refused: str | None = None  #: the declaration's or this machine's refusal


def check(spec: WorkloadSpec, fixed: Mapping[str, Any], setting: Mapping[str, Any], machine: Machine,
          device: str) -> Candidate:
    """``setting`` over ``fixed`` checked as ``btune run`` checks a run (options, knob conflicts, hardware)."""
    options = {**fixed, **setting}
    try:
        config = build_config(spec.name, options, machine=machine)
    except (OptionError, LaunchError) as exc:
        return Candidate(dict(setting), None, None, str(exc))
    return Candidate(dict(setting), config, estimate(spec, config.options, device))


def check_space(spec: WorkloadSpec, fixed: Mapping[str, Any], knobs: Any, machine: Machine,
                device: str) -> list[Candidate]:
    """Every setting of the space (``knobs`` over ``fixed``) checked once, as ``check`` checks one."""
    from tuner.tune.space import settings

    return [check(spec, fixed, s, machine, device) for s in settings(spec, fixed, knobs)]


def contradiction(checked: list[Candidate]) -> str | None:
    """Why nothing of a checked space can launch (every setting refused), or None."""
    reasons = sorted({c.refused for c in checked if c.refused is not None})
    if not checked or any(c.refused is None for c in checked):
        return None
    return (f"contradictory space: every one of its {len(checked)} settings is refused "
            f"({reasons[0]}{'; ...' if len(reasons) > 1 else ''})")


def is_oom(record: dict[str, Any]) -> bool:
    """Whether a failed run ran out of device memory (torch's OutOfMemoryError in its error or stderr)."""
    err = record.get("error") or {}
    text = " ".join(str(err.get(k) or "") for k in ("message", "stderr_tail")) if isinstance(err, dict) else str(err)
    return "out of memory" in text.lower() or "outofmemoryerror" in text.lower()
