"""The serving engine on CPU: its greedy tokens equal full recompute for requests of different lengths that
arrive at different times, through continuous batching, chunked prefill and slot reuse."""

import pytest
import torch

from workloads.engine.driver import Hooks, run_load
from workloads.engine.engine import Engine, buckets
from workloads.engine.loadgen import LengthDist, OpenLoop, prompt_tokens
from workloads.engine.request import Request
from workloads.engine.scheduler import Scheduler
from workloads.models.attention import AttentionKernel
from workloads.models.config import PRESETS
from workloads.models.transformer import Transformer


class FakeClock:
    """A clock that moves ``tick`` seconds each time it is read; sleeping moves it too."""

    def __init__(self, tick: float = 1e-3) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def greedy_by_recompute(model: Transformer, prompt: torch.Tensor, n: int) -> list[int]:
    """The reference: the whole sequence through the model for every new token, no cache."""
    seq = prompt.tolist()
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def serve(model: Transformer, kernel: AttentionKernel, n: int = 9, max_batch: int = 3, budget: int = 7,
          compile_mode: str = "none", prompt: str = "uniform:1,20", output: str = "uniform:1,12", pad: int = 1):
    cache_len = 32
    eng = Engine(model, kernel, max_batch, cache_len, torch.device("cpu"), torch.float32, compile_mode,
                 pad_multiple=pad)
    sched = Scheduler(max_batch, budget, cache_len)
    gen = OpenLoop(300.0, 1.0, LengthDist.parse(prompt), LengthDist.parse(output), seed=4, num_requests=n)
    steps = []
    clock = FakeClock()

    def make(spec):
        return Request(spec, torch.from_numpy(prompt_tokens(4, spec.rid, spec.prompt_len, model.cfg.vocab_size)))

    hooks = Hooks(step=lambda i, ms, tokens, plan, t: steps.append((len(plan.decode), plan.prefill_tokens,
                                                                     [(r.rid, s, k) for r, s, k in plan.prefill])))
    res = run_load(eng, sched, gen, make, clock, clock.sleep, hooks)
    return res, steps


@pytest.mark.parametrize(
    ("name", "backend", "window"),
    [("tiny", "auto", None), ("tiny-llama", "auto", None), ("tiny-llama", "math", 5), ("tiny", "auto", 4)],
)
def test_tokens_equal_full_recompute(name, backend, window):
    torch.manual_seed(0)
    kernel = AttentionKernel(backend, window)
    model = Transformer(PRESETS[name], kernel).eval()
    res, steps = serve(model, kernel)
    assert res.stopped == "drained" and not res.unfinished and len(res.requests) == 9
    for r in res.requests:
        assert r.tokens == greedy_by_recompute(model, r.prompt, r.output_len), f"request {r.rid}"
        assert len(r.token_times) == r.output_len and r.finish == r.token_times[-1]
    # the scenario exercised what it is meant to
    assert any(d and p for d, p, _ in steps), "a request joined between decode steps of others"
    assert any(s > 0 for _, _, chunks in steps for _, s, _ in chunks), "a prompt was chunked"
    assert max(d for d, _, _ in steps) == 3 and all(p <= 7 for _, p, _ in steps)
    arrivals = sorted({r.arrival for r in res.requests})
    assert len(arrivals) == 9


def test_padded_chunks_and_rows_give_the_same_tokens():
    """The FP8 (Transformer Engine) layout: prefill chunks padded to 16 tokens, decode on at least 16 rows."""
    torch.manual_seed(0)
    kernel = AttentionKernel("auto")
    model = Transformer(PRESETS["tiny-llama"], kernel).eval()
    res, _ = serve(model, kernel, n=6, pad=16)
    for r in res.requests:
        assert r.tokens == greedy_by_recompute(model, r.prompt, r.output_len)


@pytest.mark.slow
def test_compiled_decode_equals_eager():
    torch.manual_seed(0)
    kernel = AttentionKernel("auto")
    model = Transformer(PRESETS["tiny-llama"], kernel).eval()
    res, _ = serve(model, kernel, n=5, compile_mode="default")
    for r in res.requests:
        assert r.tokens == greedy_by_recompute(model, r.prompt, r.output_len)


@pytest.mark.slow
def test_flex_decode_equals_full_recompute():
    torch.manual_seed(0)
    kernel = AttentionKernel("flex")
    model = Transformer(PRESETS["tiny-llama"], kernel).eval()
    res, _ = serve(model, kernel, n=4, max_batch=2, budget=64, prompt="fixed:12", output="uniform:2,6")
    ref = Transformer(PRESETS["tiny-llama"], AttentionKernel("math")).eval()  # same weights, no flex compiles
    ref.load_state_dict(model.state_dict())
    for r in res.requests:
        assert r.tokens == greedy_by_recompute(ref, r.prompt, r.output_len)


def test_decode_buckets():
    assert buckets(1) == [1]
    assert buckets(32) == [1, 2, 4, 8, 16, 32]
    assert buckets(24) == [1, 2, 4, 8, 16, 24]
    assert buckets(8, smallest=16) == [8]
    assert buckets(40, smallest=16) == [16, 32, 40]
