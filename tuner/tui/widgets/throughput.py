"""Throughput panel: last step, tokens/s and step time on time charts, MFU/MBU (live estimates, then the run's)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from rich.text import Text

from tuner import hardware
from tuner.feed import FeedView
from tuner.metrics import Figure
from tuner.report import figure_value, fmt, quantity
from tuner.summary import is_steady, step_bytes
from tuner.tui.widgets.panel import Panel, block_figures, dim, pack, row, run_seconds, series, window_start

WINDOW = 20  # steady steps in the live throughput window


def window_throughput(steps: list[dict[str, Any]], window: int = WINDOW) -> tuple[float | None, int]:
    """Tokens/s over the last ``window`` steady steps (their tokens over their summed time), and how many."""
    steady = [s for s in steps if is_steady(s) and isinstance(s.get("step_ms"), (int, float))][-window:]
    seconds = sum(s["step_ms"] for s in steady) / 1000.0
    tokens = sum(s.get("tokens") or 0 for s in steady)
    return (tokens / seconds if seconds > 0 and tokens else None), len(steady)


def step_rate(step: dict[str, Any]) -> float | None:
    """One step's tokens/s (its tokens over its time)."""
    ms, tokens = step.get("step_ms"), step.get("tokens")
    return tokens / (ms / 1000.0) if isinstance(ms, (int, float)) and ms > 0 and tokens else None


def mfu_text(result: dict[str, Any]) -> str:
    """An MFU result from tuner.hardware.mfu (or a summary) as text."""
    if result.get("value") is not None:
        return f"{result['value'] * 100:.1f}% of {fmt(result.get('peak_tflops'))} TFLOP/s"
    return f"n/a ({result.get('reason') or 'no data'})"


def window_mbu(steps: list[dict[str, Any]], meta: dict[str, Any], window: int = WINDOW) -> dict[str, Any]:
    """MBU over the last ``window`` steady steps (tuner.summary.step_bytes per step, over their time)."""
    steady = [s for s in steps if is_steady(s) and isinstance(s.get("step_ms"), (int, float))][-window:]
    moved = [step_bytes(meta, s) for s in steady]
    seconds = sum(s["step_ms"] for s in steady) / 1000.0
    rate = sum(moved) / seconds if steady and seconds > 0 and None not in moved else None
    return hardware.mbu(rate, meta.get("device_name"), int(meta.get("n_devices") or 1))


def mbu_text(result: dict[str, Any]) -> str:
    """An MBU result (tuner.hardware.mbu) as text."""
    if result.get("value") is not None:
        return f"{result['value'] * 100:.1f}% of {fmt(result.get('peak_tb_s'))} TB/s"
    moved = f"{quantity(result['achieved_tb_s'], 'TB/s')} moved; " if result.get("achieved_tb_s") is not None else ""
    return f"n/a ({moved}{result.get('reason') or 'no data'})"


#: Short labels for the whole-run figures (tuner.metrics names); a figure not named here keeps its label.
RUN_LABELS = {"throughput_tokens_per_s": "", "throughput_per_gpu": "per GPU", "tflops": "",
              "engine_tokens_per_s": "engine busy",
              "mfu_bf16": "MFU bf16", "mfu_fp8": "MFU fp8", "mbu": "MBU", "bandwidth": "moved",
              "loss_last": "final loss"}


NO_STEPS = ("tp-validate",)  # workloads that time no steps: no throughput panel
#: How the statistics of a described step figure are headed (tuner.metrics names).
STAT_LABELS = {"step_ms": "", "engine_step_ms": "", "decode_step_ms": "decode ", "decode_batch": "decode batch "}
RATES = ("throughput_tokens_per_s", "throughput_per_gpu", "tflops", "engine_tokens_per_s")


def short_text(f: Figure) -> str:
    """A figure as ``label value unit`` with the panel's short label."""
    label = RUN_LABELS.get(f.metric.name, f.label)
    return f"{label} {figure_value(f)}".strip()


