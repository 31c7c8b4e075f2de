"""The measured step loop of the step-loop workloads (dense, MoE): timing, stop rules, step events.

Serving runs its own engine loop (``workloads.engine.driver``); both report through ``workloads.harness``.

Step time on a GPU comes from CUDA events around the step, read one step late so the host never
waits for the device between steps; on CPU it is the host clock (the work is synchronous).

Under several ranks every rank must run the same steps (each step is collectives every rank joins):
rank 0 alone decides when to stop and broadcasts its decision at each step boundary, and Ctrl+C (the
console's cancel reaches every rank) only asks rank 0 to stop.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from workloads.protocol import CLOCK_DEVICE, CLOCK_HOST, Emitter


def memory_fields(device: torch.device) -> dict[str, float]:
    """torch allocator figures in MiB (GPU only)."""
    if device.type != "cuda":
        return {}
    mib = 1024 * 1024
    return {
        "mem_alloc_mb": torch.cuda.memory_allocated(device) / mib,
        "mem_reserved_mb": torch.cuda.memory_reserved(device) / mib,
        "mem_peak_mb": torch.cuda.max_memory_allocated(device) / mib,
    }


@dataclass
class LoopSpec:
    """When to stop: ``warmup`` unmeasured steps, then ``steps`` steady steps and/or ``duration`` seconds."""

    warmup: int
    steps: int
    duration: float

    def steps_done(self, steady_steps: int) -> bool:
        return bool(self.steps) and steady_steps >= self.steps

    def done(self, steady_steps: int, steady_seconds: float) -> bool:
        return self.steps_done(steady_steps) or (bool(self.duration) and steady_seconds >= self.duration)


def hold_sigint(leader: bool) -> threading.Event:
    """From now on SIGINT ends nothing by itself: the leader's sets the returned event, other ranks ignore it.

    A rank interrupted inside a step strands its peers in that step's collectives, so the leader turns the
    request into a decision every rank follows. Never undone: torchrun forwards the console's SIGINT to its
    workers a second time, and that one must not cut the teardown either.
    """
    stop = threading.Event()
    signal.signal(signal.SIGINT, (lambda *_: stop.set()) if leader else signal.SIG_IGN)
    return stop


class SharedStop:
    """Rank 0's stop decision, broadcast to every rank at each step boundary (one int32).

    A decision sent at one boundary is read at the next, after the loop's wait for the previous step, so on a
    GPU the host still never waits for the step just queued (the flag comes back through pinned memory).
    """

    GO, DONE, CANCEL = 0, 1, 2

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        self.leader = dist.get_rank() == 0
        self.cancel = hold_sigint(self.leader)
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)
        cuda = device.type == "cuda"
        self.host = torch.zeros(1, dtype=torch.int32, pin_memory=True) if cuda else self.flag
        self.copied = torch.cuda.Event() if cuda else None
        self.sent = False

    @staticmethod
    def wanted() -> bool:
        """Whether this process is one of several ranks."""
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def send(self, done: bool) -> None:
        """Every rank calls this at the same boundary; only rank 0's ``done`` and cancel count."""
        import torch.distributed as dist

        code = self.CANCEL if self.cancel.is_set() else self.DONE if done else self.GO
        if self.leader and code:
            self.flag.fill_(code)
        dist.broadcast(self.flag, src=0)
        if self.copied is not None:
            self.host.copy_(self.flag, non_blocking=True)
            self.copied.record()
        self.sent = True

    def received(self) -> int:
        """The decision of the previous boundary (GO before the first)."""
        if not self.sent:
            return self.GO
        if self.copied is not None:
            self.copied.synchronize()
        return int(self.host[0])


