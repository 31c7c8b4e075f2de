"""What a tune optimises and what it must respect: objectives and constraints over registry figures
(tuner.metrics: one implementation of each, read from the trial's record summary).

Objectives by name: a registry figure (``throughput_tokens_per_s``, ``step_ms.p99``) or a short name:
``tokens_per_s``, ``tokens_per_joule`` (joules per token, lower), ``mfu``, ``step_time`` (step_ms p50), ``memory``
(torch's peak), ``goodput`` and ``ttft`` for serving. A constraint is ``FIGURE<=VALUE`` or ``FIGURE>=VALUE`` on a
trial's measured figure; memory before launch is ``--max-memory``'s (tuner.tune.prune).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from tuner.metrics import Metric, dig, figure_of, number
from tuner.tune import TuneError

ALIASES = {"tokens_per_s": "throughput_tokens_per_s", "tokens_per_joule": "joules_per_token", "mfu": "mfu_bf16",
           "step_time": "step_ms.p50", "memory": "torch_mem_peak", "ttft": "ttft_ms.p99", "tpot": "tpot_ms.p99"}
#: Figures only a GPU run reports (an energy counter, a peak FLOP/s table, torch's CUDA allocator).
GPU_ONLY = frozenset({"mfu_bf16", "mfu_fp8", "mbu", "bandwidth", "engine_mbu", "engine_bandwidth", "energy",
                      "joules_per_token", "energy_integrated", "torch_mem_peak", "memory_profile_peak"})


@dataclass(frozen=True)
class Figure:
    """One figure of a trial: a registry metric (and statistic) and which way is better."""

    name: str  #: as the user wrote it (``tokens_per_s``)
    metric: Metric
    stat: str | None
    maximize: bool

    @property
    def key(self) -> str:
        return f"{self.metric.name}.{self.stat}" if self.stat else self.metric.name

    @property
    def label(self) -> str:
        unit = f" ({self.metric.unit})" if self.metric.unit else ""
        return f"{self.metric.label}{' ' + self.stat if self.stat else ''}{unit}"

    def value(self, summary: dict[str, Any]) -> float | None:
        """The figure in a record's summary, or None when the run did not report it."""
        v = dig(summary, self.metric.path)
        if self.stat is not None:
            v = v.get(self.stat) if isinstance(v, dict) else None
        return float(v) if number(v) and math.isfinite(v) else None


def figure(name: str, workload: str, gpu: bool) -> Figure:
    """The figure ``name`` of ``workload`` (TuneError, one line, when the workload cannot report it here)."""
    ref = ALIASES.get(name, name)
    metric_name, _, stat = ref.partition(".")
    try:
        metric, st = figure_of(metric_name, stat or None, workload)
    except ValueError as exc:
        raise TuneError(f"{name}: {exc}") from None
    if metric.name in GPU_ONLY and not gpu:
        raise TuneError(f"{name}: {workload} reports {metric.label} only on a GPU (NVML, CUDA), and this tune runs "
                        "on the CPU")
    return Figure(name, metric, st, metric.higher_is_better)


def objectives(text: str, workload: str, gpu: bool) -> tuple[Figure, ...]:
    """``--objective A[,B...]``: one figure to optimise, or several (a Pareto front)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise TuneError("--objective: name at least one figure (tokens_per_s, tokens_per_joule, mfu, step_time, "
                        "memory, goodput, ...)")
    out = tuple(figure(n, workload, gpu) for n in names)
    if len({f.key for f in out}) < len(out):
        raise TuneError(f"--objective {text}: a figure is named twice")
    return out


@dataclass(frozen=True)
class Constraint:
    """``figure <= bound`` or ``figure >= bound`` on a trial's measured figure."""

    figure: Figure
    op: str
    bound: float

    def holds(self, summary: dict[str, Any]) -> bool | None:
        """Whether the trial meets it (None: the trial did not report the figure)."""
        v = self.figure.value(summary)
        if v is None:
            return None
        return v <= self.bound if self.op == "<=" else v >= self.bound

    def __str__(self) -> str:
        return f"{self.figure.name}{self.op}{self.bound:g}"


_CONSTRAINT = re.compile(r"\s*([\w.]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*")


def constraint(text: str, workload: str, gpu: bool) -> Constraint:
    """``--constraint FIGURE<=VALUE`` (or ``>=``)."""
    m = _CONSTRAINT.fullmatch(text)
    if not m:
        raise TuneError(f"--constraint {text!r}: expected FIGURE<=VALUE or FIGURE>=VALUE (e.g. ttft_ms.p99<=500)")
    try:
        bound = float(m.group(3))
    except ValueError:
        raise TuneError(f"--constraint {text!r}: {m.group(3)!r} is not a number") from None
    return Constraint(figure(m.group(1), workload, gpu), m.group(2), bound)
