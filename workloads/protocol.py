"""The event protocol as workloads speak it: the wire format, typed events and the Emitter.

An event is a flat JSON object on one line: ``{"v": 1, "type": "step", "t": 1.7e9, "rank": 0, ...}``.
A workload sends events through an :class:`Emitter`, one typed method per event it sends (meta, step,
request, experts, series, summary, log, error, memory); the console decodes and checks them (``tuner.protocol``).

The channel is a unix stream socket whose path is in ``BTUNE_EVENTS``: every process (each torchrun
rank too) opens its own connection, so stray prints on stdout/stderr never mix with events. With no
``BTUNE_EVENTS`` the Emitter writes JSON lines to stdout (a workload run alone).

Needs orjson and nothing else (no torch, nothing from the console).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any

import orjson

SCHEMA_VERSION = 1
ENV_EVENTS = "BTUNE_EVENTS"

#: Event types a workload may send.
WORKLOAD_TYPES = frozenset({"meta", "step", "experts", "request", "series", "log", "summary", "error", "phase",
                            "memory"})
#: The phases a workload reports, in order (tuner.progress adds the console's own: starting, writing, done).
PHASES = ("building", "loading", "compiling", "warm-up", "measuring", "draining")

#: Which clock timed a step (the step event's ``clock``): CUDA events around the step on the device, or the
#: host's wall clock (CPU runs, and serving's engine steps, whose latencies are wall time).
CLOCK_DEVICE = "cuda-events"
CLOCK_HOST = "host"

#: Exit status of a workload that ended because its console is gone.
EXIT_CONSOLE_GONE = 75

_ENCODE_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _default(obj: Any) -> Any:
    """Serialise what orjson cannot: tensors' items, sets, paths and anything with ``tolist``."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


def make_event(type_: str, rank: int = 0, t: float | None = None, **fields: Any) -> dict[str, Any]:
    """Build an event dict with the envelope fields first."""
    return {"v": SCHEMA_VERSION, "type": type_, "t": time.time() if t is None else t, "rank": rank, **fields}


