"""Throughput panel: last step, tokens/s and step-time history, MFU (live estimate, then the summary's)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from rich.text import Text

from tuner import hardware
from tuner.feed import FeedView
from tuner.report import fmt
from tuner.summary import is_steady, step_bytes
from tuner.tui.widgets.charts import spark
from tuner.tui.widgets.panel import Panel, block_figures, dim, figure_rows, row

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
    moved = f"{fmt(result['achieved_tb_s'])} TB/s moved; " if result.get("achieved_tb_s") is not None else ""
    return f"n/a ({moved}{result.get('reason') or 'no data'})"


class ThroughputPanel(Panel):
    """Tokens/s and step time as sparklines, with MFU when the meta event gives FLOPs per token."""

    TITLE = "throughput"

    def changes(self, view: FeedView) -> Hashable:
        return view.steps_seen, view.meta is not None

    def render_view(self, view: FeedView, width: int) -> list[Text]:
        steps = view.steps
        if not steps:
            return [dim("no steps yet")]
        last = steps[-1]
        tag = Text(" warm-up", style="yellow") if last.get("warmup") else Text("")
        loss = f"  loss {fmt(last['loss'])}" if isinstance(last.get("loss"), (int, float)) else ""
        lines: list[Text] = [
            row(f"step {last.get('step')}", tag, f"  {fmt(last.get('step_ms'))} ms  {fmt(step_rate(last))} tok/s{loss}")
        ]
        tok_s, n = window_throughput(steps)
        meta = view.meta or {}
        fpt = meta.get("flops_per_token")
        achieved = fpt * tok_s if isinstance(fpt, (int, float)) and tok_s else None
        n_dev = int(meta.get("n_devices") or 1)
        mfu = hardware.mfu(achieved, meta.get("device_name"), "bf16", n_dev)
        fp8 = ""
        if meta.get("precision") == "fp8":
            fp8 = f"  MFU fp8 {mfu_text(hardware.mfu(achieved, meta.get('device_name'), 'fp8', n_dev))}"
        tflops = f"{fmt(achieved / 1e12)} TFLOP/s  " if achieved else ""
        if meta.get("workload") == "serve":  # bandwidth-bound: MBU is the lens, not MFU
            lines.append(row(f"last {n} engine steps: {fmt(tok_s)} tok/s  MBU {mbu_text(window_mbu(steps, meta))}"))
        else:
            lines.append(row(f"last {n} steady: {fmt(tok_s)} tok/s  {tflops}MFU bf16 {mfu_text(mfu)}{fp8}"))
            if isinstance(meta.get("weight_bytes"), (int, float)):
                lines.append(row(f"last {n} steady: MBU {mbu_text(window_mbu(steps, meta))}"))
        chart = max(1, width - 9)
        lines.append(row(Text("tok/s   ", style="bold"), Text(spark([step_rate(s) for s in steps], chart), "green")))
        lines.append(row(Text("step ms ", style="bold"), Text(spark([s.get("step_ms") for s in steps], chart), "cyan")))
        if view.summary is not None:
            workload = meta.get("workload")
            final = block_figures(view.summary, workload, "engine steps" if workload == "serve" else "steps")
            lines.append(Text("whole run", style="bold"))
            lines += figure_rows(final, width)
        return lines
