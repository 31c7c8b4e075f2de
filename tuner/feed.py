"""RunFeed: thread-safe ring buffers of one run's events, and the FeedView panels render from.

The runner calls the feed from its threads with every event; the feed only files the event into
bounded buffers under a lock (no rendering, no messages). The UI takes a ``view()`` copy at its
refresh rate, so the cost of drawing does not depend on the event rate.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from tuner import balance
from tuner.progress import Progress, Tracker
from tuner.summary import energy_gpus, is_steady

Event = dict[str, Any]
#: The request fields the serving block reads (tuner.results.serving): a rate sweep's or search's load (``segment``,
#: its offered ``rate``, ``search``) too, so the curve grows live, and an endpoint request's ``status`` and
#: ``error``, so failures count live as they do in the record.
REQUEST_FIELDS = ("rid", "arrival_s", "finish_s", "finished", "prompt_len", "output_tokens", "token_s", "ttft_ms",
                  "tpot_ms", "e2e_ms", "segment", "rate", "search", "status", "error")


@dataclass
class FeedView:
    """A consistent copy of a feed's buffers at one moment (what panels draw)."""

    version: int = 0
    received: int = 0
    t_first: float | None = None
    t_last: float | None = None
    meta: Event | None = None
    steps: list[Event] = field(default_factory=list)
    steps_seen: int = 0
    tokens_total: int = 0
    gpus: dict[int, list[Event]] = field(default_factory=dict)
    gpu_seen: int = 0
    energy: dict[int, tuple[tuple[float, float], tuple[float, float]]] = field(default_factory=dict)
    energy_boards: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    steady_energy: dict[int, tuple[tuple[float, float], tuple[float, float]]] = field(default_factory=dict)
    steady_tokens: float = 0.0
    metas: list[Event] = field(default_factory=list)
    host: list[Event] = field(default_factory=list)
    host_seen: int = 0
    experts: Event | None = None
    experts_figures: dict[str, Any] | None = None
    experts_history: list[tuple[float | None, float | None, float | None]] = field(default_factory=list)
    experts_seen: int = 0
    requests: list[Event] = field(default_factory=list)
    requests_seen: int = 0
    logs: list[tuple[int, str, str]] = field(default_factory=list)
    log_seq: int = 0
    notes: list[str] = field(default_factory=list)
    errors: list[Event] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    progress: Progress = field(default_factory=lambda: Progress("starting"))


def figures_of(ev: Event) -> dict[str, Any] | None:
    """The balance figures of one ``experts`` window (tuner.balance, per layer and their mean and max); None
    when its counts are unusable."""
    counts = ev.get("counts")
    if not isinstance(counts, list) or not counts or not all(isinstance(c, list) and c for c in counts):
        return None
    dropped = ev.get("dropped") if isinstance(ev.get("dropped"), list) and len(ev["dropped"]) == len(counts) else None
    extra = {k: ev[k] for k in ("router_entropy",) if isinstance(ev.get(k), list) and len(ev[k]) == len(counts)}
    try:
        return balance.window_figures(counts, dropped, extra)
    except (TypeError, ValueError):
        return None


def run_gpus(view: FeedView) -> tuple[list[int] | None, str | None]:
    """The GPUs whose energy is the run's (tuner.summary.energy_gpus on the readings so far), and a note."""
    keys, note = energy_gpus(view.energy_boards, view.metas)
    return (None if keys is None else [int(k) for k in keys]), note


def energy_so_far(view: FeedView, readings: dict[int, Any] | None = None) -> float | None:
    """Joules from the NVML energy counter of the run's GPUs: last minus first reading, summed."""
    readings = view.energy if readings is None else readings
    gpus, _ = run_gpus(view)
    if not readings or gpus is None:
        return None
    joules = [(last[1] - first[1]) / 1000.0 for gpu, (first, last) in readings.items() if gpu in gpus]
    return sum(joules) if joules else None


def joules_per_token(view: FeedView) -> float | None:
    """Energy since the first steady step over the steady tokens since: never a warm-up figure."""
    joules = energy_so_far(view, view.steady_energy)
    return joules / view.steady_tokens if joules and view.steady_tokens else None


