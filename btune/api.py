"""The reporting API's implementation (the rules are in the package's docstring, ``btune/__init__.py``).

Standard library only at import. Under btune the first event opens the channel with ``workloads.protocol``'s
Emitter (orjson, a watchdog that ends the script when the console is gone, as for btune's own workloads).
"""

from __future__ import annotations

import atexit
import math
import operator
import os
import sys
import time
from typing import Any

ENV_EVENTS = "BTUNE_EVENTS"  #: the console's events channel (workloads.protocol.ENV_EVENTS)
ENV_LOG = "BTUNE_LOG"  #: outside btune, "1": one plain line on stderr per call
ENV_MEMORY = "BTUNE_MEMORY_PROFILE"  #: N: a CUDA memory profile of steps 1..N (btune run --memory-profile N -- CMD)
SCHEMA_VERSION = 1  #: workloads.protocol.SCHEMA_VERSION
TOKENS_MODES = ("global", "per_replica")
#: Step fields the API sets itself, and the envelope's: a metric of that name is left out.
_RESERVED = frozenset({"v", "type", "t", "rank", "step", "step_ms", "clock", "first", "tokens", "loss"})
#: Meta facts with a number's kind: all must be >= 0 (n_devices, replicas: ints >= 1).
_META_NUMBERS = ("n_params", "flops_per_token", "weight_bytes", "kv_bytes_per_token", "kv_tokens_per_step")
_META_STRINGS = ("model", "workload", "device", "device_name", "precision", "device_uuid")
_MAX_STR = 256
#: Steps are sent in batches at most this old: a step after a longer gap is sent at once, so only steps faster
#: than this share a send (one system call costs more than the rest of a call); other events are sent at once.
FLUSH_MS = 2.0

_OFF, _LOG, _CHANNEL = 0, 1, 2
_BAD: Any = object()

_perf = time.perf_counter
_wall = time.time

# The state of this process's reporting (module globals: the hot path reads them directly).
_mode = _OFF
_rank = 0
_world = 1
_tokens_mode = "global"
_tokens_scale: int | None = 1  #: what this rank multiplies a step's tokens by; None: it sends no tokens
_index = 0
_last = _perf()
_phase: str | None = None
_emitter: Any = None
_warned: set[str] = set()
_memory_steps = 0  #: BTUNE_MEMORY_PROFILE
_memory_at = -1  #: the step index whose call starts (0) or ends (N) the memory profile's window; -1: none
_profile: Any = None  #: workloads.memprofile.StepProfile, once the window started


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _scale() -> int | None:
    if _rank != 0:
        return None
    return _world if _tokens_mode == "per_replica" else 1


def _reset() -> None:
    """Read the environment afresh and start counting again (at import; tests call it between cases)."""
    global _mode, _rank, _world, _tokens_mode, _tokens_scale, _index, _last, _phase, _emitter
    global _memory_steps, _memory_at, _profile
    if _emitter is not None:
        try:
            _emitter.close()
        except Exception:
            pass
    _emitter = None
    if os.environ.get(ENV_EVENTS):
        _mode = _CHANNEL
    elif os.environ.get(ENV_LOG, "") not in ("", "0"):
        _mode = _LOG
    else:
        _mode = _OFF
    _rank = max(_env_int("RANK", 0), 0)
    _world = max(_env_int("WORLD_SIZE", 1), 1)
    _tokens_mode = "global"
    _tokens_scale = _scale()
    _index = 0
    _last = _perf()
    _phase = None
    _warned.clear()
    _memory_steps = max(_env_int(ENV_MEMORY, 0), 0)
    _memory_at = 0 if _memory_steps and _rank == 0 and _mode != _OFF else -1
    _profile = None


def enabled() -> bool:
    """Whether this process reports to a btune console (``BTUNE_EVENTS`` set)."""
    return _mode == _CHANNEL


