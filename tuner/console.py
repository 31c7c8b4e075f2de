"""A run on a terminal, as ``btune run`` and ``btune sweep`` show it: the status line, events as JSON lines,
SIGTERM/SIGHUP as Ctrl+C, and the CLI's run loop (``execute``)."""

from __future__ import annotations

import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from tuner.launch import LaunchError, RunConfig, make_runner
from tuner.progress import Tracker
from tuner.report import fmt, quantity
from tuner.runner import RunResult


class ConsoleStatus:
    """Shows a live run on a terminal: one rewritten status line on a TTY. Otherwise (piped, a log file) plain
    lines, at most one a second: a note says so first, each line says how many steps it stands for, and the
    last step is always written; the record has every step."""

    PLAIN_PERIOD = 1.0  #: seconds between plain lines

    def __init__(self, out: TextIO, tty: bool) -> None:
        self.out, self.tty = out, tty
        self.step: dict[str, Any] | None = None
        self.gpus: dict[int, dict[str, Any]] = {}
        self.notes: list[str] = []  #: notes already written (the closing summary leaves them out)
        self._last_plain = 0.0
        self._unwritten = 0  # steps since the last plain line
        self._lock = threading.Lock()
        self.t0 = time.time()
        self.tracker = Tracker()

    def __call__(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        with self._lock:
            phase = self.tracker.phase
            self.tracker(ev)
            changed = self.tracker.phase != phase
        if changed and not self.tty and self.tracker.phase != "measuring":
            self._write(f"btune: {self.tracker.progress(time.time()).text()}")
        if kind == "step":
            self.step = ev
            if not self.tty:
                if self._last_plain == 0.0:
                    self._write(f"btune: not a terminal: a status line at most every {self.PLAIN_PERIOD:g} s, "
                                "with the steps it stands for; the record has every step")
                self._unwritten += 1
                if time.time() - self._last_plain >= self.PLAIN_PERIOD:
                    self._plain()
        elif kind == "gpu":
            self.gpus[ev.get("gpu", 0)] = ev
        elif kind in ("error", "telemetry_note"):
            message = str(ev.get("message"))
            if kind == "telemetry_note":
                if message in self.notes:
                    return
                self.notes.append(message)
            self._write(f"{'error' if kind == 'error' else 'note'}: {message}")

    def _plain(self) -> None:
        self._last_plain = time.time()
        more = f" ({self._unwritten} steps since the last line)" if self._unwritten > 1 else ""
        self._unwritten = 0
        self._write(self.line() + more)

    def line(self) -> str:
        elapsed = time.time() - self.t0
        parts = [f"{elapsed:6.1f}s", self.tracker.progress(time.time()).text()]
        s = self.step
        if s:
            ms = s.get("step_ms") or 0
            tok_s = s["tokens"] / (ms / 1000) if ms and s.get("tokens") else None
            parts.append(f"step {s.get('step')}{' (warm-up)' if s.get('warmup') else ''}")
            parts.append(quantity(ms, "ms"))
            parts.append(quantity(tok_s, "tok/s"))
            if "loss" in s:
                parts.append(f"loss {fmt(s['loss'])}")
        for idx in sorted(self.gpus)[:8]:
            g = self.gpus[idx]
            parts.append(f"gpu{idx} {fmt(g.get('power_w'))}W {fmt((g.get('mem_used_mb') or 0) / 1024)}G")
        return "  ".join(parts)

    def _write(self, text: str) -> None:
        with self._lock:
            if self.tty:
                self.out.write("\r\x1b[K" + text + "\n")
            else:
                self.out.write(text + "\n")
            self.out.flush()

    def tick(self) -> None:
        if self.tty:
            with self._lock:
                self.out.write("\r\x1b[K" + self.line()[:200])
                self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.out.write("\r\x1b[K")
            self.out.flush()
        elif self._unwritten:  # the last step, whenever it came
            self._plain()


class ConsoleSignals:
    """While active, SIGTERM and SIGHUP (``kill``, ``timeout``, a dropped SSH session) cancel the run as
    Ctrl+C does, so its record is written; the previous handlers come back on exit. Main thread only.

    SIGINT is Python's KeyboardInterrupt, except where the console inherited it ignored (a shell starts a
    background job, ``cmd &``, with SIGINT ignored): then SIGINT is made a KeyboardInterrupt again, so
    ``kill -INT`` cancels the run there too."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self, cancel: Callable[[str], None]) -> None:
        self.cancel = cancel
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.cancel(f"cancelled by {signal.Signals(signum).name}")

    def __enter__(self) -> ConsoleSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class JsonLines:
    """Writes events as JSON lines from its own thread, so a slow or blocked stdout never holds up the
    run's event channel (and so the workload); past ``capacity`` queued events, lines are dropped and
    counted (the run record keeps every event)."""

    def __init__(self, out: TextIO, capacity: int = 65536) -> None:
        self.out = out
        self.dropped = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._write, daemon=True, name="btune-json")
        self._thread.start()

    def __call__(self, ev: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(ev)
        except queue.Full:
            self.dropped += 1

    def _write(self) -> None:
        import orjson

        while (ev := self._queue.get()) is not None:
            try:
                self.out.write(orjson.dumps(ev, default=str).decode() + "\n")
                if self._queue.empty():
                    self.out.flush()
            except (OSError, ValueError):  # stdout gone: keep draining, the record has everything
                self.dropped += 1

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout`` seconds)."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)


def execute(config: RunConfig, out_dir: Path, json_lines: bool = False, telemetry: bool = True,
            out: TextIO | None = None, metrics: Any = None) -> int:
    """Run to the end with a console status; Ctrl+C, SIGTERM and SIGHUP cancel the run (its record is
    still written). ``metrics``: a live endpoint (tuner.prom.MetricsServer) that serves this run while it runs.
    0 when the run ended ok, 1 when it did not, 2 when its record could not be written."""
    out = out or sys.stdout
    runner = make_runner(config, out_dir, telemetry)
    if metrics is not None:
        metrics.follow(runner, config)
    status = ConsoleStatus(out, out.isatty())
    json_out = JsonLines(out) if json_lines else None
    runner.subscribe(json_out or status)
    if not json_lines:
        print(f"btune: {config.command_line}", file=out)
    done = threading.Event()
    holder: dict[str, RunResult] = {}

    def wait_run() -> None:
        holder["r"] = runner.wait()
        done.set()

    with ConsoleSignals(runner.cancel):
        try:
            runner.start()
        except OSError as exc:
            raise LaunchError(f"cannot start the run in {out_dir}: {exc.strerror or exc}") from None
        threading.Thread(target=wait_run, daemon=True, name="btune-wait").start()
        try:
            while not done.wait(0.25):
                if not json_lines:
                    status.tick()
        except KeyboardInterrupt:
            runner.cancel()
            print("\nbtune: cancelling; the record is still written", file=sys.stderr)
            while True:
                try:
                    done.wait()
                    break
                except KeyboardInterrupt:
                    continue
    result = holder["r"]
    if json_out is not None:
        json_out.close()
        if json_out.dropped:
            print(f"btune: {json_out.dropped} event lines not printed (stdout too slow); the record has them",
                  file=sys.stderr)
    if not json_lines:
        status.done()
    if result.write_error:
        print(f"error: {result.write_error}", file=sys.stderr)
        return 2
    if json_lines:  # the last line too is JSON: where the record is
        import orjson

        end = {"type": "record", "id": result.record.get("id"), "status": result.status,
               "path": str(result.record_path)}
        out.write(orjson.dumps(end).decode() + "\n")
        out.flush()
    else:
        from tuner.report import show

        print(show(result.record, printed_notes=frozenset(status.notes)), file=out)
        print(result.record_path, file=out)
    return 0 if result.status == "ok" else 1
