"""btune-tui under load, on CPU: does the app keep up with 5,000 events/s and 8 GPUs of telemetry?

A synthetic workload (``python -c``, events through tuner.protocol.Emitter on the runner's socket, so the
real path is measured: socket, decoder, journal, record builder, subscribers) sends ``--rate`` events/s for
``--seconds``: mostly serving ``request`` events, plus ``step`` (100/s), ``log`` (20/s) and MoE ``experts``
(2/s, 8 layers × 64 experts). SYNTHETIC GPU telemetry: a thread posts fake ``gpu`` events for ``--gpus``
GPUs at 10 Hz each (and a fake ``energy`` event per GPU per second) into the same runner; they carry
``synthetic: true``. The app runs headless (App.run_test) on the live screen at ``--refresh`` Hz.

Reported: backlog (events the workload sent vs events the app received, and the age of the newest one),
this process's CPU% (psutil; one core = 100%; the app, the runner threads and the fake GPU thread are all
in this process, the workload is not), and key-press latency (pilot.press to the handler running).
``--no-app`` runs the same load through the Runner without the app, to separate the runner's own cost.

    python benchmarks/tui_load.py                 # 30 s, 5,000 events/s, 8 synthetic GPUs
    python benchmarks/tui_load.py --no-app        # the runner alone, same load
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuner.protocol import make_event  # noqa: E402
from tuner.runner import Runner  # noqa: E402
from tuner.stats import describe  # noqa: E402

EMITTER = r"""
import os, random, struct, sys, time
from tuner.protocol import Emitter
progress, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
fd = os.open(progress, os.O_WRONLY)
em = Emitter()
rng = random.Random(0)
em.meta(workload="synthetic-load", device="cpu", device_name="cpu", n_devices=1, flops_per_token=1.0e9)
t0 = time.monotonic()
sent = step = 0
while True:
    now = time.monotonic() - t0
    if now >= seconds:
        break
    due = int(now * rate)
    os.pwrite(fd, struct.pack("<q", due), 0)  # counted as sent before sending: a backlog read is never low
    while sent < due:
        k = sent % 50
        if k == 0:
            em.step(step, 20.0 + rng.random(), 4096, warmup=step < 3, loss=2.0, seq=sent)
            step += 1
        elif k == 1 and sent % 2500 == 1:
            layers = [[rng.randint(50, 150) for _ in range(64)] for _ in range(8)]
            em.emit("experts", layers=layers, gini=[0.2] * 8, max_vio=[0.5] * 8, entropy=[0.9] * 8, seq=sent)
        elif k == 2 and sent % 250 == 2:
            em.emit("log", message=f"synthetic log line {sent}", level="info", seq=sent)
        else:
            ttft = 20 + rng.random() * 30
            em.emit("request", ttft_ms=ttft, tpot_ms=5 + rng.random(), e2e_ms=ttft + 300, output_tokens=64, seq=sent)
        sent += 1
    time.sleep(0.002)
