"""The KV-cache engine: runs a scheduler plan on the model and returns the tokens it produced.

Both passes are the model's own forward (``forward.py``). With a compile mode each block runs compiled, one
graph shared by every layer (the weights are its inputs), so compiling costs one block, not the model:

- prefill (one request's chunk at a time: chunks are long and compute-bound): the block compiled for any chunk
  length, around the eager cache write and attention (the model's kernel and mask);
- decode: the block compiled whole (attention included) for each bucket's batch, on slots 0..b-1, b the
  smallest bucket (powers of two, then ``max_batch``) that covers every decoding slot, so its shapes come from
  a short fixed list that warm-up compiles and captures before the load starts. Each bucket reads its inputs
  from one device buffer that never moves (filled by one copy from pinned host memory).

CUDA graphs (``reduce-overhead``, ``max-autotune``) are captured here, one per bucket over the whole step (the
compiled blocks and the eager embedding, masks and head between them), in one shared memory pool: a step is
then one copy and one ``CUDAGraph.replay``, with no guard checks on the host while the GPU waits.

Look-ahead (on a GPU, one process): when a step's decode batch is sure to decode again unchanged (no request
finishes with this token, no prompt completes in this step), ``run`` queues the next decode step on the device
before it reads this step's tokens: that step's input tokens are this step's outputs, copied on the device, its
positions one further. The GPU then goes from one step to the next without waiting for the host (reading the
tokens, the scheduler, the next plan). The next ``run`` takes the queued step when its plan decodes the same
requests at those positions, and otherwise leaves it unused: it wrote each slot's key and value for the token
that slot was given, which the slot's next decode (or a new request's prefill, queued after it) writes again.

In a tensor-parallel replica (a ``StepChannel``) the leader's ``run`` broadcasts each step's work before
running it, and the other ranks run the same work in ``follow`` until the leader stops them (no look-ahead).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from workloads.engine import decode_attention
from workloads.engine.cache import SlotKVCache
from workloads.engine.forward import FLEX_BLOCK, DecodeStep, prefill_chunk
from workloads.engine.request import Request
from workloads.engine.scheduler import Plan
from workloads.engine.work import StepChannel, Work
from workloads.models import boundaries
from workloads.models.attention import AttentionKernel
from workloads.models.kv_cache import Attend
from workloads.models.transformer import RunBlock, Transformer

# compile modes whose decode runs as CUDA graphs, and the inductor mode each graph is captured over
GRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


#: tune the decode step's Triton kernels' block sizes by coordinate descent (benchmarks/decode_ab.py's ``nocd``
#: turns it off to measure what it gains)
COORDINATE_DESCENT = True


def decode_options(mode: str) -> dict[str, Any]:
    """Inductor's options for the decode step: ``mode``'s own, with coordinate-descent tuning of its Triton
    kernels' block sizes where ``COORDINATE_DESCENT`` (batch-1 decode of llama-3.1-8b on an H100: 6.32 to 5.83 ms,
    docs/benchmarks.md)."""
    return {**torch._inductor.list_mode_options(mode), "coordinate_descent_tuning": COORDINATE_DESCENT}


def _decode_block(layer: torch.nn.Module, h: torch.Tensor, rope: Any, attend: Attend) -> torch.Tensor:
    """A block of a decode step (compiled whole, per bucket)."""
    return layer(h, rope, attend)


def _prefill_block(layer: torch.nn.Module, h: torch.Tensor, rope: Any, attend: Attend) -> torch.Tensor:
    """A block of a prefill chunk (compiled for any chunk length; its attention stays eager)."""
    return layer(h, rope, attend)


class EagerAttend:
    """An ``Attend`` kept out of the compiled block around it (``torch.compiler.disable``: a graph break)."""

    writes_cache = True

    def __init__(self, inner: Attend) -> None:
        self.inner = inner
        self.run = _EAGER.setdefault("call", torch.compiler.disable(lambda a, q, k, v: a(q, k, v)))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.run(self.inner, q, k, v)


_EAGER: dict[str, Any] = {}


def compiled_blocks(mode: str, options: dict[str, Any]) -> tuple[RunBlock, RunBlock]:
    """(decode, prefill) block runners compiled for ``mode``: decode with static shapes (one compile per bucket),
    prefill with the chunk length dynamic."""
    dynamo = torch._dynamo.config
    # one entry per decode bucket and per prefill shape class, all on the one block graph
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), 64))
    decode = torch.compile(_decode_block, options=options, dynamic=False)
    prefill = torch.compile(_prefill_block, mode=None if mode in GRAPH_MODES else mode)

    def run_prefill(layer: torch.nn.Module, h: torch.Tensor, rope: Any, attend: Attend) -> torch.Tensor:
        tensors = [h, *(rope or ())]
        for t in tensors:  # the chunk length: compiled for any (a length of 1 stays its own graph)
            if t.shape[1] > 1:
                torch._dynamo.maybe_mark_dynamic(t, 1)
        if h.shape[0] > 1:  # several slots' chunks in one call: any number of rows
            torch._dynamo.maybe_mark_dynamic(h, 0)
        return prefill(layer, h, rope, attend)

    return decode, run_prefill


def buckets(max_batch: int, smallest: int = 1) -> list[int]:
    """Decode batch sizes: powers of two from ``smallest`` below ``max_batch``, then ``max_batch``."""
    out, b = [], max(1, smallest)
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


@dataclass
class Ahead:
    """A decode step queued before its plan was made: its bucket, the (request, slot, position) it decodes and
    its output tokens on the device."""

    bucket: int
    key: tuple[tuple[int, int, int], ...]
    out: torch.Tensor


def decode_key(decode: list[Request], ahead: int = 0) -> tuple[tuple[int, int, int], ...]:
    """What a decode batch is: each request's id, slot and fed position (``ahead`` steps on)."""
    return tuple((r.rid, r.slot if r.slot is not None else -1, r.position + ahead) for r in decode)


