"""Prometheus names for btune's figures: the live ``--metrics-port`` endpoint and ``btune export --format prometheus``.

Both write the same names, in base units (seconds, bytes, joules, watts, ratios 0-1), from the same numbers:
a run's summary (tuner.summary.summarize, the record's own computation) read through the metric registry
(tuner.metrics). Live, the summary is that of the window of events the console's RunFeed keeps (its last
steps, GPU samples and requests), computed at scrape time. GPU samples keep dcgm-exporter's names and units
(docs/prometheus.md has the table). prometheus_client is imported only where the families are built or the
endpoint starts, never at import of this module.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tuner.feed import FeedView, RunFeed, energy_so_far, joules_per_token
from tuner.metrics import EXPORTED_STATS, REGISTRY, Metric, figures, number

#: A registry unit -> (the Prometheus name's unit suffix, the factor to the base unit).
UNITS: dict[str, tuple[str, float]] = {
    "ms": ("seconds", 1e-3), "s": ("seconds", 1.0), "%": ("ratio", 1.0),  # "%" figures are stored as 0-1
    "MiB": ("bytes", 2.0 ** 20), "J": ("joules", 1.0), "TB/s": ("bytes_per_second", 1e12),
    "TFLOP/s": ("flops_per_second", 1e12), "tok/s": ("tokens_per_second", 1.0),
    "req/s": ("requests_per_second", 1.0), "J/tok": ("joules_per_token", 1.0), "nats": ("nats", 1.0),
    "tokens": ("", 1.0), "": ("", 1.0),
}
#: Registry names whose Prometheus name is not the derived one (the unit already in the registry name).
NAMES: dict[str, str] = {
    "throughput_tokens_per_s": "btune_tokens_per_second",
    "throughput_per_gpu": "btune_tokens_per_second_per_gpu",
    "tflops": "btune_flops_per_second",
    "bandwidth": "btune_memory_bandwidth_bytes_per_second",
    "engine_bandwidth": "btune_engine_memory_bandwidth_bytes_per_second",
    "request_throughput": "btune_requests_per_second",
    "output_tokens_per_s": "btune_output_tokens_per_second",
    "total_tokens_per_s": "btune_total_tokens_per_second",
    "goodput": "btune_goodput_requests_per_second",
    "engine_tokens_per_s": "btune_engine_tokens_per_second",
    "energy": "btune_energy_joules_total",
    "joules_per_token": "btune_energy_per_token_joules",
    "torch_mem_peak": "btune_torch_memory_peak_bytes",
    "memory_profile_peak": "btune_memory_profile_peak_bytes",
    "host_cpu": "btune_process_cpu_cores_mean",
    "host_rss": "btune_process_resident_memory_max_bytes",
    "tokens_total": "btune_tokens_total",
    "duration": "btune_run_duration_seconds",
    "load_duration": "btune_load_duration_seconds",
    "requests_finished": "btune_requests_finished",
    "requests_unfinished": "btune_requests_unfinished",
    "requests_failed": "btune_requests_failed",
    "first_step_ms": "btune_first_step_seconds",
    "compile_s": "btune_compile_seconds",
    "energy_integrated": "btune_energy_integrated_joules",
}
#: Factors for registry figures whose unit is not in UNITS' terms (host CPU: 100 is one core).
FACTORS: dict[str, float] = {"host_cpu": 0.01}
#: The statistics of a described metric that become a summary's quantiles.
QUANTILES = {"p50": "0.5", "p90": "0.9", "p95": "0.95", "p99": "0.99"}
#: Serving latency histograms' buckets, seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: The request fields each latency histogram observes (milliseconds in the event).
HISTOGRAMS = {"ttft": "ttft_ms", "tpot": "tpot_ms", "itl": "itl", "e2e": "e2e_ms"}
#: GPU samples under dcgm-exporter's names, in its units: (sample field, name, help, factor).
DCGM = (
    ("power_w", "DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", 1.0),
    ("util_gpu", "DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", 1.0),
    ("mem_used_mb", "DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", 1.0),
    ("sm_clock_mhz", "DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", 1.0),
    ("temp_c", "DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", 1.0),
)
#: The options the info metric carries as labels (the rest stay in the record).
INFO_OPTIONS = ("preset", "model", "batch_size", "seq_len", "precision", "device", "compile", "tp")
_BAD = re.compile(r"[^a-zA-Z0-9_]")


def prom_name(metric: Metric) -> tuple[str, float]:
    """A registry metric's Prometheus name and the factor from its unit to the name's base unit."""
    suffix, factor = UNITS.get(metric.unit, ("", 1.0))
    factor = FACTORS.get(metric.name, factor)
    if metric.name in NAMES:
        return NAMES[metric.name], factor
    stem = re.sub(r"_(ms|s|mb)$", "", metric.name)
    return "btune_" + _BAD.sub("_", stem) + (f"_{suffix}" if suffix else ""), factor


def _finite(v: Any) -> bool:
    return number(v) and math.isfinite(v)


@dataclass
class Family:
    """One metric family before it is a prometheus_client family: samples as (labels, value)."""

    name: str
    kind: str  #: gauge, counter, summary, info
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)
    #: summary only: per label set, the quantiles and (count, sum)
    quantiles: dict[tuple[tuple[str, str], ...], tuple[list[tuple[str, float]], float, float]] = \
        field(default_factory=dict)


class Families:
    """Families by name, in the order first added."""

    def __init__(self) -> None:
        self.by_name: dict[str, Family] = {}

    def get(self, name: str, kind: str, help_: str) -> Family:
        fam = self.by_name.get(name)
        if fam is None:
            fam = self.by_name[name] = Family(name, kind, help_)
        return fam

    def add(self, name: str, kind: str, help_: str, labels: dict[str, str], value: Any, factor: float = 1.0) -> None:
        if _finite(value):
            self.get(name, kind, help_).samples.append((labels, float(value) * factor))


def summary_families(fams: Families, summary: dict[str, Any], workload: Any, labels: dict[str, str],
                     skip: frozenset[str] = frozenset()) -> None:
    """Every registry figure of ``summary`` that applies to ``workload``, under its Prometheus name: a described
    metric as a summary (p50..p99 quantiles, count n, sum mean*n), the others as gauges (the run's energy a
    counter)."""
    for m in REGISTRY:
        if m.name in skip:
            continue
        name, factor = prom_name(m)
        help_ = f"{m.label} (btune metric {m.name})"
        if m.described:
            figs = {f.stat: f.value for f in figures(summary, workload, EXPORTED_STATS, exported=True)
                    if f.metric is m}
            qs = [(q, float(figs[s]) * factor) for s, q in QUANTILES.items() if _finite(figs.get(s))]
            if not qs:
                continue
            n = figs.get("n") if _finite(figs.get("n")) else 0
            mean = figs.get("mean") if _finite(figs.get("mean")) else 0.0
            fam = fams.get(name, "summary", help_)
            fam.quantiles[tuple(sorted(labels.items()))] = (qs, float(n), float(n) * float(mean) * factor)
    for f in figures(summary, workload, exported=True):
        if f.metric.described or f.metric.name in skip:
            continue
        name, factor = prom_name(f.metric)
        kind = "counter" if name.endswith("_total") else "gauge"
        fams.add(name, kind, f"{f.metric.label} (btune metric {f.metric.name})", labels, f.value, factor)


def info_labels(run: str, workload: Any, options: dict[str, Any] | None, status: str | None = None) -> dict[str, str]:
    """The labels of ``btune_run_info``: run, workload, status and a handful of key options."""
    out = {"run": run, "workload": str(workload)}
    if status is not None:
        out["status"] = status
    for k in INFO_OPTIONS:
        v = (options or {}).get(k)
        if isinstance(v, (str, int, float, bool)):
            out[k] = str(v)
    return out


def to_text(fams: Families) -> str:
    """The Prometheus text exposition of ``fams`` (prometheus_client's writer)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Static(fams))
    return generate_latest(registry).decode()


class _Static:
    """A collector of fixed families."""

    def __init__(self, fams: Families) -> None:
        self.fams = fams

    def collect(self) -> Iterator[Any]:
        yield from client_families(self.fams)


def client_families(fams: Families) -> Iterator[Any]:
    """``fams`` as prometheus_client metric families."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
        SummaryMetricFamily,
    )

    for fam in fams.by_name.values():
        if fam.kind == "summary":
            keys = sorted({k for key in fam.quantiles for k, _ in key})
            out = SummaryMetricFamily(fam.name, fam.help, labels=keys)
            for key, (qs, count, total) in fam.quantiles.items():
                d = dict(key)
                # prometheus_client's summary family has no quantile samples: add them as the text format has them
                out.add_metric([d.get(k, "") for k in keys], count_value=count, sum_value=total)
                for q, v in qs:
                    out.add_sample(fam.name, {**d, "quantile": q}, v)
            yield out
            continue
        if fam.kind == "histogram":
            keys = sorted({k for labels, _ in fam.samples for k in labels})
            hist = HistogramMetricFamily(fam.name, fam.help, labels=keys)
            for labels, value in fam.samples:
                buckets, total = value  # type: ignore[misc]
                hist.add_metric([labels.get(k, "") for k in keys], buckets, total)
            yield hist
            continue
        keys = sorted({k for labels, _ in fam.samples for k in labels})
        if fam.kind == "info":
            info = InfoMetricFamily(fam.name.removesuffix("_info"), fam.help)
            for labels, _ in fam.samples:
                info.add_metric([], labels)
            yield info
            continue
        cls = CounterMetricFamily if fam.kind == "counter" else GaugeMetricFamily
        metric = cls(fam.name, fam.help, labels=keys)
        for labels, value in fam.samples:
            metric.add_metric([labels.get(k, "") for k in keys], value)
        yield metric


# -- the export: a run record's figures ---------------------------------------------------------------------------
def record_families(recs: Iterable[dict[str, Any]]) -> Families:
    """The families of runs' records: labels run, workload, status; options on ``btune_run_info``."""
    from tuner.export import phase_totals

    fams = Families()
    for rec in recs:
        workload = (rec.get("config") or {}).get("workload")
        options = (rec.get("config") or {}).get("options") or {}
        labels = {"run": str(rec["id"]), "workload": str(workload), "status": str(rec.get("status"))}
        fams.add("btune_run_info", "info", "A run: its workload, status and key options.",
                 info_labels(labels["run"], workload, options, labels["status"]), 1)
        s = rec.get("summary") or {}
        summary_families(fams, s, workload, labels)
        for gpu, g in (s.get("gpu") or {}).items():
            gl = {**labels, "gpu": str(gpu)}
            power = g.get("power_w") or {}
            fams.add("btune_gpu_power_mean_watts", "gauge", "A GPU's mean power draw over the run.", gl,
                     power.get("mean"))
            fams.add("btune_gpu_power_max_watts", "gauge", "A GPU's highest power sample.", gl, power.get("max"))
            fams.add("btune_gpu_memory_used_max_bytes", "gauge", "A GPU's highest memory use sample.", gl,
                     g.get("mem_used_mb_max"), 2.0 ** 20)
        for phase, p in phase_totals(s.get("phases") or []).items():
            pl = {**labels, "phase": phase}
            fams.add("btune_phase_duration_seconds", "gauge", "Time in a phase.", pl, p.get("duration_s"))
            fams.add("btune_phase_energy_joules", "gauge", "Energy in a phase.", pl, p.get("energy_j"))
            fams.add("btune_phase_power_watts", "gauge", "Mean power in a phase.", pl, p.get("power_w"))
            fams.add("btune_phase_energy_per_token_joules", "gauge", "Energy per token in a phase.", pl,
                     p.get("joules_per_token"))
    return fams


def to_prometheus(recs: Iterable[dict[str, Any]]) -> str:
    """Runs' records as Prometheus text, with the live endpoint's names and units."""
    return to_text(record_families(recs))


# -- live: a console's feeds ----------------------------------------------------------------------------------------
def live_summary(view: FeedView) -> dict[str, Any]:
    """The summary (tuner.summary.summarize, as the record computes it) of the events a feed keeps."""
    from tuner.record import RecordBuilder
    from tuner.summary import summarize

    meta = view.meta or {}
    t0 = view.t_first or 0.0
    builder = RecordBuilder("live", t0, {}, {})
    events: list[dict[str, Any]] = [meta] if meta else []
    events += view.steps
    for samples in view.gpus.values():
        events += samples
    events += view.host
    for gpu, ((t1, mj1), (t2, mj2)) in view.energy.items():  # the counter's first and last readings
        events += [{"v": 1, "type": "energy", "t": t, "rank": 0, "gpu": gpu, "mj": mj}
                   for t, mj in ((t1, mj1), (t2, mj2))]
    events += [dict(r, v=1, type="request", rank=0, t=r.get("finish_s") or t0) for r in view.requests]
    for ev in events:  # a replayed timeline's events carry no schema version
        builder.add(ev if "v" in ev else {**ev, "v": 1})
    options = meta.get("options") if isinstance(meta.get("options"), dict) else {}
    return summarize(builder.series_dict(), builder.events, t0, view.t_last or t0, None, options)


#: Registry figures a window's summary would understate: the feed's own counts and its energy so far (the live
#: power panel's figures, tuner.feed) replace them.
LIVE_SKIP = frozenset({"tokens_total", "duration", "energy", "joules_per_token"})


class LatencyHistograms:
    """Serving latency histograms (seconds) of every finished request a run sent, counted as they come (a
    Prometheus histogram only grows; the feed keeps only the latest requests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = {k: [0] * (len(LATENCY_BUCKETS) + 1) for k in HISTOGRAMS}
        self.sums = dict.fromkeys(HISTOGRAMS, 0.0)

    def __call__(self, ev: dict[str, Any]) -> None:
        if ev.get("type") != "request" or not ev.get("finished"):
            return
        from tuner.serving import failed, itl_ms

        if failed(ev):
            return
        with self._lock:
            for name, key in HISTOGRAMS.items():
                values = itl_ms(ev) if key == "itl" else [ev.get(key)]
                for ms in values:
                    if _finite(ms):
                        self._observe(name, ms / 1000.0)

    def _observe(self, name: str, s: float) -> None:
        counts = self.counts[name]
        i = next((i for i, b in enumerate(LATENCY_BUCKETS) if s <= b), len(LATENCY_BUCKETS))
        counts[i] += 1
        self.sums[name] += s

    def buckets(self, name: str) -> tuple[list[tuple[str, float]], float]:
        """Cumulative buckets (``+Inf`` last) and the sum."""
        with self._lock:
            out, acc = [], 0
            for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.counts[name], strict=True):
                acc += n
                out.append((bound, float(acc)))
            return out, self.sums[name]

    @property
    def observed(self) -> int:
        return sum(self.counts["e2e"])


@dataclass
class Watched:
    """One run a live endpoint serves: its feed, labels and latency histograms."""

    feed: RunFeed
    run: str
    workload: str
    options: dict[str, Any]
    histograms: LatencyHistograms = field(default_factory=LatencyHistograms)


def live_families(watched: Iterable[Watched]) -> Families:
    """The families of the runs watched, from their feeds as of now."""
    fams = Families()
    for w in watched:
        view = w.feed.view()
        labels = {"run": w.run, "workload": w.workload}
        fams.add("btune_run_info", "info", "A run: its workload and key options.",
                 info_labels(w.run, w.workload, w.options), 1)
        fams.add("btune_steps_total", "counter", "Steps the run reported.", labels, view.steps_seen)
        fams.add("btune_tokens_total", "counter", "Tokens the run's steps reported.", labels, view.tokens_total)
        fams.add("btune_events_total", "counter", "Events the run sent.", labels, view.received)
        if view.steps:
            summary_families(fams, live_summary(view), w.workload, labels, LIVE_SKIP)
        fams.add("btune_energy_joules_total", "counter", "Energy of the run's GPUs so far (NVML counter).", labels,
                 energy_so_far(view))
        fams.add("btune_energy_per_token_joules", "gauge", "Energy per token since the first steady step.", labels,
                 joules_per_token(view))
        uuids = {str(k): (cols.get("uuid") or [None])[-1] for k, cols in view.energy_boards.items()}
        for gpu, samples in view.gpus.items():
            last = samples[-1] if samples else {}
            gl = {**labels, "gpu": str(gpu), "UUID": str(last.get("uuid") or uuids.get(str(gpu)) or "")}
            for key, name, help_, factor in DCGM:
                fams.add(name, "gauge", help_, gl, last.get(key), factor)
        for gpu, (_first, (_t, mj)) in view.energy.items():
            gl = {**labels, "gpu": str(gpu), "UUID": str(uuids.get(str(gpu)) or "")}
            fams.add("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "gauge",
                     "Total energy consumption since boot (in mJ).", gl, mj)
        if view.host:
            host = view.host[-1]
            fams.add("btune_process_resident_memory_bytes", "gauge", "The run's process tree memory (RSS).",
                     labels, host.get("proc_rss_mb"), 2.0 ** 20)
            fams.add("btune_process_cpu_cores", "gauge", "The run's process tree CPU use, in cores (1: one core busy).",
                     labels, host.get("proc_cpu_percent"), 0.01)
        if w.histograms.observed:
            for name in HISTOGRAMS:
                fam = fams.get(f"btune_request_{name}_seconds", "histogram",
                               f"Serving {name.upper()} of finished requests.")
                fam.samples.append((labels, w.histograms.buckets(name)))  # type: ignore[arg-type]
    return fams


#: Seconds a scrape may reuse the families computed for an earlier one while the feeds changed (each computation
#: summarizes the feeds' windows: 29 ms with 8 GPUs, 290 ms with 2,000 requests; docs/benchmarks.md).
REUSE_S = 1.0


class LiveCollector:
    """A prometheus_client collector over the runs a console watches, read at scrape time: computed again when a
    feed changed and the last computation is at least ``REUSE_S`` old (all figures of a scrape from one moment)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: list[Watched] = []
        self._cache: tuple[tuple[Any, ...], float, Families] | None = None

    def watch(self, feed: RunFeed, run: str, workload: str, options: dict[str, Any] | None = None,
              keep: int = 1) -> Callable[[dict[str, Any]], None]:
        """Serve ``feed``'s run (the last ``keep`` runs watched stay served); returns the subscriber that
        counts its latency histograms (subscribe it to the run's events next to the feed)."""
        w = Watched(feed, run, workload, dict(options or {}))
        with self._lock:
            self._watched = [*self._watched, w][-max(1, keep):]
        return w.histograms

    def collect(self) -> Iterator[Any]:
        with self._lock:
            watched = list(self._watched)
            cache = self._cache
        key = tuple((id(w), w.feed.version, w.histograms.observed) for w in watched)
        now = time.monotonic()
        if cache is not None and (cache[0] == key or (_runs(cache[0]) == _runs(key) and now - cache[1] < REUSE_S)):
            fams = cache[2]
        else:
            fams = live_families(watched)
            with self._lock:
                self._cache = (key, now, fams)
        yield from client_families(fams)


def _runs(key: tuple[Any, ...]) -> list[Any]:
    """The runs a cache key serves, and whether each has a finished request yet: families computed before a run's
    first request are not reused after it (a short run's events can all come within the reuse window)."""
    return [(k[0], k[2] > 0) for k in key]


class MetricsPortError(Exception):
    """The endpoint could not listen (port in use, bad host)."""


@dataclass
class MetricsServer:
    """A running endpoint: its collector, address and the server to shut down."""

    collector: LiveCollector
    host: str
    port: int
    server: Any = None
    thread: Any = None

    def follow(self, runner: Any, config: Any, feed: RunFeed | None = None) -> RunFeed:
        """Serve ``runner``'s run (a tuner.runner.Runner of ``config``) from now on, the run served before dropped:
        ``feed`` (a new one subscribed to the run when not given) and its latency histograms."""
        if feed is None:
            feed = RunFeed()
            runner.subscribe(feed)
        runner.subscribe(self.collector.watch(feed, runner.run_id, config.workload, config.options))
        return feed

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def serve_metrics(port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Start a live endpoint on ``host:port`` (its own registry, a daemon thread); MetricsPortError when it cannot
    listen. ``btune run``, ``btune-tui`` and any other console watch their feeds with ``.collector.watch``."""
    from prometheus_client import CollectorRegistry, start_http_server

    collector = LiveCollector()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except (OSError, OverflowError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise MetricsPortError(f"--metrics-port {port}: cannot listen on {host}:{port}: {reason}") from None
    return MetricsServer(collector, host, port, server, thread)
