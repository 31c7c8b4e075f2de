"""Shared pieces of the per-GPU panels: latest sample per GPU, the fold of many GPUs into one line, chart series
per GPU, the no-GPU message, the host line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text

from tuner.feed import FeedView
from tuner.report import fmt
from tuner.tui.widgets.chart import Series
from tuner.tui.widgets.panel import dim, row, series

#: More GPUs than this fold into one summary line per panel (the dashboard's key expands them).
FOLD_ABOVE = 4
#: Line colours of the per-GPU chart series, GPU by GPU.
GPU_STYLES = ("green", "cyan", "yellow", "magenta", "blue", "red", "bright_green", "bright_cyan")


def latest(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The newest sample of a GPU ({} if none)."""
    return samples[-1] if samples else {}


def no_gpu_line(view: FeedView, why: bool = False) -> Text:
    """No GPU data; with ``why``, the NVML note that says why."""
    note = next((n for n in view.notes if "NVML" in n or "GPU" in n), None) if why else None
    return dim(f"no GPU telemetry{': ' + note if note else ''}")


def host_line(view: FeedView) -> Text | None:
    """The host sampler's last CPU figures (host, and the run's process tree), or None."""
    if not view.host:
        return None
    h = view.host[-1]
    cpu, proc, n = h.get("cpu_percent"), h.get("proc_cpu_percent"), h.get("nprocs")
    parts = ["host"]
    if isinstance(cpu, (int, float)):
        parts.append(f"cpu {cpu:.0f}%")
    if isinstance(proc, (int, float)):
        parts.append(f"run {proc:.0f}% of a core")
    if isinstance(n, int) and n:
        parts.append(f"{n} process{'es' if n > 1 else ''}")
    return row("  ".join(parts))


def label(gpu: int, n_gpus: int) -> str:
    """``gpu3`` padded so rows line up for up to 100 GPUs."""
    return f"gpu{gpu:<{2 if n_gpus > 10 else 1}} "


def folded(view: FeedView, expanded: bool) -> bool:
    """Whether the GPUs are shown as one summary line: many of them, and not expanded."""
    return len(view.gpus) > FOLD_ABOVE and not expanded


def spread(values: Sequence[float], unit: str, scale: float = 1.0) -> str:
    """``mean 300.0 · max 310.0 W`` across GPUs (``300.0 W each`` when they are all equal)."""
    xs = [v / scale for v in values]
    if not xs:
        return "-"
    hi, mean = max(xs), sum(xs) / len(xs)
    if min(xs) == hi:
        return f"{fmt(hi)} {unit} each"
    return f"mean {fmt(mean)} · max {fmt(hi)} {unit}"


def gpu_series(view: FeedView, field: str, expanded: bool, scale: float = 1.0) -> list[Series]:
    """Chart lines of one GPU sample field: each GPU's, or folded (many GPUs), the mean and the highest."""
    def value(s: dict[str, Any]) -> float | None:
        v = s.get(field)
        return v / scale if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    if not folded(view, expanded):
        return [series(view, samples, value, GPU_STYLES[i % len(GPU_STYLES)])
                for i, samples in enumerate(view.gpus.values())]
    # samples of all GPUs come in rounds (one per GPU per telemetry period): group the i-th sample of each
    rounds = min(len(samples) for samples in view.gpus.values())
    per_gpu = [samples[-rounds:] for samples in view.gpus.values()] if rounds else []
    mean_rows, max_rows = [], []
    for i in range(rounds):
        vals = [v for v in (value(s[i]) for s in per_gpu) if v is not None]
        t = per_gpu[0][i].get("t")
        if vals:
            mean_rows.append({"t": t, "v": sum(vals) / len(vals)})
            max_rows.append({"t": t, "v": max(vals)})
    return [series(view, mean_rows, lambda r: r["v"], "green"), series(view, max_rows, lambda r: r["v"], "red")]


def gpu_label(view: FeedView, gpu: int) -> Text:
    """``gpu3`` in the colour of its chart line."""
    index = list(view.gpus).index(gpu) if gpu in view.gpus else 0
    return Text(label(gpu, len(view.gpus)), style=GPU_STYLES[index % len(GPU_STYLES)])
