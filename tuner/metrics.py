"""The metric registry: every figure btune shows, declared once.

Each metric names where its value lies in a run's summary (computed by tuner.summary from the raw
record), its unit, which direction is better, the block it belongs to and the workloads it applies to
(the serving block applies to any run that sent ``request`` events, a user's own command included).
``btune run``'s closing summary, ``show``, ``compare``, ``export`` and the app's compare screen all read
this table, so a metric added here appears in every view.
"""

from __future__ import annotations

import math
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
    kind: str = ""  #: "count": an integer however it is stored (tuner.report.fmt)
    short: str = ""  #: the column header of a sweep table (default: the label)
    headline: tuple[str, ...] = ()  #: a sweep table's column: ("value",), or the statistics of a described one

    def applies(self, workload: Any) -> bool:
        if self.everywhere:
            return True
        if self.workloads is None:
            return workload != "serve"
        return workload in self.workloads


_ENGINE = ("serve",)
_PPL = ("perplexity",)
REGISTRY: tuple[Metric, ...] = (
    # what the model computes (perplexity runs; tuner.quality): the result, so it comes first
    Metric("perplexity", "perplexity", ("quality", "perplexity"), "", False, "quality", workloads=_PPL, short="ppl",
           headline=("value",)),
    Metric("mean_nll", "mean NLL per scored token", ("quality", "mean_nll"), "nats", False, "quality", workloads=_PPL),
    Metric("bits_per_byte", "bits per byte", ("quality", "bits_per_byte"), "", False, "quality", workloads=_PPL,
           short="bits/byte", headline=("value",)),
    Metric("tokens_scored", "tokens scored", ("quality", "tokens_scored"), "", True, "quality",
           workloads=_PPL, kind="count"),
    # training and evaluation steps
    Metric("throughput_tokens_per_s", "throughput (steady tokens / steady time)", ("throughput_tokens_per_s",),
           "tok/s", True, "steps", short="throughput", headline=("value",)),
    Metric("throughput_per_gpu", "throughput per GPU", ("throughput_per_gpu",), "tok/s", True, "steps"),
    Metric("step_ms", "step time", ("step_ms",), "ms", False, "steps", described=True,
           stats=("p50", "p90", "p99", "cv"), short="step", headline=("p50",)),
    Metric("tflops", "achieved FLOP/s", ("tflops",), "TFLOP/s", True, "steps", short="FLOP/s", headline=("value",)),
    Metric("mfu_bf16", "MFU (bf16 peak)", ("mfu", "bf16", "value"), "%", True, "steps", short="MFU bf16",
           headline=("value",)),
    Metric("mfu_fp8", "MFU (fp8 peak)", ("mfu", "fp8", "value"), "%", True, "steps", short="MFU fp8",
           headline=("value",)),
    Metric("mbu", "MBU (HBM peak; decode)", ("mbu", "value"), "%", True, "steps", short="MBU", headline=("value",)),
    Metric("bandwidth", "bytes moved per second", ("mbu", "achieved_tb_s"), "TB/s", True, "steps"),
    Metric("loss_last", "final loss", ("loss_last",), "", False, "steps", short="loss", headline=("value",)),
    # serving: the result block as serving benchmarks print it
    Metric("requests_finished", "requests finished", ("serving", "requests", "finished"), "", True, "serving",
           everywhere=True, kind="count"),
    Metric("requests_unfinished", "requests unfinished", ("serving", "requests", "unfinished"), "", False,
           "serving", everywhere=True, kind="count", short="unfinished", headline=("value",)),
    Metric("requests_failed", "requests failed", ("serving", "failures", "total"), "", False, "serving",
           everywhere=True, kind="count", short="failed", headline=("value",)),
    Metric("load_duration", "load duration", ("serving", "duration_s"), "s", False, "serving", everywhere=True),
    Metric("request_throughput", "request throughput", ("serving", "request_throughput"), "req/s", True, "serving",
           everywhere=True, short="requests", headline=("value",)),
    Metric("output_tokens_per_s", "output tokens/s", ("serving", "output_tokens_per_s"), "tok/s", True, "serving",
           everywhere=True, short="output", headline=("value",)),
    Metric("total_tokens_per_s", "total tokens/s", ("serving", "total_tokens_per_s"), "tok/s", True, "serving",
           everywhere=True),
    Metric("goodput", "goodput (requests within the SLOs)", ("serving", "goodput"), "req/s", True, "serving",
           everywhere=True, short="goodput", headline=("value",)),
    Metric("ttft_ms", "TTFT", ("serving", "ttft_ms"), "ms", False, "serving", described=True, everywhere=True,
           headline=("p50", "p99")),
    Metric("tpot_ms", "TPOT", ("serving", "tpot_ms"), "ms", False, "serving", described=True, everywhere=True,
           headline=("p50",)),
    Metric("itl_ms", "ITL", ("serving", "itl_ms"), "ms", False, "serving", described=True, everywhere=True,
           headline=("p99",)),
    Metric("e2e_ms", "E2E latency", ("serving", "e2e_ms"), "ms", False, "serving", described=True,
           everywhere=True),
    Metric("engine_mbu", "MBU (HBM peak)", ("mbu", "value"), "%", True, "serving", workloads=_ENGINE, short="MBU",
           headline=("value",)),
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
    Metric("expert_max_vio", "MaxVio (worst layer)", ("experts", "max", "max_vio"), "", False, "expert balance",
           short="MaxVio", headline=("value",)),
    Metric("expert_load_entropy", "load entropy (mean of layers)", ("experts", "mean", "entropy"), "", True,
           "expert balance"),
    Metric("expert_dead", "dead experts (worst layer)", ("experts", "max", "dead"), "", False, "expert balance",
           kind="count", short="dead experts", headline=("value",)),
    Metric("expert_dropped", "dropped tokens (worst layer)", ("experts", "max", "dropped_frac"), "%", False,
           "expert balance"),
    Metric("router_entropy", "router entropy (mean of layers)", ("experts", "mean", "router_entropy"), "", True,
           "expert balance"),
    # start-up: what the steady figures leave out
    Metric("first_step_ms", "first step (compile and allocator warm-up included)", ("first_step_ms",), "ms", False,
           "start-up"),
    Metric("compile_s", "compile", ("compile_s",), "s", False, "start-up"),
    # energy and memory
    Metric("energy", "energy", ("energy_j",), "J", False, "energy and memory"),
    Metric("joules_per_token", "energy per token", ("joules_per_token",), "J/tok", False, "energy and memory",
           short="energy", headline=("value",)),
    Metric("torch_mem_peak", "torch peak memory", ("torch_mem_peak_mb",), "MiB", False, "energy and memory",
           short="peak mem", headline=("value",)),
    Metric("memory_profile_peak", "profiled peak (live allocations, --memory-profile)", ("memory_profile", "peak_mb"),
           "MiB", False, "energy and memory", everywhere=True),
    Metric("energy_integrated", "energy (power integral, cross-check)", ("energy_integrated_j",), "J", False,
           "energy and memory", everywhere=True),
    # the host: the run's whole process tree (a command's children included)
    Metric("host_cpu", "process tree CPU % (100: one core)", ("host", "proc_cpu_percent", "mean"), "", False,
           "host", everywhere=True),
    Metric("host_rss", "process tree memory (RSS) max", ("host", "proc_rss_mb_max"), "MiB", False, "host",
           everywhere=True),
    Metric("duration", "run duration", ("duration_s",), "s", False, "run", shown=False),
    Metric("tokens_total", "tokens", ("tokens_total",), "tokens", True, "run", shown=False, kind="count"),
)
_BY_NAME = {m.name: m for m in REGISTRY}
_SERVE_TOO = frozenset({"energy", "joules_per_token", "torch_mem_peak", "duration", "tokens_total", "compile_s"})
#: Figures a workload's own block says better: a perplexity run's loss is each batch's mean NLL (its quality block).
_NOT_FOR = {"loss_last": _PPL}