os.pwrite(fd, struct.pack("<q", sent), 0)
em.close()
"""


class Counter:
    """Counts the workload's paced events (those with ``seq``) the runner delivered, and the newest one's time."""

    def __init__(self) -> None:
        self.n = 0
        self.last_t = 0.0

    def __call__(self, ev: dict[str, Any]) -> None:
        if "seq" in ev:
            self.n += 1
            self.last_t = ev.get("t", 0.0)


def fake_gpus(runner: Runner, n_gpus: int, stop: threading.Event, hz: float = 10.0) -> None:
    """SYNTHETIC: fake NVML samples for ``n_gpus`` GPUs at ``hz``, and an energy reading each second."""
    t0 = time.monotonic()
    tick = 0
    mj = [0.0] * n_gpus
    while not stop.wait(max(0.0, t0 + tick / hz - time.monotonic())):
        for g in range(n_gpus):
            runner.post(make_event("gpu", rank=-1, gpu=g, power_w=300.0 + 50 * ((tick + g) % 7), mem_used_mb=40000.0,
                                   mem_total_mb=81559.0, util_gpu=90 + tick % 10, util_mem=40, sm_clock_mhz=1980,
                                   temp_c=60 + g, throttle=0, proc_mem_mb=39000.0, synthetic=True))
            if tick % int(hz) == 0:
                mj[g] += 350_000.0
                runner.post(make_event("energy", rank=-1, gpu=g, mj=mj[g], synthetic=True))
        tick += 1


def read_sent(path: str) -> int:
    with open(path, "rb") as fh:
        data = fh.read(8)
    return struct.unpack("<q", data)[0] if len(data) == 8 else 0


def make_runner(args: argparse.Namespace, out: Path, progress: str) -> Runner:
    argv = [sys.executable, "-c", EMITTER, progress, str(args.rate), str(args.seconds)]
    return Runner(argv, run_id=f"tui-load-{os.getpid()}", out_dir=out, cwd=str(ROOT), sample_hz=10.0,
                  config={"workload": "synthetic-load", "options": {}, "argv": argv, "defaults": {}},
                  env={**os.environ, "PYTHONPATH": str(ROOT)})


class Sampler(threading.Thread):
    """A thread sampling once a second: sent, received, backlog, age of the newest event, this process's CPU%.

    ``received`` is read before ``sent`` (which the workload bumps just before sending each burst of about
    10 events), so a backlog read here is never below the real one, and at most a burst above it.
    """

    def __init__(self, counter: Counter, progress: str) -> None:
        super().__init__(daemon=True, name="bench-sampler")
        self.counter, self.progress = counter, progress
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)
        self.rows: list[tuple[float, int, int, float, float]] = []
        self.t0 = time.monotonic()
        self.done = threading.Event()

    def sample(self) -> None:
        got, last_t = self.counter.n, self.counter.last_t
        sent = read_sent(self.progress)
        age = (time.time() - last_t) * 1000 if last_t else float("nan")
        self.rows.append((time.monotonic() - self.t0, sent, got, age, self.proc.cpu_percent(None)))

    def run(self) -> None:
        tick = 1
        while not self.done.wait(max(0.0, self.t0 + tick - time.monotonic())):
            self.sample()
            tick += 1

    def finish(self) -> list[tuple[float, int, int, float, float]]:
        self.done.set()
        self.join()
        self.sample()
        return self.rows


async def with_app(args: argparse.Namespace, runner: Runner, counter: Counter, progress: str) -> dict[str, Any]:
    from tuner.launch import RunConfig
    from tuner.machine import MachineInfo
    from tuner.tui.app import BtuneApp
    from tuner.tui.screens.live import LiveScreen
    from workloads.options import Machine

    pressed: list[float] = []

    class TimedLive(LiveScreen):
        def action_pause(self) -> None:
            pressed.append(time.perf_counter())
            super().action_pause()

    config = RunConfig("synthetic-load", {}, tuple(runner.argv))
    app = BtuneApp(runner.out_dir, args.refresh, machine=MachineInfo(Machine(reason="benchmark")))
    w, h = (int(x) for x in args.size.split("x"))
    latencies: list[float] = []
    async with app.run_test(size=(w, h)) as pilot:
        live = TimedLive(config, runner.out_dir, args.refresh, runner=runner)
        await app.push_screen(live)
        sampler = Sampler(counter, progress)
        sampler.start()
        next_press = time.monotonic() + 1.0
        while live.is_live:
            now = time.monotonic()
            if now >= next_press and live.status == "running":
                before = len(pressed)
                t0 = time.perf_counter()
                await pilot.press("p")
                if len(pressed) > before:
                    latencies.append((pressed[-1] - t0) * 1000)
                next_press = now + 1.5
            await asyncio.sleep(0.05)
        rows = sampler.finish()
        result = live.result
        if live.paused:
            await pilot.press("p")
    return {"rows": rows, "latency_ms": latencies, "result": result, "feed_received": live.feed.received}


def without_app(runner: Runner, counter: Counter, progress: str) -> dict[str, Any]:
    sampler = Sampler(counter, progress)
    sampler.start()
    result = runner.wait()
    return {"rows": sampler.finish(), "latency_ms": [], "result": result, "feed_received": None}


def report(args: argparse.Namespace, out: dict[str, Any]) -> None:
    rows = out["rows"]
    print(f"btune-tui load: {args.rate:,.0f} events/s for {args.seconds:g} s, {args.gpus} SYNTHETIC GPUs "
          f"(fake gpu events at 10 Hz each), refresh {args.refresh:g} Hz, "
          f"{'app headless ' + args.size if not args.no_app else 'runner only (no app)'}; "
          f"{psutil.cpu_count()} CPUs, python {sys.version.split()[0]}")
    print(f"{'t (s)':>6} {'sent':>9} {'received':>9} {'backlog':>8} {'newest age ms':>14} {'CPU % (1 core)':>15}")
    for t, sent, got, age, cpu in rows:
        print(f"{t:6.1f} {sent:9,} {got:9,} {sent - got:8,} {age:14.0f} {cpu:15.1f}")
    sending = [r for r in rows if 2.0 <= r[0] <= args.seconds] or rows  # the first second is start-up
    cpu = describe(r[4] for r in sending)
    backlog = [r[1] - r[2] for r in sending]
    print(f"CPU % of one core while sending: mean {cpu['mean']:.1f}, p90 {cpu['p90']:.1f}, max {cpu['max']:.1f}")
    print(f"backlog while sending: max {max(backlog):,} events, last {backlog[-1]:,}; after the run: "
          f"{rows[-1][1] - rows[-1][2]:,} (sent {rows[-1][1]:,}, received {rows[-1][2]:,})")
    if out["latency_ms"]:
        lat = describe(out["latency_ms"])
        print(f"key press to handler (ms, n={lat['n']}): p50 {lat['p50']:.1f}, p90 {lat['p90']:.1f}, "
              f"max {lat['max']:.1f}")
    result = out["result"]
    print(f"run status {result.status}; record {result.record_path} ({result.record_path.stat().st_size / 1e6:.1f} MB)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=5000.0, help="workload events per second (default 5000)")
    p.add_argument("--seconds", type=float, default=30.0, help="how long the workload sends (default 30)")
    p.add_argument("--gpus", type=int, default=8, help="synthetic GPUs (default 8)")
    p.add_argument("--refresh", type=float, default=4.0, help="app redraws per second (default 4)")
    p.add_argument("--size", default="100x30", help="terminal size WxH (default 100x30)")
    p.add_argument("--no-app", action="store_true", help="measure the runner alone")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="btune-tui-load-") as tmp:
        progress = os.path.join(tmp, "sent")
        Path(progress).write_bytes(b"\0" * 8)
        runner = make_runner(args, Path(tmp), progress)
        counter = Counter()
        runner.subscribe(counter)
        stop = threading.Event()
        gpus = threading.Thread(target=fake_gpus, args=(runner, args.gpus, stop), daemon=True)
        gpus.start()
        try:
            if args.no_app:
                runner.start()
                out = without_app(runner, counter, progress)
            else:
                out = asyncio.run(with_app(args, runner, counter, progress))
        finally:
            stop.set()
        report(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
