"""SVG screenshots of the app's live screen during real runs on a GPU (issue 17): a compiled 8-layer
llama-3.1-8b training run and a llama-3.1-8b serve run, each taken once the run is measuring.

The app runs headless (Textual's run_test) at the given size, launches the run through its own launch path
(``BtuneApp.launch``), waits for ``--steps-before`` steady steps (or served requests), saves the screen as SVG
and cancels the run (its record is still written).

usage: python benchmarks/screenshots.py OUT_DIR [--size 120x40]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner.launch import build_config  # noqa: E402
from tuner.tui.app import BtuneApp  # noqa: E402

RUNS = {
    "live_dense_llama8b_8layers_compiled": ("dense", ["--preset", "llama-3.1-8b", "--layers", "8", "--batch-size", "2",
                                                      "--seq-len", "2048", "--compile-mode", "default",
                                                      "--duration", "120", "--warmup", "3"]),
    "live_serve_llama8b": ("serve", ["--preset", "llama-3.1-8b", "--duration", "60", "--request-rate", "4"]),
}


async def shoot(name: str, workload: str, args: list[str], out: Path, size: tuple[int, int], runs: Path,
                steady: int, timeout: float) -> str:
    app = BtuneApp(runs, 4.0)
    async with app.run_test(size=size) as pilot:
        app.launch(build_config(workload, args))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await pilot.pause(0.5)
            live = app.live_screen()
            if live is None:
                continue
            view = live.feed.view()
            done = view.progress.phase == "measuring" and (
                sum(1 for s in view.steps if not s.get("warmup") and not s.get("first")) >= steady
                or view.requests_seen >= steady)
            if done or not live.is_live:
                break
        await pilot.pause(1.0)
        path = app.save_screenshot(filename=f"{name}.svg", path=str(out))
        live = app.live_screen()
        phase = live.feed.view().progress.text() if live is not None else "-"
        if live is not None and live.is_live:
            live.action_cancel_run()
            while live.is_live:
                await pilot.pause(0.5)
        return f"{name}: {path} (phase then: {phase})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", default="120x40")
    ap.add_argument("--steady", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=400.0)
    ap.add_argument("--only", nargs="*", default=list(RUNS))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    w, h = (int(x) for x in a.size.split("x"))
    runs = Path(tempfile.mkdtemp(prefix="btune-shots-"))
    for name in a.only:
        workload, args = RUNS[name]
        print(asyncio.run(shoot(name, workload, args, a.out, (w, h), runs, a.steady, a.timeout)), flush=True)


if __name__ == "__main__":
    main()
