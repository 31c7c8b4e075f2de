"""Shared pieces of the per-GPU panels: latest sample per GPU, the no-GPU message, the host line."""

from __future__ import annotations

from typing import Any

from rich.text import Text

from tuner.feed import FeedView
from tuner.tui.widgets.panel import dim, row


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
