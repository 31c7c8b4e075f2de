"""A memory profile: PyTorch's CUDA memory history over a window of steps, its snapshot, and what held the peak.

``--memory-profile N`` (btune's dense and moe, ``workloads.loop``) or ``BTUNE_MEMORY_PROFILE=N`` (a script using
the reporting API, ``btune.api``) records the caching allocator's history (``torch.cuda.memory.
_record_memory_history``) from the start of step 1 (step 0 holds start-up) to the end of step N, then saves the
snapshot (``torch.cuda.memory._snapshot()``, pickled as ``_dump_snapshot`` writes it: open it at
https://pytorch.org/memory_viz) beside the run record, ``{BTUNE_RUN_DIR}/{BTUNE_RUN_ID}.memory.pickle``
(``./btune-memory-<pid>.pickle`` when run alone), and sends one ``memory`` event.

The peak (``analyse``) is computed from the snapshot alone, as the memory_viz "Active Memory Timeline" draws it:
the blocks live when the window began (those freed in the trace without being allocated in it, and those still
live at its end that it never allocated), then the device trace replayed in order: an ``alloc`` adds its bytes,
a ``free_completed`` (the block reusable again) takes them away. ``peak_bytes`` is the most bytes live at once,
counted as requested (the trace's sizes); the live blocks at that moment are grouped by allocation site, the
first frame outside torch, site-packages and the standard library (``file:line function``). Blocks allocated
before the window have no stack: they are one site, ``(allocated before the window)`` (weights, optimizer
state). ``max_memory_allocated`` is torch's own peak over the same window (its counter reset at the window's
start): it counts the allocator's rounded block sizes, so it is the larger by the rounding.

Only rank 0 records (tensor-parallel ranks hold alike). Without CUDA there is no profile: one line on stderr, and
a ``memory`` event whose ``note`` says why.
"""

from __future__ import annotations

import os
import pickle
import sys
import sysconfig
from collections.abc import Callable, Iterable
from typing import Any

import torch

ENV_RUN_DIR, ENV_RUN_ID = "BTUNE_RUN_DIR", "BTUNE_RUN_ID"
#: The allocator events kept (a ring: a longer window keeps its last ones; PyTorch's guide uses 100,000): each costs
#: a few KB in the snapshot file.
MAX_ENTRIES = 100_000
TOP_SITES = 10
NO_CUDA = "--memory-profile: no CUDA device; running without a memory profile"
BEFORE_WINDOW = "(allocated before the window)"
NO_STACK = "(no stack)"
#: Block states that hold memory (a block awaiting free is not reusable yet).
_LIVE_STATES = frozenset({"active_allocated", "active_awaiting_free", "active_pending_free"})
#: Frames of these are library code, not a site: torch, installed packages, generated kernels.
_LIBRARY = ("/torch/", "/site-packages/", "/dist-packages/", "/torchinductor_")


def snapshot_path(rank: int = 0) -> str:
    """Where the snapshot goes: beside the run record when a console launched this process, else the cwd."""
    run_dir, run_id = os.environ.get(ENV_RUN_DIR), os.environ.get(ENV_RUN_ID)
    suffix = f".rank{rank}" if rank else ""
    if run_dir and run_id:
        return os.path.join(run_dir, f"{run_id}.memory{suffix}.pickle")
    return os.path.abspath(f"btune-memory-{os.getpid()}{suffix}.pickle")