def _warn(key: str, message: str) -> None:
    """One line on stderr, once per kind of mistake."""
    if key in _warned:
        return
    _warned.add(key)
    try:
        print(f"btune: {message} (this warning is shown once)", file=sys.stderr, flush=True)
    except Exception:
        pass


def _kind(value: Any) -> str:
    return type(value).__name__


def _number(value: Any) -> Any:
    """``value`` as an int or float (an integer-like object as int, a 0-d array or tensor through
    ``float``), or _BAD. A bool is not a number here."""
    t = type(value)
    if t is int or t is float:
        return value
    if t is bool or t is str or t is bytes:
        return _BAD
    if hasattr(value, "__index__"):
        try:
            return operator.index(value)
        except Exception:
            pass
    if hasattr(value, "__float__"):
        try:
            return float(value)
        except Exception:
            return _BAD
    return _BAD


def _nonneg(value: Any) -> Any:
    v = _number(value)
    if v is _BAD or (type(v) is float and not math.isfinite(v)) or v < 0:
        return _BAD
    return v


def _scalar(value: Any) -> Any:
    """A metric's value: a number, a bool, None or a short string; else _BAD."""
    if value is None or type(value) is bool:
        return value
    if type(value) is str:
        return value if len(value) <= _MAX_STR else _BAD
    return _number(value)


def _send(event: dict[str, Any]) -> None:
    global _emitter, _mode
    if _emitter is None:
        try:
            from workloads.protocol import Emitter
        except Exception as exc:  # orjson or the workloads package missing: report nothing, run on
            _mode = _OFF
            _warn("import", f"cannot open the events channel ({exc}); reporting is off")
            return
        _emitter = Emitter(rank=_rank, flush_ms=FLUSH_MS)
    _emitter.send(event, flush=event["type"] != "step")


def _log(text: str) -> None:
    try:
        print(f"btune: {text}", file=sys.stderr, flush=True)
    except Exception:
        pass


# -- step ----------------------------------------------------------------------------------------
def step(tokens: Any = None, loss: Any = None, **metrics: Any) -> None:
    """One step: its tokens (global unless ``meta(tokens="per_replica")``), its loss, further metrics."""
    global _index, _last
    if _mode == _OFF:
        return
    now = _perf()
    step_ms = (now - _last) * 1000.0
    _last = now
    index = _index
    _index = index + 1
    try:
        if tokens is not None:
            if type(tokens) is not int or tokens < 0:
                tokens = _nonneg(tokens)
                if tokens is _BAD:
                    _warn("step.tokens", f"step(tokens=...) takes a number >= 0, not {_kind(tokens)}; left out")
                    tokens = None
            if tokens is not None:
                tokens = tokens * _tokens_scale if _tokens_scale is not None else None
        if loss is not None and type(loss) is not float:
            value = _number(loss)
            if value is _BAD:
                _warn("step.loss", f"step(loss=...) takes a number, not {_kind(loss)}; left out")
                loss = None
            else:
                loss = value
        event = {"v": SCHEMA_VERSION, "type": "step", "t": _wall(), "rank": _rank, "step": index,
                 "step_ms": step_ms, "tokens": tokens, "clock": "host"}
        if index == 0:
            event["first"] = True
        if loss is not None:
            event["loss"] = loss
        if metrics:
            _add_metrics(event, metrics)
        if _mode == _CHANNEL:
            _send(event)
        else:
            extra = " ".join(f"{k}={event[k]}" for k in event if k not in ("v", "type", "t", "rank", "step",
                                                                            "step_ms", "clock"))
            _log(f"step {index} {step_ms:.3f} ms {extra}".rstrip())
        if index == 0 and (_phase is None or _phase == "starting"):
            _first_phase()
        if index == _memory_at:
            _memory(index)
    except Exception as exc:  # never into the user's script
        _warn("step.internal", f"step() could not report ({_kind(exc)}: {exc})")


