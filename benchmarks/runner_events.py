"""How many events per second the runner decodes and journals, per CPU second of the console.

A child process sends N step events through the real Emitter and socket as fast as it can; the
runner (in this process, telemetry off) decodes, journals, builds the record. Prints a table.
usage: python benchmarks/runner_events.py [N]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from tuner.runner import Runner

CHILD = """
import sys
from tuner.protocol import Emitter
em = Emitter()
for i in range(int(sys.argv[1])):
    em.step(i, 12.5, 4096, loss=2.5, warmup=False, mem_alloc_mb=1024.0)
em.close()
"""


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300_000
    rows = []
    for trial in range(3):
        with tempfile.TemporaryDirectory() as d:
            runner = Runner([sys.executable, "-c", CHILD, str(n)], run_id=f"bench-{trial}", out_dir=Path(d),
                            config={"workload": "bench"}, telemetry=False)
            got = {"n": 0, "first": 0.0, "last": 0.0}

            def count(ev: dict, got: dict = got) -> None:
                if ev["type"] == "step":
                    if got["n"] == 0:
                        got["first"] = time.perf_counter()
                    got["n"] += 1
                    got["last"] = time.perf_counter()

            runner.subscribe(count)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            res = runner.run()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            assert res.status == "ok" and got["n"] == n, (res.status, got["n"])
            stream_s = got["last"] - got["first"]
            rows.append((trial, n, stream_s, n / stream_s, cpu, n / cpu, wall))
    print(f"{'trial':>5} {'events':>8} {'stream s':>9} {'events/s (wall)':>16} {'console CPU s':>14} "
          f"{'events per CPU s':>17} {'total wall s':>13}")
    for r in rows:
        print(f"{r[0]:>5} {r[1]:>8} {r[2]:>9.2f} {r[3]:>16,.0f} {r[4]:>14.2f} {r[5]:>17,.0f} {r[6]:>13.2f}")
    print("console CPU includes building and writing the final record (all events kept as columns).")


if __name__ == "__main__":
    main()
