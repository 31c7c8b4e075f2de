"""What one call of the reporting API costs a user's script (issue 18, item 2: under 5 µs a call).

In this process: ``btune.step()`` outside btune (``BTUNE_EVENTS`` unset: a no-op), then under a fake console
(``BTUNE_EVENTS`` names a unix socket this benchmark listens on, another process reading and discarding what
arrives, as the console's runner does). Each row is the best of ``--repeats`` runs of ``--calls`` calls, in ns per call;
a bare Python function call is the baseline.

usage: python benchmarks/api_overhead.py [--calls 200000] [--repeats 5]
Prints a table; timings are not asserted anywhere (tests/test_api.py checks what the calls send).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import btune  # noqa: E402
from btune import api  # noqa: E402


def ns_per_call(fn: Callable[[], Any], calls: int, repeats: int) -> float:
    """The best of ``repeats`` runs of ``calls`` calls of ``fn``, in ns per call."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / calls)
    return best


_READER = """import socket, sys
server = socket.socket(fileno=int(sys.argv[1]))
conn, _ = server.accept()
n = 0
while chunk := conn.recv(1 << 20):
    n += len(chunk)
print(n)
"""


class Sink:
    """A console's events socket read (and discarded) by another process, as the console's runner reads it:
    a reader in this process would take the GIL from the calls being timed."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="btune-bench-")
        self.path = os.path.join(self.dir, "events.sock")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(4)
        self.bytes = 0
        fd = self.server.fileno()
        self._proc = subprocess.Popen([sys.executable, "-c", _READER, str(fd)], pass_fds=(fd,),
                                      stdout=subprocess.PIPE, text=True)

    def close(self) -> None:
        out, _ = self._proc.communicate(timeout=60)
        self.bytes = int(out.strip() or 0)
        self.server.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


def nothing(tokens: Any = None, loss: Any = None, **metrics: Any) -> None:
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    for name in ("BTUNE_EVENTS", "BTUNE_LOG", "RANK", "WORLD_SIZE"):
        os.environ.pop(name, None)

    cases: list[tuple[str, str, Callable[[], Any]]] = [
        ("baseline", "a Python function call", lambda: nothing(tokens=4096, loss=2.5)),
    ]
    rows: list[tuple[str, str, float]] = []
    for where, what, fn in cases:
        rows.append((where, what, ns_per_call(fn, args.calls, args.repeats)))

    api._reset()  # outside btune
    assert not btune.enabled()
    for what, fn in (("step()", lambda: btune.step()),
                     ("step(tokens, loss)", lambda: btune.step(tokens=4096, loss=2.5)),
                     ("step(tokens, loss, lr, grad_norm)", lambda: btune.step(tokens=4096, loss=2.5, lr=3e-4,
                                                                               grad_norm=0.9))):
        rows.append(("outside btune", what, ns_per_call(fn, args.calls, args.repeats)))

    sink = Sink()
    os.environ["BTUNE_EVENTS"] = sink.path
    api._reset()
    assert btune.enabled()
    btune.meta(model="bench")  # opens the channel (import of the Emitter, connect): not in the timings
    for what, fn in (("step()", lambda: btune.step()),
                     ("step(tokens, loss)", lambda: btune.step(tokens=4096, loss=2.5)),
                     ("step(tokens, loss, lr, grad_norm)", lambda: btune.step(tokens=4096, loss=2.5, lr=3e-4,
                                                                               grad_norm=0.9))):
        rows.append(("under btune", what, ns_per_call(fn, args.calls, args.repeats)))
    dropped = api._emitter.dropped
    del os.environ["BTUNE_EVENTS"]
    api._reset()  # closes the channel: the sink's reader ends
    sink.close()

    print(f"btune reporting API: ns per call, best of {args.repeats} x {args.calls} calls "
          f"(python {sys.version.split()[0]})")
    print(f"{'where':<15} {'call':<36} {'ns/call':>9}")
    for where, what, ns in rows:
        print(f"{where:<15} {what:<36} {ns:>9.0f}")
    print(f"under btune: {sink.bytes / 1e6:.1f} MB read by the fake console, {dropped} events dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
