"""Launches a workload as a subprocess, streams its events, samples telemetry, and writes the run record.

The child runs in its own process group with an argv list (never a shell). Events arrive on a unix
socket named in ``BTUNE_EVENTS`` (each torchrun rank connects on its own); stdout and stderr are read
as log lines and the stderr tail is kept. Every event is journalled before subscribers see it, and
the record is written atomically when the run ends, whatever the way it ended.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner.environment import collect as collect_environment
from tuner.protocol import ENV_EVENTS, Decoder, encode, make_event
from tuner.record import RecordBuilder, journal_footer, journal_header
from tuner.runs import Journal, atomic_write, dumps, ensure_writable, journal_path, record_path
from tuner.telemetry import Telemetry

Subscriber = Callable[[dict[str, Any]], None]

OOM_PATTERNS = re.compile(
    rb"CUDA out of memory|OutOfMemoryError|\bMemoryError\b|Cannot allocate memory|std::bad_alloc|"
    rb"CUBLAS_STATUS_ALLOC_FAILED|out of memory",
)
STDERR_TAIL_LINES = 200
STDERR_TAIL_BYTES = 32 * 1024
#: Output lines a second (per stream, burst LOG_BURST) that become log events in the journal and the record;
#: beyond that lines are counted, kept in the tails and still read by --parse (a script printing megabytes
#: a second must not fill the disk or hold up the events channel).
LOG_RATE = 200.0
LOG_BURST = 2000
#: The longest line read as one (a longer one is read in pieces).
MAX_LINE = 64 * 1024
ENV_RUN_DIR, ENV_RUN_ID = "BTUNE_RUN_DIR", "BTUNE_RUN_ID"

LineParser = Callable[[str, float], "dict[str, Any] | None"]


@dataclass
class RunResult:
    """How a run ended, and where its record is."""

    run_id: str
    status: str
    exit_code: int | None
    record_path: Path  #: the record, or the journal kept when the record could not be written
    record: dict[str, Any] = field(repr=False)
    write_error: str | None = None  #: why the record could not be written (one line)


def _oom_kills() -> int | None:
    """The cgroup's oom_kill counter (host OOM killer), or None where it cannot be read."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            with open(path) as fh:
                for line in fh:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