def run_steps(
    em: Emitter,
    device: torch.device,
    spec: LoopSpec,
    step_fn: Callable[[int], torch.Tensor | None],
    tokens_per_step: int | Callable[[int], int],
    extra: Callable[[int], dict[str, Any]] | None = None,
    phase: Callable[[str, str | None], None] | None = None,
    compiled: bool = False,
    memory_profile: int = 0,
) -> dict[str, Any]:
    """Run ``step_fn(i)`` until ``spec`` says stop; emit one ``step`` event per step, and through ``phase``
    where the loop is: compiling (the first step, when ``compiled``) or warm-up, then measuring.

    ``step_fn`` returns a scalar tensor (a loss) or None; it is read after the step's timing ends.
    ``tokens_per_step``: the tokens of every step, or a function of the step index giving each step's.
    The first step is flagged ``first`` (it includes compilation when compiled). Returns counts and
    whether the loop was interrupted (SIGINT: the console's cancel). Under several ranks every rank stops
    after the same step: ``--steps`` is counted alike everywhere; the duration and a cancel are rank 0's
    decision, taken one boundary later (SharedStop); ``interrupted`` is then true on every rank.
    ``memory_profile`` N: rank 0 records CUDA memory history over steps 1..N (``workloads.memprofile``), outside
    the steps' timing, and sends the ``memory`` event; the result's ``peak_before_profile`` is torch's peak before
    the window (the window resets that counter).
    """
    cuda = device.type == "cuda"
    shared = SharedStop(device) if SharedStop.wanted() else None
    pending: tuple[int, Any, Any, float, torch.Tensor | None] | None = None
    steady_steps = 0
    steady_seconds = 0.0
    first_ms: float | None = None
    interrupted = False
    i = 0
    profile = None
    if memory_profile and em.rank == 0:
        from workloads.memprofile import StepProfile

        profile = StepProfile.start(memory_profile, device, em.memory)

    def report(item: tuple[int, Any, Any, float, torch.Tensor | None]) -> float:
        nonlocal steady_steps, steady_seconds, first_ms
        idx, start, end, t0, loss = item
        if cuda:
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = (end - t0) * 1000.0
        warm = idx < spec.warmup
        fields: dict[str, Any] = {"warmup": warm}
        if idx == 0:
            fields["first"] = True
            first_ms = ms
        if loss is not None:
            fields["loss"] = float(loss.detach().float().item())
        fields.update(memory_fields(device))
        if profile is not None and "mem_peak_mb" in fields:  # the window reset torch's peak counter
            fields["mem_peak_mb"] = profile.peak(torch.cuda.max_memory_allocated(device)) / (1024 * 1024)
        if extra is not None:
            fields.update(extra(idx))
        tokens = tokens_per_step(idx) if callable(tokens_per_step) else tokens_per_step
        em.step(idx, ms, tokens, clock=CLOCK_DEVICE if cuda else CLOCK_HOST, **fields)
        if not warm:
            steady_steps += 1
            steady_seconds += ms / 1000.0
        return ms

    measured_from = max(spec.warmup, 1)  # the first step never counts as steady
    try:
        while True:
            if phase is not None and i == 0:
                phase("compiling" if compiled else "warm-up", "the first step" if compiled else None)
            elif phase is not None and compiled and i == 1 and measured_from > 1:
                phase("warm-up", None)
            if phase is not None and i == measured_from:
                phase("measuring", None)
            if profile is not None:
                profile.before(i)
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                loss = step_fn(i)
                end.record()
                item = (i, start, end, 0.0, loss)
            else:
                t0 = time.perf_counter()
                loss = step_fn(i)
                item = (i, None, time.perf_counter(), t0, loss)
            if profile is not None:
                profile.after(i)
            if pending is not None:
                report(pending)
            pending = item
            i += 1
            steady = i - spec.warmup
            if shared is None:
                if steady > 0 and spec.done(steady, steady_seconds):
                    break
                continue
            decision = shared.received()
            if decision:
                interrupted = decision == SharedStop.CANCEL
                break
            if steady > 0 and spec.steps_done(steady):
                break
            shared.send(steady > 0 and spec.done(steady, steady_seconds))
        report(pending)
        pending = None
    except KeyboardInterrupt:  # one rank alone (several ranks hold SIGINT)
        interrupted = True
    finally:
        if profile is not None:  # a window the loop cut short ends at its last step
            profile.close()
    if interrupted:
        print("btune: interrupted; stopping after the last complete step", file=sys.stderr)
    return {"steps": i, "steady_steps": steady_steps, "steady_seconds": steady_seconds, "first_step_ms": first_ms,
            "interrupted": interrupted,
            "peak_before_profile": profile.window.peak_before if profile is not None else None}
