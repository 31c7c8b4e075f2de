"""The KV-cache engine: runs a scheduler plan on the model and returns the tokens it produced.

Prefill runs one request's chunk at a time (chunks are long and compute-bound): with a compile mode, its norms,
RoPE and activations compiled around fused GEMMs where the model allows (``prefill.CompiledPrefill``), else
eager. The decode step
is compiled with the requested mode (``reduce-overhead``: CUDA graphs) and runs on slots 0..b-1, b the
smallest bucket (powers of two, then ``max_batch``) that covers every decoding slot, so its shapes come
from a short fixed list that warm-up compiles and captures before the load starts. Each bucket reads its
inputs from one device buffer that never moves (filled by one copy from pinned host memory).

CUDA graphs (``reduce-overhead``, ``max-autotune``) are captured here, one per bucket over inductor's
graph-free code, in one shared memory pool: a step is then one copy and one ``CUDAGraph.replay``, with no
guard checks or graph-tree bookkeeping on the host while the GPU waits.

In a tensor-parallel replica (a ``StepChannel``) the leader's ``run`` broadcasts each step's work before
running it, and the other ranks run the same work in ``follow`` until the leader stops them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from workloads.engine.cache import SlotKVCache
from workloads.engine.forward import FLEX_BLOCK, DecodeStep, prefill_chunk
from workloads.engine.prefill import CompiledPrefill
from workloads.engine.request import Request
from workloads.engine.scheduler import Plan
from workloads.engine.work import StepChannel, Work
from workloads.models.attention import AttentionKernel
from workloads.models.transformer import Transformer

# compile modes whose decode runs as CUDA graphs, and the inductor mode each graph is captured over
GRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def decode_options(mode: str) -> dict[str, Any]:
    """Inductor's options for the decode step: ``mode``'s own, with coordinate-descent tuning of its Triton
    kernels' block sizes (batch-1 decode of llama-3.1-8b on an H100: 6.32 to 5.83 ms, docs/benchmarks.md)."""
    return {**torch._inductor.list_mode_options(mode), "coordinate_descent_tuning": True}


def buckets(max_batch: int, smallest: int = 1) -> list[int]:
    """Decode batch sizes: powers of two from ``smallest`` below ``max_batch``, then ``max_batch``."""
    out, b = [], max(1, smallest)
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