def repeats(plan: Plan) -> bool:
    """Whether the next plan decodes exactly ``plan``'s decode requests, each one position on: none finishes
    with this step's token and no prompt completes here (so no request joins the decode)."""
    return bool(plan.decode) and all(len(r.tokens) + 1 < r.output_len for r in plan.decode) and \
        all(start + n < r.prompt_len for r, start, n in plan.prefill)


class Engine:
    """A model, its slot KV cache, and the prefill and decode steps over them."""

    def __init__(self, model: Transformer, kernel: AttentionKernel, max_batch: int, cache_len: int,
                 device: torch.device, dtype: torch.dtype, compile_mode: str = "none",
                 autocast: Callable[[], AbstractContextManager] = nullcontext, pad_multiple: int = 1,
                 channel: StepChannel | None = None,
                 no_backward: Callable[[], AbstractContextManager] = torch.inference_mode,
                 lookahead: bool | None = None) -> None:
        cfg = model.cfg
        self.model, self.kernel, self.device, self.autocast = model, kernel, device, autocast
        self.no_backward = no_backward  # the grad mode of every step (build.Built.no_backward)
        self.pad_multiple, self.channel = pad_multiple, channel
        # decode attention (forward.DECODE_MODES): flex where asked; by default on a GPU the split-KV kernels
        # (both read only each slot's live keys); matmuls or the forced SDPA kernel over the whole cache otherwise
        mode = "flex" if kernel.backend == "flex" else "dense"
        if kernel.backend == "auto" and device.type == "cuda":
            mode = "split" if decode_attention.available(cfg.head_dim) else "dense"
        multiple = FLEX_BLOCK if mode == "flex" else 64
        attn = model.layers[0].attn
        kv_heads = attn.layout.groups(attn.wqkv.weight.shape[0])  # this rank's, under tensor parallelism
        # padded GEMMs (FP8 via Transformer Engine) decode at least `pad_multiple` rows; rows past max_batch idle
        rows = max(max_batch, pad_multiple)
        self.cache = SlotKVCache(cfg.n_layers, rows, kv_heads, cache_len, cfg.head_dim, device, dtype,
                                 multiple, spare=pad_multiple)
        if self.cache.positions > cfg.max_seq_len:
            raise ValueError(f"the KV cache's {self.cache.positions} positions exceed the model's max_seq_len "
                             f"{cfg.max_seq_len}")
        self.buckets = buckets(rows, pad_multiple)
        cuda = device.type == "cuda"
        # per bucket: the decode inputs (tokens, positions, write positions) on the device, and a host stage
        self._io = {b: torch.zeros(3, b, dtype=torch.long, device=device) for b in self.buckets}
        self._stage = {b: torch.zeros(3, b, dtype=torch.long, pin_memory=cuda) for b in self.buckets}
        #: queue the next decode step before reading this one's tokens (module docstring); default on a GPU
        self.lookahead = (cuda if lookahead is None else lookahead) and channel is None
        self._ahead: Ahead | None = None
        self.launched_ahead = False  #: whether the last ``run``'s decode had been queued by the run before it
        self.ahead_counts = {"queued": 0, "used": 0}  #: decode steps queued ahead, and taken by the next run
        # the queued steps' inputs, two host stages a bucket in turn: one may still be on its way to the device
        # while the next is written
        self._ahead_stage = {b: [torch.zeros(3, b, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
                             for b in self.buckets}
        self._turn = 0
        self._tokens = {b: torch.zeros(b, dtype=torch.long, pin_memory=cuda) for b in self.buckets}
        self._read = torch.cuda.Event() if cuda else None
        self.graphs = cuda and compile_mode in GRAPH_MODES
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.decode_options: dict[str, Any] = {}
        decode_block: RunBlock | None = None
        self._prefill_block: RunBlock | None = None
        self._wrap: Any = None
        if compile_mode != "none":
            # specialised per bucket; the graphs are captured below, so inductor makes none of its own
            self.decode_options = decode_options(GRAPH_MODES.get(compile_mode, compile_mode))
            decode_block, prefill_block = compiled_blocks(compile_mode, self.decode_options)
            if pad_multiple == 1:
                self._prefill_block, self._wrap = prefill_block, EagerAttend
        if device.type == "cuda":  # the inference kernels, registered outside traced code
            boundaries.prepare()
        self.step_module = DecodeStep(model, self.cache, kernel.backend, kernel.window, mode=mode,
                                      run_block=decode_block)
        self._decode: Any = self.step_module

    @property
    def prefill_mode(self) -> str:
        """How prefill runs, for the run record."""
        if self._prefill_block is not None:
            return "compiled: each block one graph for every layer, around the eager cache write and attention"
        return "none (eager)"

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _prefill(self, slot: int, start: int, tokens: torch.Tensor) -> torch.Tensor:
        return self._prefill_rows([slot], start, tokens[None])

    def _prefill_rows(self, slots: list[int], start: int, tokens: torch.Tensor) -> torch.Tensor:
        """Prefill chunks tokens [k, n] of ``slots``, all at ``start``, in one forward (one pass over the weights);
        each row's next token [k]."""
        n = tokens.shape[1]
        pad = -n % self.pad_multiple
        if pad:
            tokens = F.pad(tokens, (0, pad))
        where: int | torch.Tensor = slots[0] if len(slots) == 1 else torch.tensor(slots, device=self.device)
        return prefill_chunk(self.model, self.cache, where, tokens, start, n - 1, self._prefill_block, self._wrap)

    def _prefills(self, chunks: list[tuple[int, int, torch.Tensor]]) -> list[torch.Tensor]:
        """Each chunk's next token [1], in order; chunks of one start and length run as one forward."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, start, tokens) in enumerate(chunks):
            groups.setdefault((start, tokens.numel()), []).append(i)
        out: list[torch.Tensor] = [torch.empty(0)] * len(chunks)
        for (start, _), idx in groups.items():
            nxt = self._prefill_rows([chunks[i][0] for i in idx], start, torch.stack([chunks[i][2] for i in idx]))
            for row, i in enumerate(idx):
                out[i] = nxt[row:row + 1]
        return out

    def _decode_bucket(self, b: int, inputs: torch.Tensor) -> torch.Tensor:
        """Decode bucket b from ``inputs`` [3, b] (host stage or device; the previous step has finished)."""
        self._io[b].copy_(inputs, non_blocking=True)
        return self._launch(b)

    def _launch(self, b: int) -> torch.Tensor:
        """Decode bucket b from its device inputs as they stand; its next tokens [b]."""
        io = self._io[b]
        if b in self._graphs:
            graph, out = self._graphs[b]
            graph.replay()
            return out
        if not self.graphs:
            return self._decode(io)
        # compile and warm up on a side stream (as torch.cuda.graphs asks), then capture
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._decode(io)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._decode(io)
        self._graphs[b] = (graph, out)
        graph.replay()
        return out

    def _stage_idle(self, b: int, stage: torch.Tensor | None = None) -> torch.Tensor:
        """Bucket b's host stage (or ``stage``) with every slot idle (token 0 at position 0, keys to the scratch
        column)."""
        stage = self._stage[b] if stage is None else stage
        view = stage.numpy()
        view[0:2] = 0
        view[2] = self.cache.scratch
        return stage

    def _work(self, plan: Plan, decode: bool = True) -> Work:
        """The plan as device work: the decode bucket's inputs staged on the host (unless not ``decode``), the
        prompt chunks' tokens."""
        work = Work(prefill=[(r.slot, start, r.prompt[start:start + n]) for r, start, n in plan.prefill])
        if plan.decode and decode:
            b = self.bucket(max(r.slot for r in plan.decode if r.slot is not None) + 1)
            stage = self._stage_idle(b)
            view = stage.numpy()
            for r in plan.decode:
                pos = r.position
                view[0, r.slot], view[1, r.slot], view[2, r.slot] = r.tokens[-1], pos, pos
            work.bucket, work.stage = b, stage
        return work

    def _execute(self, work: Work) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Run ``work``: the decode's next tokens [b] (None without one) and each prefill chunk's next token."""
        with self.no_backward(), self.autocast():
            nxt = self._decode_bucket(work.bucket, work.stage) if work.stage is not None else None
            firsts = self._prefills(work.prefill)
        return nxt, firsts

    def _queue_next(self, plan: Plan, b: int, nxt: torch.Tensor) -> list[int]:
        """Copy this step's tokens ``nxt`` [b] out, queue the next decode step of ``plan.decode`` (their tokens
        fed on the device, positions one on) and return this step's tokens once they are on the host."""
        host = self._tokens[b]
        host.copy_(nxt, non_blocking=True)
        if self._read is not None:
            self._read.record()
        self._turn ^= 1
        stage = self._stage_idle(b, self._ahead_stage[b][self._turn])
        view = stage.numpy()
        for r in plan.decode:
            assert r.slot is not None
            view[1, r.slot] = view[2, r.slot] = r.position + 1
        io = self._io[b]
        io.copy_(stage, non_blocking=True)
        io[0].copy_(nxt)  # on the device: the next step's tokens are this step's outputs
        with self.no_backward(), self.autocast():
            self._ahead = Ahead(b, decode_key(plan.decode, 1), self._launch(b))
        self.ahead_counts["queued"] += 1
        if self._read is not None:
            self._read.synchronize()
        return host.tolist()

    def run(self, plan: Plan) -> list[tuple[Request, int]]:
        """One step: the decode of ``plan.decode``, then its prefill chunks; returns once its tokens are on the
        host (with look-ahead the next decode step may be running then). In a tensor-parallel replica only the
        leader calls this; it shares the step with the ranks in ``follow``."""
        ahead, self._ahead = self._ahead, None
        self.launched_ahead = ahead is not None and bool(plan.decode) and ahead.key == decode_key(plan.decode)
        if self.launched_ahead:
            assert ahead is not None
            self.ahead_counts["used"] += 1
            _, firsts = self._execute(self._work(plan, decode=False))  # the decode is on the device already
            b, nxt = ahead.bucket, ahead.out
        else:
            work = self._work(plan)
            if self.channel is not None:
                work = self.channel.send(work)
            b = work.bucket
            nxt, firsts = self._execute(work)
        out: list[tuple[Request, int]] = []
        if nxt is not None:
            values = self._queue_next(plan, b, nxt) if self.lookahead and repeats(plan) else nxt.tolist()
            out += [(r, int(values[r.slot])) for r in plan.decode if r.slot is not None]
        done = [(r, tok) for (r, start, n), tok in zip(plan.prefill, firsts, strict=True) if start + n == r.prompt_len]
        if done:
            values = torch.cat([t for _, t in done]).tolist()
            out += [(r, int(v)) for (r, _), v in zip(done, values, strict=True)]
        if self._ahead is None:
            self._sync()
        return out

    def follow(self) -> int:
        """A tensor-parallel follower: run the leader's steps until it says stop; returns the step count."""
        assert self.channel is not None and not self.channel.leader
        steps = 0
        while (work := self.channel.recv()) is not None:
            self._execute(work)
            steps += 1
        self._sync()
        return steps

    def stop_followers(self) -> None:
        """The leader's last word to its followers (no-op without a tensor-parallel group)."""
        if self.channel is not None and self.channel.leader:
            self.channel.stop()
            self._sync()

    def close(self) -> None:
        """Release the captured CUDA graphs (NCCL cannot tear down a communicator that live graphs still use)."""
        self._ahead = None
        self._sync()
        self._graphs.clear()
        self._pool = None

    def warmup(self, rounds: int, on_step: Callable[[float, dict[str, Any]], None] | None = None,
               on_shape: Callable[[int, int, str], None] | None = None) -> float:
        """Compile and capture every decode bucket, and run a first, a continuation and a one-token prefill chunk
        (and two slots' chunks in one call), ``rounds`` times each (idle slots only: nothing live in the cache is
        touched); ``on_shape(k, n, what)`` before each shape. Returns the seconds it took."""
        t_all = time.perf_counter()
        n = max(1, min(16, self.cache.cache_len // 2))
        # prefill: a first chunk, a continuation (attention under a mask) of another length (the compiled pieces
        # around the eager attention see two lengths, so they are compiled for any before the load) and a
        # one-token chunk, on slot 0
        prefills: list[tuple[str, Any]] = [("prefill", (0, n, 1)), ("prefill", (n, max(1, n - 1), 1)),
                                           ("prefill", (0, 1, 1))]
        if len(self.cache.k[0]) > 1:  # chunks of one start and length from two slots: one call of two rows
            prefills.append(("prefill", (0, n, 2)))
        shapes: list[tuple[str, Any]] = prefills + [("decode", b) for b in self.buckets]
        for k, (kind, size) in enumerate(shapes, 1):
            if on_shape is not None:
                on_shape(k, len(shapes), f"decode batch {size}" if kind == "decode" else "prefill")
            for _ in range(rounds):
                t0 = time.perf_counter()
                with self.no_backward(), self.autocast():
                    if kind == "prefill":
                        start, length, rows = size
                        tokens = torch.zeros(rows, length, dtype=torch.long, device=self.device)
                        self._prefill_rows(list(range(rows)), start, tokens).tolist()
                    else:
                        self._decode_bucket(size, self._stage_idle(size)).tolist()
                self._sync()
                if on_step is not None:
                    on_step((time.perf_counter() - t0) * 1000.0,
                            {"phase": f"warmup-{kind}", "batch": size} if kind == "decode"
                            else {"phase": "warmup-prefill", "start": size[0], "prefill_tokens": size[1] * size[2]})
        return time.perf_counter() - t_all
