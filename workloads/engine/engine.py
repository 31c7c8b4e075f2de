"""The KV-cache engine: runs a scheduler plan on the model and returns the tokens it produced.

Prefill runs eager, one request's chunk at a time (chunks are long and compute-bound). The decode step
is compiled with the requested mode (``reduce-overhead``: CUDA graphs) and runs on slots 0..b-1, b the
smallest bucket (powers of two, then ``max_batch``) that covers every decoding slot, so its shapes come
from a short fixed list that warm-up compiles and captures before the load starts.
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
from workloads.engine.request import Request
from workloads.engine.scheduler import Plan
from workloads.models.attention import AttentionKernel
from workloads.models.transformer import Transformer


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
                 autocast: Callable[[], AbstractContextManager] = nullcontext, pad_multiple: int = 1) -> None:
        cfg = model.cfg
        self.model, self.kernel, self.device, self.autocast = model, kernel, device, autocast
        self.pad_multiple = pad_multiple
        multiple = FLEX_BLOCK if kernel.backend == "flex" else 64
        kv_heads = model.layers[0].attn.wk.weight.shape[0] // cfg.head_dim
        # padded GEMMs (FP8 via Transformer Engine) decode at least `pad_multiple` rows; rows past max_batch idle
        rows = max(max_batch, pad_multiple)
        self.cache = SlotKVCache(cfg.n_layers, rows, kv_heads, cache_len, cfg.head_dim, device, dtype,
                                 multiple, spare=pad_multiple)
        if self.cache.positions > cfg.max_seq_len:
            raise ValueError(f"the KV cache's {self.cache.positions} positions exceed the model's max_seq_len "
                             f"{cfg.max_seq_len}")
        self.step_module = DecodeStep(model, self.cache, kernel.backend, kernel.window)
        self.compiled = compile_mode != "none"
        if self.compiled:
            if device.type == "cuda":  # CUDA graphs then read and write them in place
                self.cache.mark_static()
                for buf in self.step_module.buffers(recurse=False):
                    torch._dynamo.mark_static_address(buf)
            self._decode: Any = torch.compile(self.step_module, mode=compile_mode)
        else:
            self._decode = self.step_module
        self.buckets = buckets(rows, pad_multiple)

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _prefill(self, req: Request, start: int, n: int) -> torch.Tensor:
        tokens = req.prompt[start:start + n]
        pad = -n % self.pad_multiple
        if pad:
            tokens = F.pad(tokens, (0, pad))
        assert req.slot is not None
        return prefill_chunk(self.model, self.kernel, self.cache, req.slot, tokens[None], start, n - 1)

    def _decode_rows(self, rows: list[list[int]]) -> torch.Tensor:
        t = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        bm = self.step_module.block_mask(len(rows[0])) if self.kernel.backend == "flex" else None
        return self._decode(t[0], t[1], t[2], bm)

    def _decode_step(self, reqs: list[Request]) -> torch.Tensor:
        b = self.bucket(max(r.slot for r in reqs if r.slot is not None) + 1)
        rows = [[0] * b, [0] * b, [self.cache.scratch] * b]
        for r in reqs:
            assert r.slot is not None
            rows[0][r.slot], rows[1][r.slot], rows[2][r.slot] = r.tokens[-1], r.position, r.position
        return self._decode_rows(rows)

    def run(self, plan: Plan) -> list[tuple[Request, int]]:
        """One step: the decode of ``plan.decode``, then its prefill chunks; waits for the device."""
        firsts: list[tuple[Request, torch.Tensor]] = []
        with torch.inference_mode(), self.autocast():
            nxt = self._decode_step(plan.decode) if plan.decode else None
            for r, start, n in plan.prefill:
                tok = self._prefill(r, start, n)
                if start + n == r.prompt_len:
                    firsts.append((r, tok))
        out: list[tuple[Request, int]] = []
        if nxt is not None:
            values = nxt.tolist()
            out += [(r, int(values[r.slot])) for r in plan.decode if r.slot is not None]
        if firsts:
            values = torch.cat([t for _, t in firsts]).tolist()
            out += [(r, int(v)) for (r, _), v in zip(firsts, values, strict=True)]
        self._sync()
        return out

    def warmup(self, rounds: int, on_step: Callable[[float, dict[str, Any]], None] | None = None) -> float:
        """Compile and capture every decode bucket, and run a prefill chunk, ``rounds`` times each (idle
        slots only: nothing live in the cache is touched). Returns the seconds it took."""
        t_all = time.perf_counter()
        n = min(16, self.cache.cache_len)
        dummy = torch.zeros(n, dtype=torch.long, device=self.device)
        shapes: list[tuple[str, int]] = [("prefill", n)] + [("decode", b) for b in self.buckets]
        for kind, size in shapes:
            for _ in range(rounds):
                t0 = time.perf_counter()
                with torch.inference_mode(), self.autocast():
                    if kind == "prefill":
                        tokens = F.pad(dummy, (0, -n % self.pad_multiple))
                        prefill_chunk(self.model, self.kernel, self.cache, 0, tokens[None], 0, n - 1).tolist()
                    else:
                        self._decode_rows([[0] * size, [0] * size, [self.cache.scratch] * size]).tolist()
                self._sync()
                if on_step is not None:
                    on_step((time.perf_counter() - t0) * 1000.0, {"phase": f"warmup-{kind}", "batch": size})
        return time.perf_counter() - t_all
