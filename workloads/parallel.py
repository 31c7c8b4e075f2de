"""Tensor parallelism with torch.distributed: process group, DeviceMesh and the TP plan of a Transformer.

Applied around a model, never written into it. Attention: q/k/v column-wise, o row-wise; MLP:
w1/w3 column-wise, w2 row-wise; embedding vocabulary-parallel (row-wise); LM head column-wise with
its logits sharded over the vocabulary, so the loss runs under ``loss_parallel``. The launcher is
torchrun (one process per GPU; gloo on CPU).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    loss_parallel,
    parallelize_module,
)

ENV_COLLECTIVE_TIMEOUT = "BTUNE_COLLECTIVE_TIMEOUT_S"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def init(device_type: str) -> DeviceMesh:
    """Join the process group torchrun set up (NCCL on GPU, gloo on CPU) and return a 1-D TP mesh.

    Collectives time out (``BTUNE_COLLECTIVE_TIMEOUT_S``, default 300 s) so a dead rank never hangs the run.
    """
    timeout = timedelta(seconds=float(os.environ.get(ENV_COLLECTIVE_TIMEOUT, "300")))
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("tp",))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_divisible(n_heads: int, n_kv_heads: int, tp: int) -> None:
    """ValueError (one line) when the TP degree does not divide the heads or KV heads."""
    if n_heads % tp or n_kv_heads % tp:
        raise ValueError(f"--tp {tp} must divide the attention heads ({n_heads}) and KV heads ({n_kv_heads})")


def plan(model: nn.Module, wrong_layer: int | None = None) -> dict[str, object]:
    """The TP plan for a Transformer.

    ``wrong_layer`` plants a classic bug for the validator to catch: that layer's ``wo`` skips its
    all-reduce (its output stays a partial sum on each rank).
    """
    p: dict[str, object] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    }
    for i, _ in enumerate(model.layers):  # type: ignore[attr-defined]
        for name in ("attn.wq", "attn.wk", "attn.wv", "mlp.w1"):
            p[f"layers.{i}.{name}"] = ColwiseParallel()
        p[f"layers.{i}.attn.wo"] = RowwiseParallel(output_layouts=Partial()) if i == wrong_layer \
            else RowwiseParallel()
        p[f"layers.{i}.mlp.w2"] = RowwiseParallel()
        if getattr(model.layers[i].mlp, "w3", None) is not None:  # type: ignore[attr-defined,index]
            p[f"layers.{i}.mlp.w3"] = ColwiseParallel()
    return p


def apply_tp(model: nn.Module, mesh: DeviceMesh, wrong_layer: int | None = None) -> nn.Module:
    """Shard ``model`` in place over ``mesh``."""
    return parallelize_module(model, mesh, plan(model, wrong_layer))  # type: ignore[arg-type]


def loss_context(tp: int) -> AbstractContextManager:
    """The context the cross-entropy of vocabulary-sharded logits runs under."""
    return loss_parallel() if tp > 1 else nullcontext()


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (gathered) or a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
