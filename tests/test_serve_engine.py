"""The serving engine on CPU: its greedy tokens equal full recompute for requests of different lengths that
arrive at different times, through continuous batching, chunked prefill and slot reuse."""

import itertools
from dataclasses import replace

import pytest
import torch

from workloads.engine import engine as engine_module
from workloads.engine.driver import Hooks, run_load
from workloads.engine.engine import Engine, buckets
from workloads.engine.forward import greedy
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
            seq.append(int(model(torch.tensor([seq], device=prompt.device))[0, -1].argmax()))
    return seq[len(prompt):]


def serve(model: Transformer, kernel: AttentionKernel, n: int = 9, max_batch: int = 3, budget: int = 7,
          compile_mode: str = "none", prompt: str = "uniform:1,20", output: str = "uniform:1,12", pad: int = 1,
          device: str = "cpu", cache_len: int = 32, lookahead: bool | None = None, engines: list | None = None):
    eng = Engine(model, kernel, max_batch, cache_len, torch.device(device), torch.float32, compile_mode,
                 pad_multiple=pad, lookahead=lookahead)
    if engines is not None:
        engines.append(eng)
    if compile_mode != "none":
        eng.warmup(2)
    sched = Scheduler(max_batch, budget, cache_len)
    gen = OpenLoop(300.0, 1.0, LengthDist.parse(prompt), LengthDist.parse(output), seed=4, num_requests=n)
    steps = []
    clock = FakeClock()

    def make(spec):
        prompt = torch.from_numpy(prompt_tokens(4, spec.rid, spec.prompt_len, model.cfg.vocab_size))
        return Request(spec, prompt.to(device))

    def step(i, ms, tokens, plan, t):
        steps.append((len(plan.decode), plan.prefill_tokens, [(r.rid, s, k) for r, s, k in plan.prefill]))
        if engines is not None:
            engines.append((ms, t, eng.launched_ahead))

    hooks = Hooks(step=step)
    res = run_load(eng, sched, gen, make, clock, clock.sleep, hooks)
    if compile_mode in ("reduce-overhead", "max-autotune") and device == "cuda":
        assert sorted(eng._graphs) == eng.buckets, "warm-up captured a CUDA graph for every bucket"
    return res, steps


@pytest.mark.slow
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


def test_look_ahead_decode_gives_the_same_tokens_and_times_steps_from_the_last_end():
    """Look-ahead (the GPU default, forced here on the CPU): each decode step that is sure to repeat queues the
    next before its tokens are read; the tokens still equal full recompute through arrivals, chunked prefill,
    finishes and slot reuse, and a queued step's time runs from the previous step's end."""
    torch.manual_seed(0)
    kernel = AttentionKernel("auto")
    model = Transformer(PRESETS["tiny-llama"], kernel).eval()
    engines: list[Engine] = []
    res, steps = serve(model, kernel, lookahead=True, engines=engines)
    assert res.stopped == "drained" and not res.unfinished
    for r in res.requests:
        assert r.tokens == greedy_by_recompute(model, r.prompt, r.output_len), f"request {r.rid}"
    counts = engines[0].ahead_counts
    assert counts["used"] == counts["queued"] > 10, counts  # in a load, every queued step is the next plan's decode
    assert any(d and p for d, p, _ in steps), "a request joined (prefill) while a queued decode ran"
    timing = engines[1:]
    assert sum(ahead for _, _, ahead in timing) == counts["used"]
    for (_, t0, _), (ms, t1, ahead) in itertools.pairwise(timing):
        # the fake clock ticks at every read: a step made by its call spans less than the time between step ends
        assert (ms == pytest.approx((t1 - t0) * 1000.0)) == ahead
    off: list[Engine] = []
    serve(model, kernel, lookahead=False, engines=off)
    assert off[0].ahead_counts == {"queued": 0, "used": 0}


