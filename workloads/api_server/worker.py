"""The model, and the one thread that owns it: requests come in through a thread-safe queue, the thread admits them
into the Scheduler and runs engine steps as fast as it can while work exists, and hands each new token to the
asyncio loop (``loop.call_soon_threadsafe``) into the request's own ``asyncio.Queue``."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from workloads.api_server.spec import cache_len
from workloads.engine.engine import Engine
from workloads.engine.loadgen import RequestSpec
from workloads.engine.request import Request
from workloads.engine.scheduler import Scheduler
from workloads.specs.serve import position_room

#: What a job's queue gets after its last token (or instead of more tokens, an ``Exception``).
DONE = None


def build_engine(opts: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Engine:
    """The model of ``opts`` (a preset's weights seeded by --seed, or --checkpoint's) through workloads.build, behind
    the serving engine; ValueError (one line) for what cannot run."""
    from workloads.build import build
    from workloads.models.config import PRESETS
    from workloads.models.transformer import Transformer

    n = cache_len(opts)
    room = position_room(n)
    ckpt = opts.get("checkpoint") or ""
    if ckpt:
        from workloads import checkpoint as ck

        cfg, _ = ck.read_dense(ckpt, opts.get("layers") or 0, "serve-api")
    else:
        cfg = PRESETS[opts["preset"]]
        if opts.get("layers"):
            cfg = cfg.with_layers(opts["layers"])
    if room > cfg.max_seq_len:
        if cfg.arch == "gpt":
            raise ValueError(f"--max-seq-len {n}: the serving cache rounds up to {room} positions, more than the "
                             f"model's {cfg.max_seq_len} learned positions")
        cfg = replace(cfg, max_seq_len=room)  # RoPE: a longer table of the same frequencies

    def make(kernel: Any) -> Any:
        if ckpt:
            from workloads import checkpoint as ck

            return ck.load(ckpt, device, dtype, attention=kernel, overrides={"max_seq_len": cfg.max_seq_len})[0]
        torch.manual_seed(opts["seed"])
        return Transformer(cfg, attention=kernel)

    knobs = {**opts, "fp8_mode": "off", "fp8_recipe": "auto", "attention_window": cfg.sliding_window or 0}
    b = build(make, knobs, device, dtype, heads=(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim),
              seq_len=min(opts["max_prefill_tokens"], n), training=False, compile=False)
    return Engine(b.model, b.kernel, opts["max_batch"], n, device, dtype, opts["compile_mode"], b.autocast,
                  no_backward=b.no_backward)


class ApiScheduler(Scheduler):
    """The Scheduler, and a request's removal when its client goes away."""

    def cancel(self, req: Request) -> None:
        """Drop ``req`` from the queue, or free its slot (its cache rows are overwritten by the next prefill)."""
        if req in self.waiting:
            self.waiting.remove(req)
        elif req.slot is not None and self.slots[req.slot] is req:
            self.slots[req.slot] = None
            heapq.heappush(self._free, req.slot)
            req.slot = None


@dataclass(eq=False)
class Job:
    """One API request in flight: its tokens arrive in ``out`` (then DONE, or an exception)."""

    prompt: list[int]
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    request: Request | None = None


class EngineThread:
    """The background thread that owns the engine; ``submit`` and ``cancel`` are safe from any thread."""

    def __init__(self, engine: Engine, max_batch: int, max_prefill_tokens: int, cache_len: int) -> None:
        self.engine, self.cache_len = engine, cache_len
        self.sched = ApiScheduler(max_batch, max_prefill_tokens, cache_len)
        self.inbox: queue.SimpleQueue[tuple[str, Job] | None] = queue.SimpleQueue()
        self.jobs: dict[int, Job] = {}
        self.stats = {"running": 0, "waiting": 0, "finished": 0, "cancelled": 0, "steps": 0}
        self._ids = itertools.count()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="btune-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self.inbox.put(("add", job))

    def cancel(self, job: Job) -> None:
        self.inbox.put(("cancel", job))

    def stop(self) -> None:
        """End the thread after its current step (again: nothing); jobs still in flight get a RuntimeError."""
        if self._thread.is_alive():
            self.inbox.put(None)
            self._thread.join()

    def _deliver(self, items: list[tuple[Job, Any]]) -> None:
        """Hand (job, token | DONE | exception) pairs to their jobs' loop in one call."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]] = {}
        for job, item in items:
            by_loop.setdefault(job.loop, []).append((job, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                pass

    def _take(self, msg: tuple[str, Job]) -> None:
        kind, job = msg
        if kind == "add":
            rid = next(self._ids)
            prompt = torch.tensor(job.prompt, dtype=torch.long, device=self.engine.device)
            job.request = Request(RequestSpec(rid, len(job.prompt), job.max_tokens, time.perf_counter() - self._t0),
                                  prompt)
            try:
                self.sched.add(job.request)
            except ValueError as exc:  # the server checks lengths first; never let one request end the thread
                self._deliver([(job, exc)])
                return
            self.jobs[rid] = job
        elif job.request is not None and self.jobs.pop(job.request.rid, None) is not None:
            self.sched.cancel(job.request)
            self.stats["cancelled"] += 1

    def _run(self) -> None:
        stopping = False
        while not stopping:
            msgs = [self.inbox.get()] if self.sched.idle else []  # idle: sleep until a request comes
            while True:
                try:
                    msgs.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            for msg in msgs:
                if msg is None:
                    stopping = True
                else:
                    self._take(msg)
            if stopping:
                break
            plan = self.sched.plan()
            if not plan.empty:
                self._step(plan)
            self.stats.update(running=len(self.sched.running), waiting=len(self.sched.waiting))
        gone = RuntimeError("the server is shutting down")
        self._deliver([(job, gone) for job in self.jobs.values()])
        self.jobs.clear()

    def _step(self, plan: Any) -> None:
        try:
            outputs = self.engine.run(plan)
        except Exception as exc:  # the step's requests fail, the server keeps serving
            failed = RuntimeError(f"the engine failed: {type(exc).__name__}: {exc}")
            live = [self.jobs.pop(r.rid) for r in self.sched.unfinished() if r.rid in self.jobs]
            self._deliver([(job, failed) for job in live])
            self.sched = ApiScheduler(self.sched.max_batch, self.sched.max_prefill_tokens, self.cache_len)
            return
        done = self.sched.commit(plan, outputs, time.perf_counter() - self._t0)
        self.stats["steps"] += 1
        items: list[tuple[Job, Any]] = [(self.jobs[r.rid], tok) for r, tok in outputs if r.rid in self.jobs]
        for r in done:
            job = self.jobs.pop(r.rid, None)
            if job is not None:
                items.append((job, DONE))
                self.stats["finished"] += 1
        self._deliver(items)


def _put_all(batch: list[tuple[Job, Any]]) -> None:
    for job, item in batch:
        job.out.put_nowait(item)