def _first_phase() -> None:
    """After the first step, with no phase named yet: the script is "measuring" (the first step, start-up
    included, stays in "starting"; the power profile charges each phase its own time)."""
    global _phase
    _phase = "measuring"
    if _mode == _CHANNEL:
        _send({"v": SCHEMA_VERSION, "type": "phase", "t": _wall(), "rank": _rank, "phase": "measuring"})


def _add_metrics(event: dict[str, Any], metrics: dict[str, Any]) -> None:
    for name, value in metrics.items():
        if name in _RESERVED:
            _warn(f"step.{name}", f"step({name}=...) is set by btune itself; left out")
            continue
        if name == "warmup":
            if type(value) is not bool:
                _warn("step.warmup", f"step(warmup=...) takes True or False, not {_kind(value)}; left out")
                continue
            event[name] = value
            continue
        v = _scalar(value)
        if v is _BAD:
            _warn(f"step.{name}", f"step({name}=...) takes a number, a bool or a short string, not "
                                  f"{_kind(value)}; left out")
            continue
        event[name] = v


# -- memory profile (BTUNE_MEMORY_PROFILE) ---------------------------------------------------------
def _memory(index: int) -> None:
    """At step 0's call: start recording CUDA memory history (step 1 is the window's first); at step N's: stop,
    save the snapshot and send the ``memory`` event. Imports ``workloads.memprofile`` (and torch) only here."""
    global _memory_at, _profile, _last
    _memory_at = -1
    try:
        if _profile is None:
            try:
                from workloads.memprofile import StepProfile
            except Exception as exc:  # no torch, no workloads package: the script runs on without a profile
                note = f"{ENV_MEMORY}: cannot record a memory profile ({_kind(exc)}: {exc})"
                _log(note)
                _memory_event(snapshot=None, window=[1, _memory_steps], note=note)
                return
            _profile = StepProfile.start(_memory_steps, None, _memory_event)
            if _profile is not None:
                _profile.before(1)
                if _profile.window.recording:
                    _memory_at = _memory_steps
                    atexit.register(_memory_close)
        else:
            _profile.after(index)
    except Exception as exc:
        _warn("memory.internal", f"the memory profile failed ({_kind(exc)}: {exc})")
    finally:
        _last = _perf()  # the profile's own time is not the next step's


def _memory_close() -> None:
    """At exit: a window the script did not reach the end of ends at its last step."""
    if _profile is not None and _profile.window.recording:
        _profile.close(_index - 1)


def _memory_event(**fields: Any) -> None:
    event = {"v": SCHEMA_VERSION, "type": "memory", "t": _wall(), "rank": _rank, **fields}
    if _mode == _CHANNEL:
        _send(event)
    elif _mode == _LOG:
        _log(f"memory snapshot={fields.get('snapshot')} peak_bytes={fields.get('peak_bytes')}")


# -- phase ---------------------------------------------------------------------------------------
class _Phase:
    """What ``phase()`` returns: as a context manager, its exit goes back to the phase before."""

    __slots__ = ("_active", "_before")

    def __init__(self, before: str | None, active: bool) -> None:
        self._before = before
        self._active = active

    def __enter__(self) -> _Phase:
        return self

    def __exit__(self, *exc: object) -> bool:
        if self._active:
            before = None if self._before == "starting" else self._before  # "starting" ends with the first step
            back = before or ("measuring" if _index > 0 else "starting")
            _set_phase(back, None, None, None)
        return False


def _set_phase(name: str, detail: str | None, k: int | None, n: int | None) -> None:
    global _phase, _last
    _phase = name
    _last = _perf()  # the time until the next step is not that step's
    try:
        if _mode == _CHANNEL:
            event = {"v": SCHEMA_VERSION, "type": "phase", "t": _wall(), "rank": _rank, "phase": name}
            for key, value in (("detail", detail), ("k", k), ("n", n)):
                if value is not None:
                    event[key] = value
            _send(event)
        elif _mode == _LOG:
            _log(f"phase {name}" + (f" ({detail})" if detail else "") + (f" {k} of {n}" if k is not None else ""))
    except Exception as exc:
        _warn("phase.internal", f"phase() could not report ({_kind(exc)}: {exc})")