def test_a_queued_decode_step_not_taken_leaves_the_cache_right():
    """A plan that does not decode what was queued (a request cancelled, as the API server does) runs its own
    decode; the queued step's cache writes are rewritten, so tokens stay those of full recompute."""
    torch.manual_seed(0)
    kernel = AttentionKernel("auto")
    model = Transformer(PRESETS["tiny-llama"], kernel).eval()
    eng = Engine(model, kernel, 2, 32, torch.device("cpu"), torch.float32, lookahead=True)
    gen = OpenLoop(1e6, 1.0, LengthDist.parse("fixed:5"), LengthDist.parse("fixed:8"), seed=1, num_requests=2)
    reqs = []
    for spec in gen.due(1.0):
        reqs.append(Request(spec, torch.from_numpy(prompt_tokens(1, spec.rid, 5, model.cfg.vocab_size))))
    sched = Scheduler(2, 10, 32)
    for r in reqs:
        sched.add(r)
    for step in range(6):
        plan = sched.plan()
        if step == 3:  # drop request 0 from the decode after a step that queued both
            assert eng._ahead is not None and len(plan.decode) == 2
            plan.decode = plan.decode[1:]
        sched.commit(plan, eng.run(plan), float(step))
        assert eng.launched_ahead == (step in (2, 5)), step  # 3 and 4 decode other batches
    a, b = reqs
    assert a.tokens == greedy_by_recompute(model, a.prompt, 8)[:len(a.tokens)] and len(a.tokens) == 5
    assert b.tokens == greedy_by_recompute(model, b.prompt, 8)[:len(b.tokens)] and len(b.tokens) == 6
    assert eng.ahead_counts["queued"] > eng.ahead_counts["used"]


@pytest.mark.slow
def test_padded_chunks_and_rows_give_the_same_tokens():
    """The FP8 (Transformer Engine) layout: prefill chunks padded to 16 tokens, decode on at least 16 rows."""
    torch.manual_seed(0)
    kernel = AttentionKernel("auto")
    model = Transformer(PRESETS["tiny-llama"], kernel).eval()
    res, _ = serve(model, kernel, n=6, pad=16)
    for r in res.requests:
        assert r.tokens == greedy_by_recompute(model, r.prompt, r.output_len)


@pytest.mark.slow
def test_compiled_decode_equals_eager_with_one_graph_for_every_layer():
    """Compiled blocks (decode per bucket, prefill for any chunk length) give full recompute's tokens, and the
    graphs compiled do not grow with the layers: every layer runs the same ones."""
    kernel = AttentionKernel("auto")
    counters = torch._dynamo.utils.counters
    graphs = {}
    for layers in (2, 4):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = Transformer(PRESETS["tiny-llama"].with_layers(layers), kernel).eval()
        res, _ = serve(model, kernel, n=5, max_batch=2, compile_mode="default")  # decode buckets 1, 2
        for r in res.requests:
            assert r.tokens == greedy_by_recompute(model, r.prompt, r.output_len)
        graphs[layers] = counters["stats"]["unique_graphs"]
    assert graphs[2] == graphs[4] > 0, graphs


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, 150])
def test_flex_decode_equals_full_recompute(window):
    """Flex decode visits each slot's live key blocks only (here 3 blocks of 128, and a window that starts
    past the first): the tokens still equal full recompute."""
    torch.manual_seed(0)
    kernel = AttentionKernel("flex", window)
    cfg = replace(PRESETS["tiny-llama"], max_seq_len=384)
    model = Transformer(cfg, kernel).eval()
    res, _ = serve(model, kernel, n=5, max_batch=2, budget=512, prompt="uniform:200,265", output="uniform:2,30",
                   cache_len=300)
    assert max(r.prompt_len + r.output_len for r in res.requests) > 256, "some slot reached the third block"
    ref = Transformer(cfg, AttentionKernel("math", window)).eval()  # same weights, no flex
    ref.load_state_dict(model.state_dict())
    for r in res.requests:
        assert r.tokens == greedy_by_recompute(ref, r.prompt, r.output_len)