class Engine:
    """A model, its slot KV cache, and the prefill and decode steps over them."""

    def __init__(self, model: Transformer, kernel: AttentionKernel, max_batch: int, cache_len: int,
                 device: torch.device, dtype: torch.dtype, compile_mode: str = "none",
                 autocast: Callable[[], AbstractContextManager] = nullcontext, pad_multiple: int = 1,
                 channel: StepChannel | None = None,
                 no_backward: Callable[[], AbstractContextManager] = torch.inference_mode) -> None:
        cfg = model.cfg
        self.model, self.kernel, self.device, self.autocast = model, kernel, device, autocast
        self.no_backward = no_backward  # the grad mode of every step (build.Built.no_backward)
        self.pad_multiple, self.channel = pad_multiple, channel
        # decode attention: flex where asked, and by default on a GPU (it reads only the live cache blocks)
        flex = kernel.backend == "flex" or (kernel.backend == "auto" and device.type == "cuda")
        multiple = FLEX_BLOCK if flex else 64
        kv_heads = model.layers[0].attn.wk.weight.shape[0] // cfg.head_dim
        # padded GEMMs (FP8 via Transformer Engine) decode at least `pad_multiple` rows; rows past max_batch idle
        rows = max(max_batch, pad_multiple)
        self.cache = SlotKVCache(cfg.n_layers, rows, kv_heads, cache_len, cfg.head_dim, device, dtype,
                                 multiple, spare=pad_multiple)
        if self.cache.positions > cfg.max_seq_len:
            raise ValueError(f"the KV cache's {self.cache.positions} positions exceed the model's max_seq_len "
                             f"{cfg.max_seq_len}")
        self.step_module = DecodeStep(model, self.cache, kernel.backend, kernel.window, flex=flex)
        self.buckets = buckets(rows, pad_multiple)
        step = self.step_module
        self._compiled_prefill = None
        if compile_mode != "none" and pad_multiple == 1 and CompiledPrefill.supports(model, step.qkv, step.gate_up):
            self._compiled_prefill = CompiledPrefill(model, kernel, self.cache, step.qkv, step.gate_up)
        cuda = device.type == "cuda"
        # per bucket: the decode inputs (tokens, positions, write positions) on the device, and a host stage
        self._io = {b: torch.zeros(3, b, dtype=torch.long, device=device) for b in self.buckets}
        self._stage = {b: torch.zeros(3, b, dtype=torch.long, pin_memory=cuda) for b in self.buckets}
        self.graphs = cuda and compile_mode in GRAPH_MODES
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.decode_options: dict[str, Any] = {}
        if compile_mode != "none":
            # specialised per bucket; the graphs are captured below, so inductor makes none of its own
            self.decode_options = decode_options(GRAPH_MODES.get(compile_mode, compile_mode))
            self._decode: Any = torch.compile(self.step_module, options=self.decode_options, dynamic=False)
        else:
            self._decode = self.step_module

    @property
    def prefill_mode(self) -> str:
        """How prefill runs, for the run record."""
        if self._compiled_prefill is not None:
            return "compiled: norms, RoPE and SiLU fused around one q/k/v and one gate/up GEMM"
        return "none (eager)"

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _prefill(self, slot: int, start: int, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.numel()
        pad = -n % self.pad_multiple
        if pad:
            tokens = F.pad(tokens, (0, pad))
        if self._compiled_prefill is not None:
            return self._compiled_prefill(slot, tokens[None], start, n - 1)
        return prefill_chunk(self.model, self.kernel, self.cache, slot, tokens[None], start, n - 1)

    def _decode_bucket(self, b: int, inputs: torch.Tensor) -> torch.Tensor:
        """Decode bucket b from ``inputs`` [3, b] (host stage or device; the previous step has finished)."""
        io = self._io[b]
        io.copy_(inputs, non_blocking=True)
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

    def _stage_idle(self, b: int) -> torch.Tensor:
        """Bucket b's host stage with every slot idle (token 0 at position 0, keys to the scratch column)."""
        stage = self._stage[b]
        view = stage.numpy()
        view[0:2] = 0
        view[2] = self.cache.scratch
        return stage

    def _work(self, plan: Plan) -> Work:
        """The plan as device work: the decode bucket's inputs staged on the host, the prompt chunks' tokens."""
        work = Work(prefill=[(r.slot, start, r.prompt[start:start + n]) for r, start, n in plan.prefill])
        if plan.decode:
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
            firsts = [self._prefill(slot, start, tokens) for slot, start, tokens in work.prefill]
        return nxt, firsts

    def run(self, plan: Plan) -> list[tuple[Request, int]]:
        """One step: the decode of ``plan.decode``, then its prefill chunks; waits for the device. In a
        tensor-parallel replica only the leader calls this; it shares the step with the ranks in ``follow``."""
        work = self._work(plan)
        if self.channel is not None:
            work = self.channel.send(work)
        nxt, firsts = self._execute(work)
        out: list[tuple[Request, int]] = []
        if nxt is not None:
            values = nxt.tolist()
            out += [(r, int(values[r.slot])) for r in plan.decode if r.slot is not None]
        done = [(r, tok) for (r, start, n), tok in zip(plan.prefill, firsts, strict=True) if start + n == r.prompt_len]
        if done:
            values = torch.cat([t for _, t in done]).tolist()
            out += [(r, int(v)) for (r, _), v in zip(done, values, strict=True)]
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
        self._sync()
        self._graphs.clear()
        self._pool = None

    def warmup(self, rounds: int, on_step: Callable[[float, dict[str, Any]], None] | None = None,
               on_shape: Callable[[int, int, str], None] | None = None) -> float:
        """Compile and capture every decode bucket, and run a first, a continuation and a one-token prefill chunk,
        ``rounds`` times each (idle slots only: nothing live in the cache is touched); ``on_shape(k, n, what)``
        before each shape. Returns the seconds it took."""
        t_all = time.perf_counter()
        n = max(1, min(16, self.cache.cache_len // 2))
        # prefill: a first chunk, a continuation (attention under a mask) and a one-token chunk, on slot 0
        prefills = [("prefill", (0, n)), ("prefill", (n, n)), ("prefill", (0, 1))]
        shapes: list[tuple[str, Any]] = prefills + [("decode", b) for b in self.buckets]
        for k, (kind, size) in enumerate(shapes, 1):
            if on_shape is not None:
                on_shape(k, len(shapes), f"decode batch {size}" if kind == "decode" else "prefill")
            for _ in range(rounds):
                t0 = time.perf_counter()
                with self.no_backward(), self.autocast():
                    if kind == "prefill":
                        start, length = size
                        self._prefill(0, start, torch.zeros(length, dtype=torch.long, device=self.device)).tolist()
                    else:
                        self._decode_bucket(size, self._stage_idle(size)).tolist()
                self._sync()
                if on_step is not None:
                    on_step((time.perf_counter() - t0) * 1000.0,
                            {"phase": f"warmup-{kind}", "batch": size} if kind == "decode"
                            else {"phase": "warmup-prefill", "start": size[0], "prefill_tokens": size[1]})
        return time.perf_counter() - t_all
