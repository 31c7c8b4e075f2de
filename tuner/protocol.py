"""The console's side of the event protocol: which events exist, their typed fields, decoding what arrives.

An event is a flat JSON object on one line: ``{"v": 1, "type": "step", "t": 1.7e9, "rank": 0, ...}``. The wire
format, the typed event constructors and the Emitter belong to the side that speaks it, ``workloads.protocol``
(re-exported here); this module checks what the runner's :class:`Decoder` reads off the channel: the envelope
(``valid_envelope``) and each type's fields (``SCHEMAS``, ``REQUIRED``, ``check_event``).

Needs orjson and nothing else.
"""

from __future__ import annotations

import math
from typing import Any

from workloads.protocol import (
    CLOCK_DEVICE,
    CLOCK_HOST,
    ENV_EVENTS,
    EXIT_CONSOLE_GONE,
    SCHEMA_VERSION,
    WORKLOAD_TYPES,
    Emitter,
    decode,
    encode,
    make_event,
    stringify_big,
)

__all__ = [
    "CLOCK_DEVICE", "CLOCK_HOST", "CONSOLE_TYPES", "ENV_EVENTS", "EVENT_TYPES", "EXIT_CONSOLE_GONE", "REQUIRED",
    "SCHEMAS", "SCHEMA_VERSION", "SERIES_TYPES", "WORKLOAD_TYPES", "Decoder", "Emitter", "check_event",
    "decode_line", "encode", "make_event", "scalar_value", "stringify_big", "valid_envelope", "valid_time",
]

#: Event types the console itself adds (telemetry samples, process output).
CONSOLE_TYPES = frozenset({"gpu", "host", "energy", "telemetry_note"})
EVENT_TYPES = WORKLOAD_TYPES | CONSOLE_TYPES


def valid_envelope(obj: Any) -> bool:
    """An object with this schema's envelope: ``v``, a known ``type``, a finite ``t`` and an int ``rank``."""
    if not isinstance(obj, dict):
        return False
    v, type_, t, rank = obj.get("v"), obj.get("type"), obj.get("t"), obj.get("rank")
    return (
        type(v) is int
        and 1 <= v <= SCHEMA_VERSION
        and type(type_) is str
        and type_ in EVENT_TYPES
        and _num(t)
        and _int(rank)
    )


# -- typed events -------------------------------------------------------------------------------
# Each event type declares its fields and their kinds. ``check_event`` keeps an event's good fields,
# drops a field of the wrong kind (counted), and drops the whole event when a required field is bad.
_I64 = 2**63


def _int(v: Any) -> bool:
    return type(v) is int and -_I64 <= v < _I64


def _num(v: Any) -> bool:
    return (type(v) is float and math.isfinite(v)) or _int(v)


def _nonneg(v: Any) -> bool:
    return _num(v) and v >= 0


def _bool(v: Any) -> bool:
    return type(v) is bool


def _str(v: Any) -> bool:
    return type(v) is str


def _dict(v: Any) -> bool:
    return type(v) is dict


def _scalar(v: Any) -> bool:
    """A value a series column may hold: a finite number, a bool, a short string or null."""
    return v is None or type(v) is bool or _num(v) or (type(v) is str and len(v) <= 256)


def _opt(kind: Any) -> Any:
    return lambda v: v is None or kind(v)


def _list(kind: Any) -> Any:
    return lambda v: type(v) is list and all(kind(x) for x in v)


scalar_value = _scalar
valid_time = _num


def _any(v: Any) -> bool:
    return True


_NUM_ROW = _list(_opt(_num))
_MAYBE_NUM = _opt(_num)


def _nums(*names: str) -> dict[str, Any]:
    return dict.fromkeys(names, _MAYBE_NUM)


