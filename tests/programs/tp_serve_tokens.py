"""A test program run under torchrun (2 processes, gloo): a tensor-parallel serving replica on CPU.

Both ranks build the same seeded model and keep their shards; rank 0 (the leader) serves an open-loop load
through continuous batching and chunked prefill while rank 1 follows its steps. Rank 0 then prints one JSON
line: whether every request's tokens equal greedy decoding by full recompute on the unsharded model, and the
largest difference between the sharded and the whole model's logits.
usage: torchrun --nproc-per-node 2 tp_serve_tokens.py DEVICE PRESET,BACKEND,COMPILE_MODE [...]
(DEVICE cuda: NCCL, one GPU per rank, the decode captured in CUDA graphs with reduce-overhead; fp32 throughout.)
Each configuration in turn, in the same two processes (one start-up for all); every line it prints names its
configuration ("config": "PRESET,BACKEND,COMPILE_MODE").
"""

import copy
import faulthandler
import json
import sys

import torch
import torch.distributed as dist

from workloads import parallel
from workloads.engine import tensor_parallel
from workloads.engine.driver import run_load
from workloads.engine.engine import Engine
from workloads.engine.loadgen import LengthDist, OpenLoop, prompt_tokens
from workloads.engine.request import Request
from workloads.engine.scheduler import Scheduler
from workloads.engine.work import StepChannel
from workloads.models.attention import AttentionKernel
from workloads.models.config import PRESETS
from workloads.models.transformer import Transformer

faulthandler.dump_traceback_later(600, exit=True)  # a hang shows where, then ends the process
kind = sys.argv[1]
group = parallel.replica_groups(kind, 1, 2)
assert group is not None
device = torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")


def say(line: dict) -> None:
    """One JSON line in one write: both ranks share stdout, unbuffered (print writes the newline apart, and the
    other rank's line could land between)."""
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def replica(config: str) -> None:
    """One configuration (PRESET,BACKEND,COMPILE_MODE): serve, compare, print this rank's line."""
    preset, backend, compile_mode = config.split(",")
    torch.manual_seed(0)
    kernel = AttentionKernel(backend)
    with device:
        model = Transformer(PRESETS[preset], kernel).eval()
    whole = copy.deepcopy(model)
    tensor_parallel.shard(model, dist.get_rank(group), 2, group)
    max_batch, budget, cache_len = 3, 7, 32
    engine = Engine(model, kernel, max_batch, cache_len, device, torch.float32, compile_mode,
                    channel=StepChannel(group, max_batch, budget, device))
    if compile_mode != "none":
        engine.warmup(2)
    x = torch.randint(0, model.cfg.vocab_size, (2, 11), device=device)
    with torch.no_grad():
        logits_diff = (model(x) - whole(x)).abs().max().item()

    if dist.get_rank() == 0:
        gen = OpenLoop(300.0, 1.0, LengthDist.parse("uniform:1,20"), LengthDist.parse("uniform:1,12"), seed=4,
                       num_requests=9)
        clock = [0.0]

        def tick() -> float:
            clock[0] += 1e-3
            return clock[0]

        def sleep(s: float) -> None:
            clock[0] += s

        def make(spec):
            prompt = torch.from_numpy(prompt_tokens(4, spec.rid, spec.prompt_len, model.cfg.vocab_size))
            return Request(spec, prompt.to(device))

        try:
            res = run_load(engine, Scheduler(max_batch, budget, cache_len), gen, make, tick, sleep)
        finally:
            engine.stop_followers()
        bad = []
        with torch.no_grad():
            for r in res.requests:
                seq = r.prompt.tolist()
                for _ in range(r.output_len):
                    seq.append(int(whole(torch.tensor([seq], device=device))[0, -1].argmax()))
                if r.tokens != seq[r.prompt_len:]:
                    bad.append(r.rid)
        say({"config": config, "requests": len(res.requests), "finished": sum(r.finished for r in res.requests),
             "steps": res.steps, "graphs": sorted(engine._graphs), "buckets": engine.buckets, "mismatched": bad,
             "logits_max_diff": logits_diff})
    else:
        steps = engine.follow()
        say({"config": config, "follower_steps": steps, "logits_max_diff": logits_diff})
    engine.close()


for config in sys.argv[2:]:
    replica(config)
parallel.shutdown()