class RunFeed:
    """Bounded buffers of one run, filled from any thread by calling the feed with an event."""

    def __init__(self, history: int = 240, gpu_history: int = 120, requests: int = 2000, logs: int = 300) -> None:
        self._lock = threading.Lock()
        self._history = history
        self.version = 0
        self.received = 0
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.meta: Event | None = None
        self._steps: OrderedDict[Any, Event] = OrderedDict()
        self.steps_seen = 0
        self.tokens_total = 0
        self._gpu_history = gpu_history
        self._gpus: dict[int, deque[Event]] = {}
        self.gpu_seen = 0
        self.host_seen = 0
        self._energy_first: dict[int, tuple[float, float]] = {}
        self._energy_last: dict[int, tuple[float, float]] = {}
        self._boards: dict[str, dict[str, list[Any]]] = {}
        self._steady_base: dict[int, tuple[float, float]] | None = None  # readings when steady steps began
        self._steady_tokens = 0.0
        self._metas: list[Event] = []
        self._host: deque[Event] = deque(maxlen=gpu_history)
        self._experts: Event | None = None
        self._experts_figs: dict[str, Any] | None = None
        self._experts_hist: deque[tuple[float | None, float | None, float | None]] = deque(maxlen=history)
        self.experts_seen = 0
        self._requests: deque[Event] = deque(maxlen=requests)
        self.requests_seen = 0
        self._logs: deque[tuple[int, str, str]] = deque(maxlen=logs)
        self._log_seq = 0
        self._notes: list[str] = []
        self._errors: list[Event] = []
        self.summary: dict[str, Any] | None = None
        self._tracker = Tracker()

    # -- filing (runner threads) ---------------------------------------------------------------
    def __call__(self, ev: Event) -> None:
        """File one event; cheap and thread-safe."""
        kind = ev.get("type")
        with self._lock:
            self.version += 1
            self.received += 1
            t = ev.get("t")
            if isinstance(t, (int, float)):
                if self.t_first is None:
                    self.t_first = t
                if self.t_last is None or t > self.t_last:
                    self.t_last = t
            self._tracker(ev)
            handler = _HANDLERS.get(kind)  # type: ignore[arg-type]
            if handler is not None:
                handler(self, ev)

    def _step(self, ev: Event) -> None:
        idx = ev.get("step")
        row = self._steps.get(idx)
        ms = ev.get("step_ms")
        if row is None:
            self.steps_seen += 1
            tokens = ev.get("tokens")
            if isinstance(tokens, int):
                self.tokens_total += tokens
            if is_steady(ev):  # joules per token: from the counter readings at the first steady step on
                if self._steady_base is None:
                    self._steady_base = dict(self._energy_last)
                elif isinstance(tokens, int):
                    self._steady_tokens += tokens
            self._steps[idx] = dict(ev)
            if len(self._steps) > self._history:
                self._steps.popitem(last=False)
        elif isinstance(ms, (int, float)) and ms > (row.get("step_ms") or 0):
            row["step_ms"] = ms  # another rank of the same step: the slowest rank's time counts

    def _gpu(self, ev: Event) -> None:
        idx = ev.get("gpu")
        if not isinstance(idx, int):
            return
        buf = self._gpus.get(idx)
        if buf is None:
            buf = self._gpus[idx] = deque(maxlen=self._gpu_history)
        buf.append(ev)
        self.gpu_seen += 1

    def _energy(self, ev: Event) -> None:
        idx, mj, t = ev.get("gpu"), ev.get("mj"), ev.get("t")
        if isinstance(idx, int) and isinstance(mj, (int, float)) and isinstance(t, (int, float)):
            self._energy_first.setdefault(idx, (t, float(mj)))
            self._energy_last[idx] = (t, float(mj))
            board = self._boards.setdefault(str(idx), {"uuid": [], "mig": []})
            if "uuid" in ev:
                board["uuid"].append(ev.get("uuid"))
                board["mig"].append(ev.get("mig"))

    def _host_ev(self, ev: Event) -> None:
        self._host.append(ev)
        self.host_seen += 1

    def _experts_ev(self, ev: Event) -> None:
        self.experts_seen += 1
        self._experts = ev
        figs = self._experts_figs = figures_of(ev)
        mean = (figs or {}).get("mean") or {}
        self._experts_hist.append((mean.get("gini"), mean.get("max_vio"), mean.get("entropy")))

    def _request(self, ev: Event) -> None:
        self.requests_seen += 1
        self._requests.append({k: ev[k] for k in REQUEST_FIELDS if k in ev})

    def _log(self, ev: Event) -> None:
        self._add_log(str(ev.get("stream") or ev.get("level") or "log"), str(ev.get("message", "")))

    def _add_log(self, kind: str, text: str) -> None:
        self._log_seq += 1
        self._logs.append((self._log_seq, kind, text))

    def _meta(self, ev: Event) -> None:
        self._metas.append({"type": "meta", "rank": ev.get("rank"), "device_uuid": ev.get("device_uuid")})
        if self.meta is None or ev.get("rank", 0) < self.meta.get("rank", 0):
            self.meta = ev

    def _error(self, ev: Event) -> None:
        self._errors.append(ev)
        self._add_log("error", f"{ev.get('kind', 'error')}: {ev.get('message', '')}")

    def _note(self, ev: Event) -> None:
        message = str(ev.get("message", ""))
        self._notes.append(message)
        self._add_log("note", message)

    # -- reading (UI thread) -------------------------------------------------------------------
    def finish(self, summary: dict[str, Any]) -> None:
        """Attach the run's final summary (computed by the core from the raw record)."""
        with self._lock:
            self.summary = summary
            self.version += 1

    def add_line(self, kind: str, text: str) -> None:
        """Add a console line to the log tail (``kind``: error, note, stdout, stderr)."""
        with self._lock:
            self.version += 1
            self._add_log(kind, text)

    def progress(self) -> Progress:
        """Where the run is (tuner.progress), as of its latest event; cheap, for a status line."""
        with self._lock:
            return Progress("done") if self.summary is not None else self._tracker.progress(self.t_last)

    def view(self) -> FeedView:
        """A copy of everything panels need, taken under the lock."""
        with self._lock:
            return FeedView(
                version=self.version,
                received=self.received,
                t_first=self.t_first,
                t_last=self.t_last,
                meta=self.meta,
                steps=list(self._steps.values()),
                steps_seen=self.steps_seen,
                tokens_total=self.tokens_total,
                gpus={k: list(v) for k, v in sorted(self._gpus.items())},
                gpu_seen=self.gpu_seen,
                energy={k: (self._energy_first[k], v) for k, v in self._energy_last.items()},
                energy_boards={k: {c: list(v) for c, v in cols.items()} for k, cols in self._boards.items()},
                steady_energy={k: (self._steady_base[k], v) for k, v in self._energy_last.items()
                               if self._steady_base is not None and k in self._steady_base},
                steady_tokens=self._steady_tokens,
                metas=list(self._metas),
                host=list(self._host),
                host_seen=self.host_seen,
                experts=self._experts,
                experts_figures=self._experts_figs,
                experts_history=list(self._experts_hist),
                experts_seen=self.experts_seen,
                requests=list(self._requests),
                requests_seen=self.requests_seen,
                logs=list(self._logs),
                log_seq=self._log_seq,
                notes=list(self._notes),
                errors=list(self._errors),
                summary=self.summary,
                progress=Progress("done") if self.summary is not None else self._tracker.progress(self.t_last),
            )


_HANDLERS = {
    "step": RunFeed._step,
    "gpu": RunFeed._gpu,
    "energy": RunFeed._energy,
    "host": RunFeed._host_ev,
    "experts": RunFeed._experts_ev,
    "request": RunFeed._request,
    "log": RunFeed._log,
    "meta": RunFeed._meta,
    "error": RunFeed._error,
    "telemetry_note": RunFeed._note,
}