#: A request's end (the ``request`` event's optional ``status``; without it, ``finished`` says finished or not).
#: A rate sweep's or --find-max-rate's requests also carry ``segment`` (their load's index), ``rate`` (its offered
#: requests/s; null: all at once) and ``search`` (true: a --find-max-rate probe).
REQUEST_STATUSES = ("finished", "failed", "unfinished")
#: Per type: field -> kind, and the fields an event of that type cannot do without.
SCHEMAS: dict[str, dict[str, Any]] = {
    "step": {"step": _int, "step_ms": _nonneg, "tokens": _opt(_nonneg), "clock": _str, "warmup": _bool, "first": _bool,
             "loss": _opt(_num), "kv_tokens": _opt(_int), "weight_passes": _opt(_int),
             **_nums("mem_alloc_mb", "mem_reserved_mb", "mem_peak_mb", "nll_sum", "nll_mean"),
             "scored_bytes": _opt(_nonneg), "window": _opt(_int), "windows": _opt(_int)},
    "gpu": {"gpu": _int, "throttle": _opt(_int), "throttle_reasons": _list(_str),
            **_nums("power_w", "mem_used_mb", "mem_total_mb", "util_gpu", "util_mem", "sm_clock_mhz", "temp_c",
                    "proc_mem_mb")},
    "energy": {"gpu": _int, "mj": _num},
    "host": _nums("cpu_percent", "mem_used_mb", "mem_percent", "proc_cpu_percent", "proc_rss_mb", "nprocs"),
    "series": {"name": lambda v: _str(v) and 0 < len(v) <= 100, "replica": _int},
    "meta": {"workload": _str, "options": _dict, "plan": _dict, "device": _str, "device_name": _opt(_str),
             "flops_per_token": _opt(_nonneg), "n_devices": lambda v: _int(v) and v >= 1, "precision": _opt(_str),
             "replicas": lambda v: _int(v) and v >= 1, "tp": lambda v: _int(v) and v >= 1,
             "device_uuid": _opt(_str), "weight_bytes": _opt(_nonneg), "kv_bytes_per_token": _opt(_nonneg),
             "kv_tokens_per_step": _opt(_nonneg), "checkpoint": _opt(_dict)},
    "experts": {"step": _int, "window": _list(_int), "steps": _int, "layer_ids": _list(_any), "n_experts": _int,
                "top_k": _int, "capacity": _opt(_num), "tokens": _opt(_num), "counts": _list(_NUM_ROW),
                "dropped": _NUM_ROW, "router_entropy": _list(_opt(_num)), "aux_loss": _list(_opt(_num)),
                "mean": _dict, "max": _dict},
    "request": {"rid": _int, "replica": _int, "client": _opt(_int), "finished": _bool, "prompt_len": _int,
                "output_len": _int, "output_tokens": _int, "arrival_s": _opt(_num), "first_token_s": _opt(_num),
                "finish_s": _opt(_num), "token_s": _list(_num), "ttft_ms": _opt(_num), "tpot_ms": _opt(_num),
                "e2e_ms": _opt(_num), "status": lambda v: v in REQUEST_STATUSES, "error": _opt(_str),
                "segment": _opt(_int), "rate": _opt(_nonneg), "search": _opt(_bool)},
    "log": {"message": _str, "level": _str, "stream": _str},
    "phase": {"phase": _str, "detail": _opt(_str), "k": _opt(_int), "n": _opt(_int)},
    "summary": {"passed": _bool, "interrupted": _bool, "tp": _int, "tolerance": _opt(_num),
                "mismatches": _list(_str), "tensors": _list(_dict), "serving": _dict, "engine": _dict, "slo": _dict,
                "load_duration_s": _opt(_nonneg),
                "first_step_ms": _opt(_num), "compile_s": _opt(_num), "saved_checkpoint": _opt(_dict)},
    "error": {"message": _str, "kind": _str},
    "telemetry_note": {"message": _str, "source": _str},
    "memory": {"snapshot": _opt(_str), "window": lambda v: _list(_int)(v) and len(v) == 2,
               "peak_bytes": _opt(_nonneg), "max_memory_allocated": _opt(_nonneg), "note": _str,
               "top_sites": _list(lambda s: _dict(s) and _str(s.get("site")) and _nonneg(s.get("bytes"))),
               "entries": _int, "device": _int},
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "step": ("step", "step_ms"), "gpu": ("gpu",), "energy": ("gpu", "mj"), "series": ("name",),
    "log": ("message",), "phase": ("phase",), "error": ("message",), "telemetry_note": ("message",),
    "memory": ("window",),
}
#: Types stored as columnar series: a field not declared must be a scalar there.
SERIES_TYPES = frozenset({"step", "gpu", "energy", "host", "series"})
_ENVELOPE_KEYS = ("v", "type", "t", "rank")


def check_event(event: dict[str, Any]) -> tuple[dict[str, Any] | None, int]:
    """An event with every field of the right kind: ``(event or None, fields dropped)``.

    The envelope must already be valid. An undeclared field is kept as it is, except in series types,
    where it must be a scalar (it becomes a column).
    """
    type_ = event["type"]
    schema = SCHEMAS.get(type_, {})
    columnar = type_ in SERIES_TYPES
    bad: list[str] | None = None
    for key, value in event.items():
        kind = schema.get(key)
        if kind is not None:
            ok = kind(value)
        elif columnar and key not in _ENVELOPE_KEYS:
            ok = _scalar(value)
        else:
            continue
        if not ok:
            (bad := bad or []).append(key)
    for key in REQUIRED.get(type_, ()):
        if key not in event or (bad and key in bad):
            return None, len(bad or ()) + (key not in event)
    if not bad:
        return event, 0
    return {k: v for k, v in event.items() if k not in bad}, len(bad)


def decode_line(line: bytes | str) -> dict[str, Any] | None:
    """Decode one line into an event, or None when it is not a valid event of this schema."""
    obj = decode(line)
    return obj if valid_envelope(obj) else None


class Decoder:
    """Splits a byte stream into events; counts and skips bad lines, never raises on input."""

    __slots__ = ("_buf", "bad_lines", "good_lines", "max_line")

    def __init__(self, max_line: int = 16 * 1024 * 1024) -> None:
        self._buf = b""
        self.bad_lines = 0
        self.good_lines = 0
        self.max_line = max_line

    def feed(self, chunk: bytes) -> list[tuple[dict[str, Any], bytes]]:
        """Feed bytes; return each complete valid event with its raw line (newline included)."""
        data = self._buf + chunk if self._buf else chunk
        out: list[tuple[dict[str, Any], bytes]] = []
        start = 0
        find = data.find
        while True:
            end = find(b"\n", start)
            if end < 0:
                break
            line = data[start : end + 1]
            start = end + 1
            if len(line) <= 1:
                continue
            event = decode_line(line)
            if event is None:
                self.bad_lines += 1
            else:
                self.good_lines += 1
                out.append((event, line))
        rest = data[start:]
        if len(rest) > self.max_line:  # a line that never ends: drop it, count it once
            self.bad_lines += 1
            rest = b""
        self._buf = rest
        return out

    def close(self) -> None:
        """End of stream: a trailing partial line is counted as bad."""
        if self._buf.strip():
            self.bad_lines += 1
        self._buf = b""