@pytest.mark.slow
def test_equal_chunks_of_several_slots_prefill_in_one_call_with_the_same_tokens(monkeypatch):
    """Prompts of one length arriving together prefill as one forward of several rows (one pass over the weights)
    and still give full recompute's tokens."""
    torch.manual_seed(0)
    kernel = AttentionKernel("auto")
    model = Transformer(PRESETS["tiny-llama"], kernel).eval()
    rows: list[int] = []
    real = Engine._prefill_rows

    def spy(self, slots, start, tokens):  # the real call, its row count noted
        rows.append(len(slots))
        return real(self, slots, start, tokens)

    monkeypatch.setattr(Engine, "_prefill_rows", spy)
    res, _ = serve(model, kernel, n=6, max_batch=3, budget=36, prompt="fixed:12", output="uniform:1,8")
    assert max(rows) >= 2, rows
    for r in res.requests:
        assert r.tokens == greedy_by_recompute(model, r.prompt, r.output_len)


def test_decode_buckets():
    assert buckets(1) == [1]
    assert buckets(32) == [1, 2, 4, 8, 16, 32]
    assert buckets(24) == [1, 2, 4, 8, 16, 24]
    assert buckets(8, smallest=16) == [8]
    assert buckets(40, smallest=16) == [16, 32, 40]


def test_greedy_is_argmax_with_ties():
    torch.manual_seed(0)
    logits = torch.randn(5, 128256).to(torch.bfloat16)
    logits[1, 7] = logits[1, 90000] = 50.0  # a tie across chunks: the first index wins
    logits[2, 300] = logits[2, 301] = 50.0  # within a chunk
    logits[3] = 0.0  # all equal
    assert torch.equal(greedy(logits), logits.argmax(-1))
    assert greedy(logits)[1] == 7 and greedy(logits)[3] == 0
    small = torch.randn(3, 1000)
    assert torch.equal(greedy(small), small.argmax(-1))


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("backend", "window"), [("auto", None), ("auto", 5), ("flex", None), ("math", None)])
def test_cuda_graph_decode_equals_full_recompute(backend, window):
    """On a GPU with reduce-overhead: inductor code captured as one CUDA graph per bucket, replayed with
    continuous batching, gives the tokens of full recompute (fp32). auto decodes with the split-KV kernels."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    kernel = AttentionKernel(backend, window)
    with torch.device("cuda"):
        model = Transformer(PRESETS["tiny-llama"], kernel).eval()
    res, _ = serve(model, kernel, n=9, max_batch=3, compile_mode="reduce-overhead", device="cuda")
    assert res.stopped == "drained" and not res.unfinished
    for r in res.requests:
        assert r.tokens == greedy_by_recompute(model, r.prompt, r.output_len), f"request {r.rid}"


def test_stop_ends_the_load_between_steps_with_the_rest_unfinished():
    torch.manual_seed(0)
    kernel = AttentionKernel("auto")
    model = Transformer(PRESETS["tiny-llama"], kernel).eval()
    eng = Engine(model, kernel, 3, 32, torch.device("cpu"), torch.float32)
    gen = OpenLoop(300.0, 1.0, LengthDist.parse("uniform:1,20"), LengthDist.parse("uniform:4,12"), seed=4,
                   num_requests=9)
    clock = FakeClock()
    steps: list[int] = []

    def make(spec):
        return Request(spec, torch.from_numpy(prompt_tokens(4, spec.rid, spec.prompt_len, model.cfg.vocab_size)))

    res = run_load(eng, Scheduler(3, 7, 32), gen, make, clock, clock.sleep,
                   Hooks(step=lambda i, ms, tokens, plan, t: steps.append(i)), stop=lambda: len(steps) >= 4)
    assert res.stopped == "interrupted" and res.steps == 4 == len(steps)
    assert res.unfinished and all(not r.finished for r in res.unfinished)
    done = {r.rid for r in res.requests if r.finished}
    assert {r.rid for r in res.unfinished} | done == {r.rid for r in res.requests}


def test_decode_options_tune_by_coordinate_descent_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    on = engine_module.decode_options("max-autotune-no-cudagraphs")
    assert on["coordinate_descent_tuning"] is True and on["max_autotune"] is True  # the mode's own options kept
    monkeypatch.setattr(engine_module, "COORDINATE_DESCENT", False)
    off = engine_module.decode_options("max-autotune-no-cudagraphs")
    assert off["coordinate_descent_tuning"] is False and off["max_autotune"] is True
