"""The metric registry: every figure btune shows, declared once.

Each metric names where its value lies in a run's summary (computed by tuner.summary from the raw
record), its unit, which direction is better, the block it belongs to and the workloads it applies to
(the serving block applies to any run that sent ``request`` events, a user's own command included).
``btune run``'s closing summary, ``show``, ``compare``, ``export`` and the app's compare screen all read
this table, so a metric added here appears in every view.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: The statistics of a described metric (tuner.stats.describe) that views show, in order.
SHOWN_STATS = ("mean", "p50", "p90", "p99")
EXPORTED_STATS = ("n", "mean", "p50", "p90", "p95", "p99", "stdev", "cv", "min", "max")


@dataclass(frozen=True)
class Metric:
    """One figure: ``path`` into the summary; ``described`` when the value is a statistics object."""

    name: str
    label: str
    path: tuple[str, ...]
    unit: str
    higher_is_better: bool
    block: str
    described: bool = False
    workloads: tuple[str, ...] | None = None  #: None: every workload except those with a block of their own
    stats: tuple[str, ...] = SHOWN_STATS
    shown: bool = True  #: False: exported only (show's header already says it)
    everywhere: bool = False  #: any workload's (a run of any kind can send the events it is computed from)

    def applies(self, workload: Any) -> bool:
        if self.everywhere:
            return True
        if self.workloads is None:
            return workload != "serve"
        return workload in self.workloads


_ENGINE = ("serve",)
REGISTRY: tuple[Metric, ...] = (
    # training and evaluation steps
    Metric("throughput_tokens_per_s", "throughput (steady tokens / steady time)", ("throughput_tokens_per_s",),
           "tok/s", True, "steps"),
    Metric("throughput_per_gpu", "throughput per GPU", ("throughput_per_gpu",), "tok/s", True, "steps"),
    Metric("step_ms", "step time", ("step_ms",), "ms", False, "steps", described=True,
           stats=("p50", "p90", "p99", "cv")),
    Metric("tflops", "TFLOP/s", ("tflops",), "TFLOP/s", True, "steps"),
    Metric("mfu_bf16", "MFU (bf16 peak)", ("mfu", "bf16", "value"), "%", True, "steps"),
    Metric("mfu_fp8", "MFU (fp8 peak)", ("mfu", "fp8", "value"), "%", True, "steps"),
    Metric("mbu", "MBU (HBM peak; decode)", ("mbu", "value"), "%", True, "steps"),
    Metric("bandwidth", "bytes moved per second", ("mbu", "achieved_tb_s"), "TB/s", True, "steps"),
    Metric("loss_last", "final loss", ("loss_last",), "", False, "steps"),
    # serving: the result block as serving benchmarks print it
    Metric("requests_finished", "requests finished", ("serving", "requests", "finished"), "", True, "serving",
           everywhere=True),
    Metric("requests_unfinished", "requests unfinished", ("serving", "requests", "unfinished"), "", False,
           "serving", everywhere=True),
    Metric("load_duration", "load duration", ("serving", "duration_s"), "s", False, "serving", everywhere=True),
    Metric("request_throughput", "request throughput", ("serving", "request_throughput"), "req/s", True, "serving",
           everywhere=True),
    Metric("output_tokens_per_s", "output tokens/s", ("serving", "output_tokens_per_s"), "tok/s", True, "serving",
           everywhere=True),
    Metric("total_tokens_per_s", "total tokens/s", ("serving", "total_tokens_per_s"), "tok/s", True, "serving",
           everywhere=True),
    Metric("goodput", "goodput (requests within the SLOs)", ("serving", "goodput"), "req/s", True, "serving",
           everywhere=True),
    Metric("ttft_ms", "TTFT", ("serving", "ttft_ms"), "ms", False, "serving", described=True, everywhere=True),
    Metric("tpot_ms", "TPOT", ("serving", "tpot_ms"), "ms", False, "serving", described=True, everywhere=True),
    Metric("itl_ms", "ITL", ("serving", "itl_ms"), "ms", False, "serving", described=True, everywhere=True),
    Metric("e2e_ms", "E2E latency", ("serving", "e2e_ms"), "ms", False, "serving", described=True,
           everywhere=True),
    Metric("engine_mbu", "MBU (HBM peak)", ("mbu", "value"), "%", True, "serving", workloads=_ENGINE),
    Metric("engine_bandwidth", "bytes moved per second", ("mbu", "achieved_tb_s"), "TB/s", True, "serving",
           workloads=_ENGINE),
    Metric("engine_step_ms", "engine step time", ("step_ms",), "ms", False, "engine steps", described=True,
           workloads=_ENGINE, stats=("p50", "p90", "p99")),
    Metric("engine_tokens_per_s", "engine tokens / busy time", ("throughput_tokens_per_s",), "tok/s", True,
           "engine steps", workloads=_ENGINE),
    Metric("decode_step_ms", "decode-only step time", ("engine", "decode_step_ms"), "ms", False, "engine steps",
           described=True, workloads=_ENGINE, stats=("p50", "p90", "p99")),
    Metric("decode_batch", "decode-only step batch", ("engine", "decode_batch"), "", True, "engine steps",
           described=True, workloads=_ENGINE, stats=("mean",)),
    # expert balance over the whole run (MoE)
    Metric("expert_gini", "Gini (mean of layers)", ("experts", "mean", "gini"), "", False, "expert balance"),
    Metric("expert_gini_max", "Gini (worst layer)", ("experts", "max", "gini"), "", False, "expert balance"),
    Metric("expert_cv", "load CV (mean of layers)", ("experts", "mean", "cv"), "", False, "expert balance"),
    Metric("expert_max_vio", "MaxVio (worst layer)", ("experts", "max", "max_vio"), "", False, "expert balance"),
    Metric("expert_load_entropy", "load entropy (mean of layers)", ("experts", "mean", "entropy"), "", True,
           "expert balance"),
    Metric("expert_dead", "dead experts (worst layer)", ("experts", "max", "dead"), "", False, "expert balance"),
    Metric("expert_dropped", "dropped tokens (worst layer)", ("experts", "max", "dropped_frac"), "%", False,
           "expert balance"),
    Metric("router_entropy", "router entropy (mean of layers)", ("experts", "mean", "router_entropy"), "", True,
           "expert balance"),
    # energy and memory
    Metric("energy", "energy", ("energy_j",), "J", False, "energy and memory"),
    Metric("joules_per_token", "energy per token", ("joules_per_token",), "J/tok", False, "energy and memory"),
    Metric("torch_mem_peak", "torch peak memory", ("torch_mem_peak_mb",), "MiB", False, "energy and memory"),
    Metric("duration", "run duration", ("duration_s",), "s", False, "run", shown=False),
    Metric("tokens_total", "tokens", ("tokens_total",), "tokens", True, "run", shown=False),
)
_SERVE_TOO = frozenset({"energy", "joules_per_token", "torch_mem_peak", "duration", "tokens_total"})


def dig(obj: Any, path: tuple[str, ...]) -> Any:
    """obj[path[0]][path[1]]..., or None where any step is missing."""
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def applies(metric: Metric, workload: Any) -> bool:
    """Whether ``metric`` is one of ``workload``'s figures."""
    return metric.applies(workload) or (workload == "serve" and metric.name in _SERVE_TOO)


@dataclass(frozen=True)
class Figure:
    """One shown value: a metric (and statistic, for described metrics) of one run."""

    metric: Metric
    stat: str | None
    value: Any

    @property
    def label(self) -> str:
        return f"{self.metric.label} {self.stat}" if self.stat else self.metric.label

    @property
    def unit(self) -> str:
        return "" if self.stat in ("n", "cv") else self.metric.unit

    @property
    def key(self) -> str:
        return f"{self.metric.name}.{self.stat}" if self.stat else self.metric.name


def figures(summary: dict[str, Any], workload: Any, stats: tuple[str, ...] | None = None,
            exported: bool = False) -> Iterator[Figure]:
    """Every registry figure of a summary that applies to ``workload`` (values may be None); ``exported``:
    the export's set (every metric, every statistic given in ``stats``)."""
    for m in REGISTRY:
        if not applies(m, workload) or not (m.shown or exported):
            continue
        value = dig(summary, m.path)
        if m.described:
            desc = value if isinstance(value, dict) else {}
            for stat in stats or m.stats:
                yield Figure(m, stat, desc.get(stat))
        else:
            yield Figure(m, None, value)


def number(v: Any) -> bool:
    """A value a view can show as a number."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)