def no_cuda_line() -> None:
    """The one line said when there is no CUDA device to profile."""
    try:
        print(f"btune: {NO_CUDA}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


# -- the snapshot's analysis (plain Python: a hand-built snapshot dict tests it) ----------------------------------

def _stdlib() -> tuple[str, ...]:
    """The standard library's directory, as given and resolved (a frame names a file as it was imported)."""
    try:
        path = sysconfig.get_paths()["stdlib"]
        return tuple({path + os.sep, os.path.realpath(path) + os.sep})
    except (KeyError, OSError):
        return ()


_STDLIB = (*_stdlib(), "<frozen")


def _python(frame: dict[str, Any]) -> bool:
    name = str(frame.get("filename") or "")
    return name.endswith(".py") or name.startswith("<")


def _library(filename: str) -> bool:
    return any(mark in filename for mark in _LIBRARY) or filename.startswith(_STDLIB)


def _machinery(frame: dict[str, Any]) -> bool:
    """A native frame of the allocator or of the unwinder itself (never a site)."""
    name, filename = str(frame.get("name") or ""), str(frame.get("filename") or "")
    return any(s in name for s in ("unwind", "CapturedTraceback", "gather_with_cpp", "Allocator", "PyEval_",
                                   "PyObject_", "_PyFunction_")) or "CachingAllocator" in filename


def frame_text(frame: dict[str, Any]) -> str:
    """``dir/file.py:line function``: the file's last two path components."""
    filename = str(frame.get("filename") or "?").replace("\\", "/")
    short = "/".join(filename.rsplit("/", 2)[-2:])
    return f"{short}:{frame.get('line', '?')} {frame.get('name') or '?'}"


def site(frames: Iterable[dict[str, Any]] | None) -> str:
    """Where a block was allocated: its innermost Python frame outside torch, site-packages and the standard
    library; else its innermost Python frame (a torch function: ``torch/optim/adamw.py:...``); else its innermost
    native frame that is not the allocator's (a backward op); ``(no stack)`` without frames."""
    frames = [f for f in frames or () if isinstance(f, dict)]  # innermost first, as torch records them
    python = [f for f in frames if _python(f)]
    for f in python:
        if not _library(str(f.get("filename") or "")):
            return frame_text(f)
    if python:
        return frame_text(python[0])
    native = next((f for f in frames if not _machinery(f)), None)
    return frame_text(native) if native is not None else NO_STACK


def _blocks(segment: dict[str, Any]) -> Iterable[tuple[int, dict[str, Any]]]:
    """Each block of a segment with its address (given, or the segment's address plus the sizes before it)."""
    addr = int(segment.get("address") or 0)
    for b in segment.get("blocks") or ():
        yield int(b.get("address", addr)), b
        addr = int(b.get("address", addr)) + int(b.get("size") or 0)


#: A live block: (bytes, frames, allocated before the window).
Live = tuple[int, list[dict[str, Any]], bool]


def live_at_start(snapshot: dict[str, Any], device: int = 0) -> dict[int, Live]:
    """The blocks live when the trace begins: freed in the trace before it allocated them, or live in the
    snapshot's segments without the trace having allocated them."""
    trace = _trace(snapshot, device)
    opened: set[int] = set()
    start: dict[int, Live] = {}
    for e in trace:
        action, addr = e.get("action"), e.get("addr")
        if action == "alloc":
            opened.add(addr)
        elif action == "free_completed":
            if addr in opened:
                opened.discard(addr)
            else:
                start[addr] = (int(e.get("size") or 0), [], True)
    for seg in snapshot.get("segments") or ():
        if seg.get("device", device) != device:
            continue
        for addr, b in _blocks(seg):
            if b.get("state") in _LIVE_STATES and addr not in opened and addr not in start:
                size = b.get("requested_size") or b.get("size") or 0
                start[addr] = (int(size), list(b.get("frames") or []), True)
    return start


def _trace(snapshot: dict[str, Any], device: int) -> list[dict[str, Any]]:
    traces = snapshot.get("device_traces") or []
    return list(traces[device]) if 0 <= device < len(traces) and traces[device] else []


def _replay(start: dict[int, Live], trace: list[dict[str, Any]],
            until: int | None = None) -> tuple[int, int, dict[int, Live]]:
    """Replay ``trace`` from ``start``: (the peak of live bytes, the index of the event that reached it, -1 for
    the start; the live blocks after event ``until``, or at the end)."""
    live = dict(start)
    total = sum(size for size, _, _ in live.values())
    peak, peak_at = total, -1
    if until is not None and until < 0:
        return peak, peak_at, live
    for i, e in enumerate(trace):
        action = e.get("action")
        if action == "alloc":
            old = live.pop(e.get("addr"), None)  # an address allocated twice: the trace lost its free
            if old is not None:
                total -= old[0]
            size = int(e.get("size") or 0)
            live[e.get("addr")] = (size, list(e.get("frames") or []), False)
            total += size
            if total > peak:
                peak, peak_at = total, i
        elif action == "free_completed":
            gone = live.pop(e.get("addr"), None)
            if gone is not None:
                total -= gone[0]
        if until is not None and i >= until:
            break
    return peak, peak_at, live


def analyse(snapshot: dict[str, Any], device: int = 0, top: int = TOP_SITES,
            site_of: Callable[[list[dict[str, Any]]], str] = site) -> dict[str, Any]:
    """The peak of live allocated bytes over the snapshot's trace of ``device`` and what held it:
    ``{"peak_bytes", "top_sites": [{"site", "bytes", "blocks"}], "entries", "start_bytes"}`` (see the module
    docstring for how the peak is counted)."""
    trace = _trace(snapshot, device)
    start = live_at_start(snapshot, device)
    peak, peak_at, _ = _replay(start, trace)
    _, _, live = _replay(start, trace, until=peak_at)
    sites: dict[str, list[int]] = {}
    for size, frames, before in live.values():
        name = BEFORE_WINDOW if before and not frames else site_of(frames)
        acc = sites.setdefault(name, [0, 0])
        acc[0] += size
        acc[1] += 1
    ranked = sorted(sites.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top]
    return {"peak_bytes": peak, "top_sites": [{"site": k, "bytes": v[0], "blocks": v[1]} for k, v in ranked],
            "entries": len(trace), "start_bytes": sum(size for size, _, _ in start.values())}


# -- recording a window ------------------------------------------------------------------------------------------

def _record(enabled: str | None, max_entries: int = MAX_ENTRIES) -> None:
    if enabled is None:
        torch.cuda.memory._record_memory_history(None)
        return
    try:  # clear_history: a recording the script had on does not leak into the window (torch >= 2.5)
        torch.cuda.memory._record_memory_history(enabled, max_entries=max_entries, clear_history=True)
    except TypeError:
        torch.cuda.memory._record_memory_history(enabled, max_entries=max_entries)


class Window:
    """CUDA memory history from ``begin(step)`` to ``end(step)`` on one device; ``end`` returns the ``memory``
    event's fields. Nothing here raises: a failure becomes the event's ``note``."""

    def __init__(self, steps: int, device: Any = None, path: str | None = None,
                 max_entries: int = MAX_ENTRIES) -> None:
        self.steps = steps
        self.device = device
        self.path = path or snapshot_path()
        self.max_entries = max_entries
        self.first: int | None = None
        self.peak_before: int | None = None  #: torch's peak before the window (its counter is reset at the start)

    @property
    def recording(self) -> bool:
        return self.first is not None

    def index(self) -> int:
        dev = self.device
        if isinstance(dev, torch.device):
            return dev.index if dev.index is not None else torch.cuda.current_device()
        return int(dev) if dev is not None else torch.cuda.current_device()

    def begin(self, step: int) -> str | None:
        """Start recording before ``step``; the reason when it cannot."""
        try:
            dev = self.index()
            self.peak_before = torch.cuda.max_memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            _record("all", self.max_entries)
        except Exception as exc:  # an old torch, a device gone: the run goes on without a profile
            return f"--memory-profile: cannot record the memory history ({type(exc).__name__}: {exc})"
        self.first = step
        return None

    def end(self, step: int) -> dict[str, Any]:
        """Stop after ``step``, save the snapshot, analyse it: the ``memory`` event's fields."""
        window = [self.first if self.first is not None else step, step]
        self.first = None
        fields: dict[str, Any] = {"snapshot": None, "window": window}
        try:
            dev = self.index()
            snap = torch.cuda.memory._snapshot()
            fields["max_memory_allocated"] = int(torch.cuda.max_memory_allocated(dev))
        except Exception as exc:
            _stop()
            fields["note"] = f"--memory-profile: no snapshot ({type(exc).__name__}: {exc})"
            return fields
        _stop()
        try:
            save(snap, self.path)
            fields["snapshot"] = self.path
        except OSError as exc:
            fields["note"] = f"--memory-profile: cannot save the snapshot to {self.path} ({exc.strerror or exc})"
        result = analyse(snap, dev)
        fields.update(peak_bytes=result["peak_bytes"], top_sites=result["top_sites"], entries=result["entries"],
                      device=dev)
        if result["entries"] >= self.max_entries:
            fields.setdefault("note", f"the trace kept only the last {self.max_entries} allocator events of the "
                                      "window: the peak is over those")
        return fields

    def overall_peak(self, peak: int | None) -> int | None:
        """torch's peak since before the window (its counter was reset at the window's start)."""
        if peak is None or self.peak_before is None:
            return peak
        return max(peak, self.peak_before)


def _stop() -> None:
    try:
        _record(None)
    except Exception:
        pass


def save(snapshot: dict[str, Any], path: str) -> None:
    """The snapshot pickled as ``torch.cuda.memory._dump_snapshot`` writes it (temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            pickle.dump(snapshot, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class StepProfile:
    """A window over a step loop: ``before(i)`` ahead of each step, ``after(i)`` once it is issued, ``close()``
    when the loop ends (a window cut short ends there). Sends the ``memory`` event through ``send(**fields)``."""

    def __init__(self, steps: int, device: Any, send: Callable[..., None], first: int = 1,
                 path: str | None = None) -> None:
        self.window = Window(steps, device, path)
        self.send = send
        self.first = first
        self.last = first + steps - 1
        self.done = False
        self.issued: int | None = None

    @classmethod
    def start(cls, steps: int, device: Any, send: Callable[..., None], path: str | None = None) -> StepProfile | None:
        """A profile of ``steps`` steps on ``device``; None (after the no-CUDA line and its event) without CUDA."""
        cuda = torch.cuda.is_available() and (device is None or getattr(device, "type", "cuda") == "cuda")
        if not cuda:
            no_cuda_line()
            send(snapshot=None, window=[1, steps], note=NO_CUDA.replace("--memory-profile: ", ""))
            return None
        return cls(steps, device, send, path=path)

    def before(self, step: int) -> None:
        if step == self.first and not self.done:
            why = self.window.begin(step)
            if why is not None:
                self.done = True
                print(f"btune: {why}", file=sys.stderr, flush=True)
                self.send(snapshot=None, window=[self.first, self.last], note=why)

    def after(self, step: int) -> None:
        self.issued = step
        if step == self.last and self.window.recording:
            self.finish(step)

    def finish(self, step: int) -> None:
        self.done = True
        try:
            fields = self.window.end(step)
        except Exception as exc:  # never into the run
            _stop()
            fields = {"snapshot": None, "window": [self.first, step],
                      "note": f"--memory-profile: failed ({type(exc).__name__}: {exc})"}
        self.send(**fields)

    def close(self, step: int | None = None) -> None:
        """The loop ended: a window still open ends at ``step`` (default: the last step ``after`` saw)."""
        if self.window.recording and not self.done:
            last = step if step is not None else self.issued
            self.finish(last if last is not None and last >= self.first else self.first)

    def peak(self, peak: int | None) -> int | None:
        return self.window.overall_peak(peak)