class Runner:
    """One run of one argv. Use ``start()`` then ``wait()``, or ``run()``; ``cancel()`` from any thread."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        run_id: str,
        out_dir: Path,
        config: dict[str, Any],
        environment: dict[str, Any] | None = None,
        timeout: float | None = None,
        grace: float = 5.0,
        sample_hz: float = 10.0,
        telemetry: bool = True,
        nvml: Any = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        line_parser: LineParser | None = None,
    ) -> None:
        if not argv or not all(isinstance(a, str) for a in argv):
            raise TypeError("argv must be a non-empty list of strings")
        self.argv = list(argv)
        self.run_id = run_id
        self.out_dir = ensure_writable(Path(out_dir))
        self.config = config
        self.environment = environment or {}
        self.timeout = timeout if timeout and timeout > 0 else None
        self.grace = grace
        self.sample_hz = sample_hz
        self.telemetry: Telemetry | None = Telemetry(self.post, sample_hz, nvml=nvml) if telemetry else None
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.stderr_tail: deque[bytes] = deque(maxlen=STDERR_TAIL_LINES)
        self.stdout_tail: deque[bytes] = deque(maxlen=STDERR_TAIL_LINES)
        self.line_parser = line_parser
        self.lines = {"stdout": 0, "stderr": 0}  #: output lines read, per stream
        self.lines_not_kept = {"stdout": 0, "stderr": 0}  #: beyond LOG_RATE: counted, not journalled
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._stop_io = threading.Event()
        self._threads: list[threading.Thread] = []
        self._decoders: list[Decoder] = []
        clean_stale_sockdirs()
        self._sockdir = tempfile.mkdtemp(prefix=f"btune-{os.getpid()}-")
        self._sockpath = os.path.join(self._sockdir, "events.sock")
        self._journal: Journal | None = None
        self._builder: RecordBuilder | None = None
        self._cancelled_by_user = False
        self._cancel_reason = "cancelled by the user"
        self._timed_out = False
        self._error_kinds: set[str] = set()
        self._result: RunResult | None = None
        self._wait_lock = threading.Lock()
        self._early: list[tuple[dict[str, Any], bytes | None]] | None = []
        self.write_error: str | None = None

    # -- subscribers -------------------------------------------------------------------------
    def subscribe(self, fn: Subscriber) -> None:
        """Call ``fn(event)`` for every event, after it is journalled (from runner threads)."""
        self._subscribers.append(fn)

    def _dispatch(self, batch: list[tuple[dict[str, Any], bytes | None]]) -> None:
        with self._lock:
            journal, builder = self._journal, self._builder
            if journal is None or builder is None:
                if self._result is None and self._early is not None:  # before start(): kept for the journal
                    self._early.extend(batch)
                return
            kept = []
            for event, raw in batch:
                journal.write_line(raw if raw is not None else encode(event))
                try:
                    checked = builder.add(event)
                except Exception:  # never lose the channel to one event; counted as rejected
                    builder.rejected_events += 1
                    checked = None
                if checked is None:
                    continue
                kept.append(checked)
                if checked["type"] == "error":
                    self._error_kinds.add(str(checked.get("kind")))
            journal.flush()
            subs = self._subscribers
        for event in kept:
            for fn in subs:
                try:
                    fn(event)
                except Exception:  # a subscriber never breaks the run
                    pass

    def post(self, event: dict[str, Any]) -> None:
        """Add a console-side event (telemetry samples, notes)."""
        self._dispatch([(event, None)])

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Open the journal and channel, start telemetry, launch the child."""
        self.started = time.time()
        if self.line_parser is not None and getattr(self.line_parser, "started", 0) is None:
            self.line_parser.started = self.started  # type: ignore[attr-defined]  # --parse: the first step's start
        inventory = self.telemetry.inventory() if self.telemetry is not None else {"note": "telemetry off"}
        self.environment = {**collect_environment(inventory, self.env), **self.environment}
        self._journal = Journal(journal_path(self.out_dir, self.run_id))
        self._builder = RecordBuilder(self.run_id, self.started, self.config, self.environment)
        self._journal.write(journal_header(self.run_id, self.started, self.config, self.environment))
        early, self._early = self._early or [], None
        self._dispatch(early)

        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(self._sockpath)
        server.listen(256)
        server.setblocking(False)
        self._oom_before = _oom_kills()
        if self.telemetry is not None:
            self.telemetry.start()

        env = dict(self.env)
        env[ENV_EVENTS] = self._sockpath
        env[ENV_RUN_DIR] = str(self.out_dir.resolve())
        env[ENV_RUN_ID] = self.run_id
        env.setdefault("PYTHONUNBUFFERED", "1")
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env, cwd=self.cwd, start_new_session=True,
            )
        except OSError as exc:
            server.close()
            if self.telemetry is not None:
                self.telemetry.stop()
            self.post(make_event("error", rank=-1, kind="launch", message=f"cannot launch {self.argv[0]}: {exc}"))
            self._result = self._finish("failed", None, f"cannot launch {self.argv[0]}: {exc.strerror or exc}")
            return
        if self.telemetry is not None:
            self.telemetry.set_root(self.proc.pid)
        self._spawn(self._serve_events, server)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._spawn(self._read_stream, self.proc.stdout, "stdout")
        self._spawn(self._read_stream, self.proc.stderr, "stderr")

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        th = threading.Thread(target=target, args=args, daemon=True, name=f"btune-{target.__name__}")
        th.start()
        self._threads.append(th)

    def cancel(self, reason: str = "cancelled by the user") -> None:
        """Ask the run to stop (SIGINT, then SIGTERM, then SIGKILL of the group after grace periods)."""
        if not self._cancelled_by_user:
            self._cancel_reason = reason
        self._cancelled_by_user = True
        self._cancel.set()

    def run(self) -> RunResult:
        self.start()
        return self.wait()

    def wait(self) -> RunResult:
        """Block until the run ends and its record is written (safe to call from several threads)."""
        with self._wait_lock:
            if self._result is None:
                self._result = self._wait()
            return self._result

    def _wait(self) -> RunResult:
        proc = self.proc
        assert proc is not None, "start() first"
        deadline = self.started + self.timeout if self.timeout else None
        while proc.poll() is None:
            if self._cancel.is_set():
                self._terminate(proc)
                break
            if deadline is not None and time.time() >= deadline:
                self._timed_out = True
                self._terminate(proc)
                break
            self._cancel.wait(0.05)
        rc = proc.wait()
        self._kill_group(proc, signal.SIGKILL)  # leave no strays behind in the group
        self._stop_io.set()
        for th in self._threads:
            th.join(timeout=2.0)
        if self.telemetry is not None:
            self.telemetry.stop()
        status, message = self._classify(rc)
        return self._finish(status, rc, message)

    def _kill_group(self, proc: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            self._kill_group(proc, sig)
            try:
                proc.wait(timeout=self.grace if sig != signal.SIGKILL else None)
                return
            except subprocess.TimeoutExpired:
                continue

    # -- I/O threads -------------------------------------------------------------------------
    def _serve_events(self, server: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(server, selectors.EVENT_READ, None)
        open_conns = 0
        drain_until: float | None = None
        try:
            while True:
                if self._stop_io.is_set():
                    if open_conns == 0:
                        break
                    drain_until = drain_until or time.monotonic() + 1.0
                    if time.monotonic() > drain_until:
                        break
                for key, _ in sel.select(timeout=0.05):
                    if key.data is None:
                        try:
                            conn, _ = server.accept()
                        except (BlockingIOError, OSError):
                            continue
                        conn.setblocking(False)
                        dec = Decoder()
                        self._decoders.append(dec)
                        sel.register(conn, selectors.EVENT_READ, dec)
                        open_conns += 1
                        continue
                    conn, dec = key.fileobj, key.data
                    try:
                        chunk = conn.recv(1 << 18)  # type: ignore[union-attr]
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    if not chunk:
                        dec.close()
                        sel.unregister(conn)
                        conn.close()  # type: ignore[union-attr]
                        open_conns -= 1
                        continue
                    batch = dec.feed(chunk)
                    if batch:
                        self._dispatch(batch)  # type: ignore[arg-type]
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            sel.close()
            try:
                os.unlink(self._sockpath)
                os.rmdir(self._sockdir)
            except OSError:
                pass

    def _read_stream(self, stream: Any, name: str) -> None:
        """Each output line: into the stream's tail, through --parse (stdout), and a log event while the
        stream stays under LOG_RATE lines a second (beyond it: counted, one note)."""
        tail = self.stderr_tail if name == "stderr" else self.stdout_tail
        parser = self.line_parser if name == "stdout" else None
        budget, last, noted = float(LOG_BURST), time.monotonic(), False
        for raw in iter(lambda: stream.readline(MAX_LINE), b""):
            tail.append(raw[:4096])
            self.lines[name] += 1
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if parser is not None:
                try:
                    event = parser(text, time.time())
                except Exception:  # a parser never breaks the run
                    event = None
                if event is not None:
                    self.post(event)
            now = time.monotonic()
            budget = min(float(LOG_BURST), budget + (now - last) * LOG_RATE)
            last = now
            if budget < 1.0:
                self.lines_not_kept[name] += 1
                if not noted:
                    noted = True
                    self.post(make_event("telemetry_note", rank=-1, source="output", message=(
                        f"{name}: more than {LOG_RATE:g} lines a second; lines beyond that are counted, not "
                        f"kept as log events (the record keeps the last {STDERR_TAIL_LINES} lines)")))
                continue
            budget -= 1.0
            self.post(make_event("log", rank=-1, stream=name, message=text, level=name))
        stream.close()

    def output(self) -> dict[str, Any]:
        """The record's ``output`` block: each stream's last lines, lines read, lines not kept as events."""
        def text(tail: deque[bytes]) -> str:
            return b"".join(tail)[-STDERR_TAIL_BYTES:].decode("utf-8", "replace")

        return {"stdout_tail": text(self.stdout_tail), "stderr_tail": text(self.stderr_tail),
                "lines": dict(self.lines), "lines_not_kept": dict(self.lines_not_kept)}

    # -- the end -----------------------------------------------------------------------------
    def _stderr_text(self) -> str:
        data = b"".join(self.stderr_tail)[-STDERR_TAIL_BYTES:]
        return data.decode("utf-8", "replace")

    def _classify(self, rc: int) -> tuple[str, str | None]:
        tail = b"".join(self.stderr_tail)
        if self._cancelled_by_user:
            return "cancelled", self._cancel_reason
        if self._timed_out:
            return "timeout", f"timed out after {self.timeout:g} s"
        if rc == 0:
            return "ok", None
        if "oom" in self._error_kinds or OOM_PATTERNS.search(tail):
            return "oom", "out of memory"
        if rc < 0:
            sig = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
            after = _oom_kills()
            before = self._oom_before
            if -rc == signal.SIGKILL and after is not None and before is not None and after > before:
                return "oom", "killed by the host out-of-memory killer"
            return "killed", f"killed by {sig}"
        last = self._workload_error() or failure_line(self._stderr_text())
        return "failed", f"exit status {rc}" + (f": {last[:300]}" if last else "")

    def _workload_error(self) -> str | None:
        builder = self._builder
        if builder is None:
            return None
        for ev in builder.events:
            if ev["type"] == "error" and ev.get("rank", 0) >= 0:
                return str(ev.get("message")).splitlines()[0] if ev.get("message") else None
        return None

    def _finish(self, status: str, rc: int | None, message: str | None) -> RunResult:
        ended = time.time()
        channel = {
            "events": sum(d.good_lines for d in self._decoders),
            "bad_lines": sum(d.bad_lines for d in self._decoders),
            "connections": len(self._decoders),
        }
        error = None if status == "ok" else {"message": message, "stderr_tail": self._stderr_text()}
        with self._lock:
            assert self._journal is not None and self._builder is not None
            journal = self._journal
            output = self.output()
            journal.write(journal_footer(status, rc, ended, error, channel, output))
            journal_ok = journal.close()
            record = self._builder.finish(status, rc, ended, error, channel, output)
            self._journal = None
        path = record_path(self.out_dir, self.run_id)
        jpath = journal_path(self.out_dir, self.run_id)
        try:
            atomic_write(path, dumps(record))
        except OSError as exc:
            why = journal.error.strerror if journal.error and journal.error.strerror else "a write failed"
            kept = "the journal keeps every event" if journal_ok else f"the journal keeps what was written ({why})"
            self.write_error = (f"cannot write the run record {path} ({exc.strerror or exc}); {kept}; "
                                f"`btune runs recover` rebuilds it when there is room")
            return RunResult(self.run_id, status, rc, jpath, record, self.write_error)
        try:
            jpath.unlink()
        except OSError:
            pass
        return RunResult(self.run_id, status, rc, path, record)


_BANNER = re.compile(r"^[\s=*#~_-]*$")
#: torchrun's failure report, whose lines say where to look, not what went wrong.
_TORCHRUN = re.compile(r"^\s*(\S+ FAILED|Failures:|Root Cause|\[\d+\]:|time\s*:|host\s*:|rank\s*:|exitcode\s*:|"
                       r"error_file\s*:|traceback\s*:|<NO_OTHER_FAILURES>|To enable traceback|.*ChildFailedError)")
_EXCEPTION = re.compile(r"^([\w.]+(Error|Exception|Interrupt)|error)\b[^:]*:\s*\S", re.IGNORECASE)
_RANK_PREFIX = re.compile(r"^\[(default)?rank\d+\]:\s*")


def failure_line(stderr: str) -> str:
    """The one line of a failed run's stderr that says what went wrong: the last exception line, else the
    last line that is neither decoration nor torchrun's failure report."""
    lines = [_RANK_PREFIX.sub("", ln.strip()) for ln in stderr.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not _BANNER.match(ln) and not _TORCHRUN.match(ln)
              and not ln.startswith(("Traceback (most recent call last)", "File \"", "warnings.warn"))]
    for ln in reversed(useful):
        if _EXCEPTION.match(ln):
            return ln
    return useful[-1] if useful else ""


def clean_stale_sockdirs(root: str | None = None) -> int:
    """Remove event-socket folders (``btune-PID-*`` in the temp dir) whose console process is gone."""
    root = root or tempfile.gettempdir()
    removed = 0
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    for name in names:
        m = re.fullmatch(r"btune-(\d+)-[\w]+", name)
        if not m or _alive(int(m.group(1))):
            continue
        path = os.path.join(root, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            for entry in os.listdir(path):
                os.unlink(os.path.join(path, entry))
            os.rmdir(path)
            removed += 1
        except OSError:
            continue
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