def run_lines(summary: dict[str, Any], meta: dict[str, Any], width: int) -> list[Text]:
    """The whole run's step figures from the registry: a perplexity run's quality figures, rates, step-time
    statistics, MFU and MBU (with the reason when n/a), then the rest."""
    workload = meta.get("workload")
    figs = block_figures(summary, workload, "engine steps" if workload == "serve" else "steps")
    figs += [f for f in block_figures(summary, workload, "serving") if f.metric.name == "engine_mbu"]
    one_gpu = int(meta.get("n_devices") or 1) == 1
    rates = [f for f in figs if f.metric.name in RATES and not (one_gpu and f.metric.name == "throughput_per_gpu")]
    described = [f for f in figs if f.stat is not None]
    util = ("mfu_bf16", "mfu_fp8", "mbu", "engine_mbu", "throughput_per_gpu", "loss_last")  # said elsewhere
    rest = [f for f in figs if f not in rates and f not in described and f.metric.name not in util]
    lines: list[Text] = pack([short_text(f) for f in block_figures(summary, workload, "quality")], width)
    if rates:
        lines += pack([f"run {short_text(rates[0])}", *map(short_text, rates[1:])], width)
    items: list[str] = []
    for name in dict.fromkeys(f.metric.name for f in described):  # one item per metric: its statistics
        stats = [f for f in described if f.metric.name == name and f.stat != "cv"]
        cv = [f"cv {fmt(f.value)}" for f in described if f.metric.name == name and f.stat == "cv"]
        head = STAT_LABELS.get(name, stats[0].metric.label if stats else name)
        if stats:
            items.append(f"{head}{'/'.join(str(f.stat) for f in stats)} {'/'.join(fmt(f.value) for f in stats)}"
                         f"{' ' + stats[0].unit if stats[0].unit else ''}".strip())
        items += cv
    lines += pack(items, width)
    mfu = summary.get("mfu") if isinstance(summary.get("mfu"), dict) else {}
    mbu = summary.get("mbu") if isinstance(summary.get("mbu"), dict) else {}
    if workload != "serve":
        for precision in ("bf16", "fp8"):
            result = mfu.get(precision)
            if isinstance(result, dict):
                lines.append(row(f"MFU {precision} {mfu_text(result)}"))
    if workload == "serve" or mbu.get("value") is not None or mbu.get("achieved_tb_s") is not None:
        lines.append(row(f"MBU {mbu_text(mbu)}"))
    lines += pack([short_text(f) for f in rest], width)
    return lines


class ThroughputPanel(Panel):
    """Tokens/s and step time on time charts beside the figures: the last step, the steady window's
    throughput, MFU and MBU (live estimates; once the run has ended, the run's figures from the registry)."""

    TITLE = "throughput"
    CHARTS = (("tok", "tok/s", 0.0), ("ms", "ms", 0.0))

    def changes(self, view: FeedView) -> Hashable:
        return view.steps_seen, view.meta is not None

    def show(self, view: FeedView) -> None:
        """Hidden for a workload that times no steps (tp-validate), unless it sends some."""
        if self.show_if(bool(view.steps) or (view.meta or {}).get("workload") not in NO_STEPS):
            super().show(view)

    def render_view(self, view: FeedView, width: int) -> list[Text]:
        steps = view.steps
        meta = view.meta or {}
        workload = meta.get("workload")
        if not steps:
            return [dim("no steps yet" if view.summary is None else "no steps")]
        last = steps[-1]
        head = f"step {last.get('step')}{' warm-up' if last.get('warmup') else ''}"
        name = "NLL" if workload == "perplexity" else "loss"  # a perplexity step's loss: its windows' mean NLL
        loss = [f"{name} {fmt(last['loss'])}"] if isinstance(last.get("loss"), (int, float)) else []
        lines = pack([f"{head} {fmt(last.get('step_ms'))} ms · {fmt(step_rate(last))} tok/s", *loss], width)
        lines[0].stylize("bold", 0, len(head))
        if last.get("warmup"):
            lines[0].stylize("yellow", len(head) - len("warm-up"), len(head))
        if view.summary is not None:
            return lines + run_lines(view.summary, meta, width)
        tok_s, n = window_throughput(steps)
        fpt = meta.get("flops_per_token")
        achieved = fpt * tok_s if isinstance(fpt, (int, float)) and tok_s else None
        n_dev = int(meta.get("n_devices") or 1)
        what = "engine steps" if workload == "serve" else "steady"
        items = [f"last {n} {what} {fmt(tok_s)} tok/s"] + ([quantity(achieved / 1e12, "TFLOP/s")] if achieved else [])
        lines += pack(items, width)
        if workload != "serve":  # serving is bandwidth-bound: MBU is the lens, not MFU
            lines.append(row(f"MFU bf16 {mfu_text(hardware.mfu(achieved, meta.get('device_name'), 'bf16', n_dev))}"))
            if meta.get("precision") == "fp8":
                lines.append(row(f"MFU fp8 {mfu_text(hardware.mfu(achieved, meta.get('device_name'), 'fp8', n_dev))}"))
        if workload == "serve" or isinstance(meta.get("weight_bytes"), (int, float)):
            lines.append(row(f"MBU {mbu_text(window_mbu(steps, meta))}"))
        return lines

    def draw_charts(self, view: FeedView) -> None:
        steps = view.steps
        steady = [s for s in steps if not s.get("warmup")]
        end = run_seconds(view)
        # warm-up steps (compilation, the first step) are drawn but do not set the scale once steady ones exist
        for name, value in (("tok", step_rate), ("ms", lambda s: s.get("step_ms"))):
            warm = series(view, steps, lambda s, v=value: v(s) if s.get("warmup") else None, "yellow")
            hot = series(view, steady, value, "green" if name == "tok" else "cyan")
            scale = hot.ys if len(hot.ys) >= 2 else hot.ys + warm.ys
            y_range = (min(scale), max(scale)) if scale else None
            start = window_start([warm, hot], view.steps_seen > len(steps))
            self.charts[name].set_series([warm, hot], end, y_range=y_range, t_start=start)