def encode(event: dict[str, Any]) -> bytes:
    """One event as one JSON line (newline included). NaN and infinities become null."""
    try:
        return orjson.dumps(event, default=_default, option=_ENCODE_OPTS | orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:  # integers beyond 64 bits: keep them, as strings
        return orjson.dumps(stringify_big(event), default=_default, option=_ENCODE_OPTS | orjson.OPT_APPEND_NEWLINE)


def decode(line: bytes | str) -> Any:
    """One JSON line as a Python object, or None when it is not JSON (the console checks the envelope)."""
    try:
        return orjson.loads(line)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None


def stringify_big(obj: Any) -> Any:
    """``obj`` with every integer beyond 64 bits as a string (JSON encoders refuse them)."""
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, int) and not -(2**63) <= obj < 2**64:
        return str(obj)
    if isinstance(obj, dict):
        return {k: stringify_big(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [stringify_big(v) for v in obj]
    return obj


def _env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _console_gone(why: str) -> None:
    try:
        print(f"btune: {why}; ending this run (exit {EXIT_CONSOLE_GONE})", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    os._exit(EXIT_CONSOLE_GONE)


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: A typed event's default: the field is left out of the event (None is sent as null).
UNSET: Any = _Unset()


def _given(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not UNSET}


class Emitter:
    """Sends events from a workload to the console (socket in ``BTUNE_EVENTS``) or to stdout.

    Thread-safe. Sending never raises: if the console goes away the Emitter falls silent and
    counts what it could not send (``dropped``), so a workload is never killed by its telemetry.
    Launched by a console (``BTUNE_EVENTS`` set, no explicit ``path``), a watchdog ends the process
    (exit 75) when the console's end of the channel closes.
    """

    def __init__(self, path: str | None = None, rank: int | None = None, stream: Any = None,
                 watchdog: bool | None = None, flush_ms: float = 0.0) -> None:
        self.rank = _env_rank() if rank is None else rank
        self.dropped = 0
        #: > 0: events to the console are batched, each batch sent at most ``flush_ms`` after its first event
        #: (a send after that flushes at once, so events ``flush_ms`` apart are never held; a thread sends a
        #: batch left waiting, and ``close`` and interpreter exit send what is left). 0: one send per event.
        self.flush_s = max(flush_ms, 0.0) / 1000.0
        self._batch: list[bytes] = []
        self._batch_t = 0.0
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._stream = stream
        self._closing = False
        from_console = path is None and bool(os.environ.get(ENV_EVENTS))
        watchdog = from_console if watchdog is None else watchdog
        path = os.environ.get(ENV_EVENTS) if path is None else path
        if path:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)
                self._sock = sock
            except OSError as exc:
                if watchdog:  # launched by a console that is gone: nobody would see this run
                    _console_gone(f"cannot reach the console at {path} ({exc.strerror or exc})")
                print(f"btune: cannot reach the console at {path} ({exc}); events go to stdout", file=sys.stderr)
        if self._sock is not None and watchdog:
            threading.Thread(target=self._watch, args=(self._sock,), daemon=True, name="btune-watchdog").start()
        if self._sock is not None and self.flush_s > 0:
            import atexit

            atexit.register(self.flush)
            threading.Thread(target=self._flusher, daemon=True, name="btune-flush").start()
        if self._sock is None and self._stream is None:
            self._stream = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else sys.stdout

    def _watch(self, sock: socket.socket) -> None:
        """The console never writes to the channel: end of stream means it died (SIGKILL, a crash), and a
        run nobody watches must not keep holding its GPU, so the process ends at once."""
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass
        if not self._closing:
            _console_gone("the console's channel closed")

    def emit(self, type_: str, **fields: Any) -> None:
        """Send one event of ``type_`` with ``fields`` (the typed methods below are the workloads' way in)."""
        self.send(make_event(type_, rank=self.rank, **fields))

    def send(self, event: dict[str, Any], flush: bool = False) -> None:
        """Send a ready-made event (batched when ``flush_ms`` > 0, unless ``flush``)."""
        data = encode(event)
        with self._lock:
            if self.flush_s > 0 and self._sock is not None:
                batch = self._batch
                now = time.monotonic()
                if not batch:
                    self._batch_t = now
                batch.append(data)
                if flush or now - self._batch_t >= self.flush_s or len(batch) >= 512:
                    self._send_batch()
                return
            try:
                if self._sock is not None:
                    self._sock.sendall(data)
                elif self._stream is not None:
                    try:
                        self._stream.write(data)
                    except TypeError:
                        self._stream.write(data.decode())
                    self._stream.flush()
                else:
                    self.dropped += 1
            except (OSError, ValueError):
                self.dropped += 1
                self._sock = None
                self._stream = None

    # -- typed events: one method per event a workload sends; a parameter left UNSET is not sent ----------

    def meta(self, *, workload: str, options: dict[str, Any] = UNSET, plan: dict[str, Any] = UNSET,
             device: str = UNSET, device_name: str | None = UNSET, n_devices: int = UNSET,
             precision: str | None = UNSET, flops_per_token: float | None = UNSET, params: dict[str, Any] = UNSET,
             torch_version: str = UNSET, backends: dict[str, Any] = UNSET, device_uuid: str | None = UNSET,
             replicas: int = UNSET, tp: int = UNSET, weight_bytes: float | None = UNSET,
             kv_bytes_per_token: float | None = UNSET, kv_tokens_per_step: float | None = UNSET,
             checkpoint: dict[str, Any] | None = UNSET, **extra: Any) -> None:
        """Once per rank before the first step: the resolved config, what actually ran, and this rank's GPU;
        ``checkpoint``: the weights' checkpoint (path, model_type, config_sha256, n_params, ...) when not random."""
        self.emit("meta", **_given({
            "workload": workload, "options": options, "plan": plan, "device": device, "device_name": device_name,
            "n_devices": n_devices, "precision": precision, "flops_per_token": flops_per_token, "params": params,
            "torch_version": torch_version, "backends": backends, "device_uuid": device_uuid, "replicas": replicas,
            "tp": tp, "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_bytes_per_token,
            "kv_tokens_per_step": kv_tokens_per_step, "checkpoint": checkpoint}), **extra)

    def step(self, step: int, step_ms: float, tokens: int | None, *, clock: str = CLOCK_HOST,
             warmup: bool = UNSET, first: bool = UNSET, loss: float | None = UNSET, kv_tokens: int | None = UNSET,
             weight_passes: int | None = UNSET, **fields: Any) -> None:
        """One step: its index, its time and which ``clock`` took it, the global tokens it processed (counted
        once). ``fields``: further scalar columns (memory figures, serving's engine-step fields)."""
        self.emit("step", step=step, step_ms=step_ms, tokens=tokens, clock=clock, **_given({
            "warmup": warmup, "first": first, "loss": loss, "kv_tokens": kv_tokens,
            "weight_passes": weight_passes}), **fields)

    def request(self, *, rid: int, replica: int, client: int | None, finished: bool, prompt_len: int,
                output_len: int, output_tokens: int, arrival_s: float | None, first_token_s: float | None,
                finish_s: float | None, token_s: list[float], ttft_ms: float | None, tpot_ms: float | None,
                e2e_ms: float | None) -> None:
        """A served request's raw timeline (seconds since the load began) and its latencies in ms."""
        self.emit("request", rid=rid, replica=replica, client=client, finished=finished, prompt_len=prompt_len,
                  output_len=output_len, output_tokens=output_tokens, arrival_s=arrival_s,
                  first_token_s=first_token_s, finish_s=finish_s, token_s=token_s, ttft_ms=ttft_ms,
                  tpot_ms=tpot_ms, e2e_ms=e2e_ms)

    def experts(self, *, step: int, window: list[int], steps: int, layer_ids: list[Any], n_experts: int,
                top_k: int, capacity: float | None, tokens: float | None, counts: list[list[float]],
                dropped: list[float], router_entropy: list[float | None], aux_loss: list[float | None]) -> None:
        """One window of MoE steps: per-layer token counts per expert, drops, router entropy, balance loss."""
        self.emit("experts", step=step, window=window, steps=steps, layer_ids=layer_ids, n_experts=n_experts,
                  top_k=top_k, capacity=capacity, tokens=tokens, counts=counts, dropped=dropped,
                  router_entropy=router_entropy, aux_loss=aux_loss)

    def series(self, name: str, *, replica: int = UNSET, **fields: Any) -> None:
        """One sample of a named series (e.g. serving's engine state); ``fields`` are its scalar columns."""
        self.emit("series", name=name, **_given({"replica": replica}), **fields)

    def summary(self, *, first_step_ms: float | None = UNSET, compile_s: float | None = UNSET,
                memory_estimate_bytes: dict[str, Any] = UNSET, torch_mem_peak_bytes: int | None = UNSET,
                steps_run: int = UNSET, load_duration_s: float | None = UNSET, slo: dict[str, Any] = UNSET,
                warmup_s: float = UNSET, warmup_rounds: int = UNSET, engine: dict[str, Any] = UNSET,
                replicas: int = UNSET, passed: bool = UNSET, tp: int = UNSET, tolerance: float | None = UNSET,
                floor: float = UNSET, grad_scale: float = UNSET, rule: str = UNSET,
                tensors: list[dict[str, Any]] = UNSET, mismatches: list[str] = UNSET, interrupted: bool = UNSET,
                saved_checkpoint: dict[str, Any] | None = UNSET, **extra: Any) -> None:
        """The workload's own end-of-run figures (the console computes its own from raw events);
        ``saved_checkpoint``: the checkpoint ``--save-checkpoint`` wrote (path, model_type, config_sha256, ...)."""
        self.emit("summary", **_given({
            "first_step_ms": first_step_ms, "compile_s": compile_s, "memory_estimate_bytes": memory_estimate_bytes,
            "torch_mem_peak_bytes": torch_mem_peak_bytes, "steps_run": steps_run,
            "load_duration_s": load_duration_s, "slo": slo, "warmup_s": warmup_s, "warmup_rounds": warmup_rounds,
            "engine": engine, "replicas": replicas, "passed": passed, "tp": tp, "tolerance": tolerance,
            "floor": floor, "grad_scale": grad_scale, "rule": rule, "tensors": tensors, "mismatches": mismatches,
            "interrupted": interrupted, "saved_checkpoint": saved_checkpoint}), **extra)

    def memory(self, *, snapshot: str | None, window: list[int], peak_bytes: int = UNSET,
               max_memory_allocated: int = UNSET, top_sites: list[dict[str, Any]] = UNSET, note: str = UNSET,
               **extra: Any) -> None:
        """A memory profile (``workloads.memprofile``): the snapshot's path (None when there is none, ``note`` says
        why), the steps it covers ``[first, last]``, the peak of live bytes, torch's peak over the same window and
        the top allocation sites at the peak (``[{"site", "bytes", "blocks"}]``)."""
        self.emit("memory", snapshot=snapshot, window=window, **_given({
            "peak_bytes": peak_bytes, "max_memory_allocated": max_memory_allocated, "top_sites": top_sites,
            "note": note}), **extra)

    def phase(self, phase: str, detail: str | None = None, k: int | None = None, n: int | None = None) -> None:
        """Where the workload is (one of PHASES), with ``k`` of ``n`` where known (a compiled graph, a bucket)."""
        given = {"detail": detail, "k": k, "n": n}
        self.emit("phase", phase=phase, **{key: v for key, v in given.items() if v is not None})

    def log(self, message: str, level: str = "info") -> None:
        """A human-readable line."""
        self.emit("log", message=message, level=level)

    def error(self, message: str, kind: str = "error", **fields: Any) -> None:
        """An error the workload recognised (kind: error, oom, config, unsupported)."""
        self.emit("error", message=message, kind=kind, **fields)

    def _send_batch(self) -> None:
        """Send the batch (the lock held)."""
        data, self._batch = b"".join(self._batch), []
        if not data:
            return
        try:
            if self._sock is not None:
                self._sock.sendall(data)
                return
        except OSError:
            self._sock = None
        self.dropped += data.count(b"\n")

    def flush(self) -> None:
        """Send what is batched."""
        with self._lock:
            self._send_batch()

    def _flusher(self) -> None:
        period = min(max(self.flush_s, 0.005), 0.05)
        while not self._closing and self._sock is not None:
            time.sleep(period)
            with self._lock:
                if self._batch and time.monotonic() - self._batch_t >= self.flush_s:
                    self._send_batch()

    def close(self) -> None:
        """Close the channel (what is batched is sent first)."""
        self._closing = True
        with self._lock:
            self._send_batch()
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)  # wakes the watchdog's receive
                except OSError:
                    pass
                try:
                    self._sock.close()
                finally:
                    self._sock = None

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