def phase(name: str, detail: str | None = None, k: int | None = None, n: int | None = None) -> _Phase:
    """Enter phase ``name`` ("eval", "checkpoint", ...); ``with btune.phase("eval"):`` goes back on exit."""
    if type(name) is not str or not name or len(name) > _MAX_STR:
        _warn("phase.name", f"phase() takes a non-empty string, not {_kind(name)}; ignored")
        return _Phase(None, False)
    if detail is not None and type(detail) is not str:
        _warn("phase.detail", f"phase(detail=...) takes a string, not {_kind(detail)}; left out")
        detail = None
    if k is not None and type(k) is not int:
        _warn("phase.k", f"phase(k=...) takes an int, not {_kind(k)}; left out")
        k = None
    if n is not None and type(n) is not int:
        _warn("phase.n", f"phase(n=...) takes an int, not {_kind(n)}; left out")
        n = None
    before = _phase
    _set_phase(name, detail, k, n)
    return _Phase(before, True)


# -- meta ----------------------------------------------------------------------------------------
def meta(**facts: Any) -> None:
    """The model and its costs (``model``, ``n_params``, ``flops_per_token``, ``weight_bytes``,
    ``kv_bytes_per_token``, ``device_name``, ``n_devices``, ``precision``, ``tokens``; others kept as given)."""
    global _tokens_mode, _tokens_scale
    try:
        event: dict[str, Any] = {"v": SCHEMA_VERSION, "type": "meta", "t": _wall(), "rank": _rank}
        if "params" in facts and "n_params" not in facts and type(facts["params"]) is not dict:
            facts["n_params"] = facts.pop("params")  # a count, as n_params (``params`` is a workload's dict)
        for name, value in facts.items():
            v = _meta_fact(name, value)
            if v is _BAD:
                continue
            if name == "tokens":
                _tokens_mode = v
                _tokens_scale = _scale()
                event["tokens_mode"] = v
            else:
                event[name] = v
        if "n_devices" not in event and _world > 1:
            event["n_devices"] = _world
        if _mode == _CHANNEL:
            _send(event)
        elif _mode == _LOG:
            _log("meta " + " ".join(f"{k}={event[k]}" for k in event if k not in ("v", "type", "t", "rank")))
    except Exception as exc:
        _warn("meta.internal", f"meta() could not report ({_kind(exc)}: {exc})")


def _meta_fact(name: str, value: Any) -> Any:
    if name in ("v", "type", "t", "rank"):
        _warn(f"meta.{name}", f"meta({name}=...) is set by btune itself; ignored")
        return _BAD
    if name == "tokens":
        if value not in TOKENS_MODES:
            _warn("meta.tokens", f"meta(tokens=...) takes one of {', '.join(TOKENS_MODES)}, not {value!r}; ignored")
            return _BAD
        return value
    if name in _META_NUMBERS:
        v = None if value is None else _nonneg(value)
        if v is _BAD:
            _warn(f"meta.{name}", f"meta({name}=...) takes a number >= 0, not {_kind(value)}; ignored")
        return v
    if name in ("n_devices", "replicas", "tp"):
        v = _number(value)
        if type(v) is not int or v < 1:
            _warn(f"meta.{name}", f"meta({name}=...) takes an int >= 1, not {value!r}; ignored")
            return _BAD
        return v
    if name in _META_STRINGS:
        if value is not None and (type(value) is not str or len(value) > _MAX_STR):
            _warn(f"meta.{name}", f"meta({name}=...) takes a string, not {_kind(value)}; ignored")
            return _BAD
        return value
    if type(value) in (dict, list):
        return value
    v = _scalar(value)
    if v is _BAD:
        _warn(f"meta.{name}", f"meta({name}=...) takes a number, a string, a list or a dict, not "
                              f"{_kind(value)}; ignored")
    return v


_reset()
