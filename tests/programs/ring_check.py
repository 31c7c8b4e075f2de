"""Run under torchrun (tests/test_cp.py): workloads.ring on this rank's chunks against SDPA over the whole
sequence; rank 0 prints each rank's and rotater's worst absolute error (output and the q, k, v gradients), one line
each (the ranks share stdout: their own prints could interleave)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from workloads.parallel import cp_chunks, shutdown
from workloads.ring import RingAttention

dist.init_process_group("gloo")
n, r = dist.get_world_size(), dist.get_rank()
torch.manual_seed(0)
q, k, v = (torch.randn(2, h, 24 * n, 16).requires_grad_() for h in (4, 2, 2))  # grouped-query: 2 KV heads
whole = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
grad = torch.randn_like(whole)
whole.backward(grad)
a, b = cp_chunks(q.shape[2], n, r)


def mine(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t[:, :, a], t[:, :, b]], 2)


worst = []
for method in ("ring", "ring-gather"):
    ql, kl, vl = (mine(t).detach().requires_grad_() for t in (q, k, v))
    out = RingAttention(None, dist.group.WORLD, method)(ql, kl, vl, None)
    out.backward(mine(grad))
    errs = [(out - mine(whole)).abs().max()]
    errs += [(x.grad - mine(t.grad)).abs().max() for x, t in ((ql, q), (kl, k), (vl, v))]
    worst.append((method, r, max(e.item() for e in errs)))
every: list = [None] * n
dist.all_gather_object(every, worst)
if r == 0:
    for method, rank, err in (w for ws in every for w in ws):
        print("worst", method, rank, err, flush=True)
shutdown()  # every rank done before any leaves (one leaving while rank 0 printed aborted a peer in gloo)