def dig(obj: Any, path: tuple[str, ...]) -> Any:
    """obj[path[0]][path[1]]..., or None where any step is missing."""
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def applies(metric: Metric, workload: Any) -> bool:
    """Whether ``metric`` is one of ``workload``'s figures."""
    if workload in _NOT_FOR.get(metric.name, ()):
        return False
    return metric.applies(workload) or (workload == "serve" and metric.name in _SERVE_TOO)


def figure_of(name: Any, stat: Any, workload: Any) -> tuple[Metric, str | None]:
    """The registry metric ``name`` and its statistic (a described metric's headline statistic when None) as
    ``workload``'s figure; ValueError (one line) for an unknown metric, another workload's, or a bad statistic."""
    metric = _BY_NAME.get(name) if isinstance(name, str) else None
    if metric is None:
        raise ValueError(f"metric {name!r} is not in the registry (tuner/metrics.py)")
    if not applies(metric, workload):
        raise ValueError(f"metric {name!r} is not one of {workload}'s figures")
    if metric.described:
        stat = stat if stat is not None else (metric.headline or ("p50",))[0]
        if stat not in EXPORTED_STATS:
            raise ValueError(f"stat {stat!r} of {name}: expected one of {', '.join(EXPORTED_STATS)}")
    elif stat is not None:
        raise ValueError(f"{name} is a single value; it has no stat")
    return metric, stat


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
    def kind(self) -> str:
        """How the value is written: "count" (an integer) for a count, a sample size included."""
        if self.stat == "n":
            return "count"
        return self.metric.kind if self.stat in (None, "min", "max") else ""

    @property
    def short(self) -> str:
        """A column header: the metric's short name and the statistic."""
        name = self.metric.short or self.metric.label
        return f"{name} {self.stat}" if self.stat else name

    @property
    def key(self) -> str:
        return f"{self.metric.name}.{self.stat}" if self.stat else self.metric.name


def _figure(m: Metric, stat: str | None, value: Any) -> Figure:
    """A figure whose value is written as its kind: a count as an int, however the summary stored it (so every
    view, a panel included, writes ``58``, not ``58.000``)."""
    fig = Figure(m, stat, value)
    if fig.kind == "count" and number(value) and math.isfinite(value):
        return Figure(m, stat, round(value))
    return fig


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
                yield _figure(m, stat, desc.get(stat))
        else:
            yield _figure(m, None, value)


def headline_figures(summary: dict[str, Any], workload: Any) -> Iterator[Figure]:
    """The registry's headline figures of a summary (a sweep table's columns), values possibly None."""
    for m in REGISTRY:
        if not m.headline or not applies(m, workload):
            continue
        value = dig(summary, m.path)
        if m.described:
            desc = value if isinstance(value, dict) else {}
            for stat in m.headline:
                yield _figure(m, stat, desc.get(stat))
        else:
            yield _figure(m, None, value)


def number(v: Any) -> bool:
    """A value a view can show as a number."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)
