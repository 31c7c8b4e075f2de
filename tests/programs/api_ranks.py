"""A user's data-parallel script: gloo ranks under torchrun, each reporting its steps through the API, tokens per
replica. Writes what rank 0 counted (tokens and losses per step) as JSON to argv[1]."""

import json
import sys

import torch
import torch.distributed as dist

import btune

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.Linear(16, 16)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
btune.meta(model="linear-16", n_params=sum(p.numel() for p in model.parameters()), flops_per_token=6 * 272,
           tokens="per_replica")
seen = {"tokens": [], "loss": []}
for i in range(6):
    x = torch.randn(8 + i, 16)  # this replica's batch: 8 + i tokens, the same on every rank
    loss = model(x).pow(2).mean()
    loss.backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
    opt.step()
    opt.zero_grad()
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)
    value = global_loss.item() / world
    btune.step(tokens=x.shape[0], loss=value)
    seen["tokens"].append(x.shape[0] * world)
    seen["loss"].append(value)
with btune.phase("eval"):
    dist.barrier()
if rank == 0:
    with open(sys.argv[1], "w") as fh:
        json.dump(seen, fh)
dist.barrier()  # every rank done before any leaves the group
dist.destroy_process_group()
