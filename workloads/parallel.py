"""Tensor parallelism with torch.distributed: process group, DeviceMesh and the TP plan of a Transformer.

Applied around a model, never written into it. Attention: the fused q/k/v projection column-wise (its rows grouped
by KV head, ``projections.QKVLayout``: each rank's contiguous shard is whole KV groups, its own heads), o row-wise;
MLP: the fused gate/up projection w13 (gpt: w1) column-wise (rows interleaved gate, up: a shard is whole pairs),
w2 row-wise; embedding vocabulary-parallel (row-wise); LM head column-wise with
its logits sharded over the vocabulary, so the loss runs under ``loss_parallel``. The launcher is
torchrun (one process per GPU; gloo on CPU).

MoE layers run TP inside the experts (not expert parallelism): every rank routes every token the
same way (the router is replicated), each rank holds a 1/N slice of every expert's hidden width
(gate/up rows, down columns), and the experts' partial outputs are summed with one all-reduce
(Megatron's f/g pair: identity forward and all-reduce backward on the inputs, the reverse on the
output). Shared experts use the dense MLP plan.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:  # DTensor's modules load torch's compiler (seconds): imported where a mesh is made or used
    from torch.distributed.device_mesh import DeviceMesh

ENV_COLLECTIVE_TIMEOUT = "BTUNE_COLLECTIVE_TIMEOUT_S"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def init(device_type: str) -> DeviceMesh:
    """Join the process group torchrun set up (NCCL on GPU, gloo on CPU) and return a 1-D TP mesh.

    Collectives time out (``BTUNE_COLLECTIVE_TIMEOUT_S``, default 300 s) so a dead rank never hangs the run.
    """
    from torch.distributed.device_mesh import init_device_mesh

    timeout = timedelta(seconds=float(os.environ.get(ENV_COLLECTIVE_TIMEOUT, "300")))
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("tp",))


def replica_groups(device_type: str, replicas: int, tp: int) -> dist.ProcessGroup | None:
    """Serving: join torchrun's group as one of ``replicas`` x ``tp`` ranks (replica r holds ranks r*tp ..
    r*tp + tp - 1) and return this rank's tensor-parallel group (None at tp 1)."""
    from torch.distributed.device_mesh import init_device_mesh

    init(device_type)
    if tp == 1:
        return None
    mesh = init_device_mesh(device_type, (replicas, tp), mesh_dim_names=("replica", "tp"))
    return mesh.get_group("tp")


def join(tp: int, device: str, dp_shard: int = 1, dp_replicate: int = 1, cp: int = 1) -> tuple[
        DeviceMesh | None, DeviceMesh | None, DeviceMesh | None, int]:
    """The meshes of one run under torchrun's WORLD_SIZE: ``(tp mesh, FSDP mesh, cp mesh, data rank)``, each mesh
    None at degree 1. The world is one mesh ``(dp_replicate, dp_shard, cp, tp)`` (torchtitan's order: TP
    innermost, on the fastest links); FSDP shards over ``dp_shard x cp`` (flattened; the context-parallel ranks
    hold one model and sum their gradients like data-parallel ones), replicated over ``dp_replicate`` (HSDP).
    The data rank says which batch this rank reads: ranks that differ only in cp or tp read the same one.
    ValueError when the degrees' product is not the world size."""
    import torch

    want = tp * dp_shard * dp_replicate * cp
    if world_size() != want:
        what = f"--tp {tp}" if want == tp else (f"--dp-replicate {dp_replicate} x --dp-shard {dp_shard}"
                                                 + (f" x --cp {cp}" if cp > 1 else "") + f" x --tp {tp}")
        raise ValueError(f"{what} but {world_size()} processes: launch through `btune run` (it runs torchrun)")
    if want == 1:
        return None, None, None, 0
    device_type = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    if dp_shard * dp_replicate * cp == 1:
        return init(device_type), None, None, 0
    from torch.distributed.device_mesh import init_device_mesh

    init(device_type)
    mesh = init_device_mesh(device_type, (dp_replicate, dp_shard, cp, tp),
                            mesh_dim_names=("dp_replicate", "dp_shard", "cp", "tp"))
    tp_mesh = mesh["tp"] if tp > 1 else None
    cp_mesh = mesh["cp"] if cp > 1 else None
    shard = mesh["dp_shard", "cp"]._flatten("dp_shard_cp") if cp > 1 else mesh["dp_shard"]
    dp_mesh = (mesh["dp_replicate", "dp_shard_cp" if cp > 1 else "dp_shard"] if dp_replicate > 1 else shard)
    coords = mesh.get_coordinate() or [0, 0, 0, 0]
    return tp_mesh, dp_mesh, cp_mesh, coords[0] * dp_shard + coords[1]


def cp_chunks(seq: int, cp: int, rank_: int) -> tuple[slice, slice]:
    """The two chunks of a ``seq``-long sequence context-parallel rank ``rank_`` of ``cp`` holds: i and 2cp-1-i
    of 2cp equal chunks (the early, cheap one and the late, expensive one: causal work balanced)."""
    c = seq // (2 * cp)
    return slice(rank_ * c, (rank_ + 1) * c), slice((2 * cp - 1 - rank_) * c, (2 * cp - rank_) * c)


def cp_slice(x: torch.Tensor, cp_mesh: DeviceMesh | None, dim: int = 1) -> torch.Tensor:
    """This context-parallel rank's part of ``x`` along ``dim`` (the sequence): its two chunks, concatenated."""
    if cp_mesh is None:
        return x
    a, b = cp_chunks(x.shape[dim], cp_mesh.size(), cp_mesh.get_local_rank())
    return torch.cat([x.narrow(dim, a.start, a.stop - a.start), x.narrow(dim, b.start, b.stop - b.start)], dim=dim)


class _GatherAutograd(torch.autograd.Function):
    """All-gather over ``group`` (``[world, *shape]``) whose backward sums every rank's gradient of this rank's
    part and hands it back (reduce-scatter; gloo has none, so there an all-reduce and this rank's slice).
    torch.distributed.nn.functional.all_gather's gloo backward scatters by global rank, wrong on a subgroup."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        n = dist.get_world_size(group)
        out = torch.empty((n * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        dist.all_gather_into_tensor(out, t.contiguous(), group=group)
        return out.view(n, *t.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty_like(grad[0])
            dist.reduce_scatter_tensor(out, grad.flatten(0, 1), group=ctx.group)
            return out, None
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total[dist.get_rank(ctx.group)], None


class ContextParallelAttention:
    """The model's attention kernel under context parallelism: this rank's queries (two chunks) against every
    position's keys and values, all-gathered over the cp group (autograd-aware: their gradients flow back to the
    rank that made them), each query chunk attending the keys up to its own end with a lower-right causal mask.
    ``fault="cp-local-keys"`` plants a bug for the validator: no gather, each rank attends its own keys only."""

    def __init__(self, inner: Any, group: dist.ProcessGroup, fault: str | None = None) -> None:
        self.inner, self.group, self.fault = inner, group, fault
        self.cp, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.kv_multiple = 1
        self.window = None

    def mask(self, q_len: int, kv_len: int, device: Any) -> None:
        return None

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H, 2c, D] from every rank, back in sequence order: [B, H, 2cp c, D]."""
        parts = _GatherAutograd.apply(t, self.group)
        c = t.shape[2] // 2
        return torch.cat([parts[i][:, :, :c] if i < self.cp else parts[2 * self.cp - 1 - i][:, :, c:]
                          for i in range(2 * self.cp)], dim=2)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        from torch.nn.attention.bias import causal_lower_right

        c = q.shape[2] // 2
        if self.fault == "cp-local-keys":
            return self.inner(q, k, v, None)
        keys, values = self._gather(k), self._gather(v)
        out = []
        for part, chunk in ((q[:, :, :c], self.rank), (q[:, :, c:], 2 * self.cp - 1 - self.rank)):
            end = (chunk + 1) * c
            out.append(self.inner(part, keys[:, :, :end], values[:, :, :end], causal_lower_right(c, end)))
        return torch.cat(out, dim=2)


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh, seq_len: int, fault: str | None = None,
             attention: str = "gather") -> None:
    """Context parallelism around ``model``: its attention kernel wrapped (``gather``: ContextParallelAttention;
    ``ring`` / ``ring-gather``: PyTorch's ring attention, ``ring.RingAttention``) and its RoPE table replaced by
    this rank's positions (chunks i and 2cp-1-i of ``seq_len``), so the model, unchanged, runs on this rank's
    slice of each sequence (``cp_slice``)."""
    rope = getattr(model, "rope", None)
    if rope is None:
        raise ValueError("--cp needs a RoPE model (llama-style)")
    a, b = cp_chunks(seq_len, cp_mesh.size(), cp_mesh.get_local_rank())
    model.rope = torch.cat([rope[:, a], rope[:, b]], dim=1)  # type: ignore[assignment]
    if attention == "gather":
        kernel: Any = ContextParallelAttention(model.attention, cp_mesh.get_group(), fault)
    else:
        from workloads.ring import RingAttention

        kernel = RingAttention(model.attention, cp_mesh.get_group(), attention, fault)
    model.attention = kernel  # type: ignore[assignment]


def expert_params(model: nn.Module) -> set[nn.Parameter]:
    """The routed experts' weights of an expert-parallel model (each rank's own experts: FSDP leaves them)."""
    out: set[nn.Parameter] = set()
    for layer in model.layers:  # type: ignore[attr-defined]
        experts = getattr(getattr(layer, "moe", None), "experts", None)
        if experts is not None and getattr(experts, "ep", 1) > 1:
            out |= {experts.w13, experts.w2}
    return out


def ep_groups(dp_mesh: DeviceMesh) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None]:
    """(the expert-parallel group, the replicas' group or None) of an FSDP mesh: experts spread over the shard
    ranks (``dp_shard x cp``) of one replica; under HSDP (a 2-D mesh) the same experts sit in every replica."""
    if dp_mesh.ndim == 1:
        return dp_mesh.get_group(), None
    names = dp_mesh.mesh_dim_names or ()
    return dp_mesh.get_group(names[1]), dp_mesh.get_group(names[0])


def apply_ep(model: nn.Module, group: dist.ProcessGroup, misroute: bool = False,
             replicas: dist.ProcessGroup | None = None) -> None:
    """Expert parallelism: each of the ``group``'s ranks keeps its contiguous 1/ep of every MoE layer's routed
    experts; tokens go to the rank owning their expert and back with two all-to-alls (autograd-aware), and the
    outputs are combined with the gates where the tokens live. The ranks are data-parallel for everything else (each
    its own batch), so an expert's gradient sums every rank's loss: scaled by 1/ep to the global batch's mean, as
    FSDP averages the rest. With ``replicas`` (HSDP's replicate dimension), each expert's gradient is then averaged
    over the replicas that hold it, as HSDP averages the rest. ``misroute`` plants a bug for the validator: tokens
    reach the next local expert."""
    ep, rank_ = dist.get_world_size(group), dist.get_rank(group)
    for layer in model.layers:  # type: ignore[attr-defined]
        experts = getattr(getattr(layer, "moe", None), "experts", None)
        if experts is None:
            continue
        n = experts.n_experts
        if n % ep:
            raise ValueError(f"--ep {ep} must divide the routed experts ({n})")
        local = n // ep
        with torch.no_grad():
            w13 = experts.w13[rank_ * local:(rank_ + 1) * local].clone()
            w2 = experts.w2[rank_ * local:(rank_ + 1) * local].clone()
        experts.w13, experts.w2 = nn.Parameter(w13), nn.Parameter(w2)
        for w in (experts.w13, experts.w2):
            w.register_hook(lambda g, ep=ep: g / ep)
            if replicas is not None:
                w.register_post_accumulate_grad_hook(lambda p, group=replicas: _replica_mean(p, group))
        experts.n_experts, experts.ep, experts.n_global = local, ep, n
        run_local = experts.forward

        def forward(x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, dropping: bool = True,
                    run_local: Any = run_local, local: int = local, n: int = n) -> torch.Tensor:
            return _ep_dispatch(x, indices, gates, run_local, local, n, ep, group, misroute)

        experts.forward = forward


def _replica_mean(p: torch.Tensor, group: dist.ProcessGroup) -> None:
    """An expert parameter's gradient averaged over the replicas holding that expert (once it is accumulated)."""
    assert p.grad is not None
    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
    p.grad.div_(dist.get_world_size(group))


def _ep_dispatch(x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, run_local: Any, local: int, n: int,
                 ep: int, group: dist.ProcessGroup, misroute: bool) -> torch.Tensor:
    """sum_j gates[t, j] * expert[indices[t, j]](x[t]) with the experts spread over ``group`` (see apply_ep)."""
    from torch.distributed.nn.functional import all_to_all_single

    k = indices.shape[1]
    flat = indices.flatten()
    dest = torch.where(flat < n, flat // local, ep)  # a dropped assignment (index n) goes nowhere
    order = dest.argsort(stable=True)
    send = torch.bincount(dest, minlength=ep + 1)[:ep]
    sel = order[: int(send.sum())]
    tok = sel // k
    expert = flat[sel] % local
    if misroute:
        expert = (expert + 1) % local
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    out_splits, in_splits = recv.tolist(), send.tolist()  # one host sync per layer
    xr = all_to_all_single(x.new_empty(sum(out_splits), x.shape[1]), x[tok].contiguous(), out_splits, in_splits,
                           group=group)
    er = expert.new_empty(sum(out_splits))
    dist.all_to_all_single(er, expert.contiguous(), out_splits, in_splits, group=group)
    yr = run_local(xr, er[:, None], torch.ones(er.shape[0], 1, device=x.device, dtype=gates.dtype), dropping=False)
    ys = all_to_all_single(yr.new_empty(len(sel), yr.shape[1]), yr.contiguous(), in_splits, out_splits, group=group)
    out = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    return out.index_add_(0, tok, ys.float() * gates.flatten()[sel, None].float()).to(x.dtype)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype, reshard: bool = True,
               skip_sync_layer: int | None = None) -> None:
    """FSDP2 around ``model``: ``fully_shard`` each block, then the root (embedding, final norm, head), over
    ``dp_mesh`` (2-D: HSDP, replicated over its first dim, sharded over its second). Parameters gathered in
    ``param_dtype``, gradients reduced in fp32. ``skip_sync_layer`` plants a bug for the validator: that block's
    gradients are never reduced (each rank keeps its own)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = list(model.layers)  # type: ignore[attr-defined]
    ignored = expert_params(model) or None  # expert parallelism: each rank's own experts stay whole
    for i, block in enumerate(layers):
        # the last block's parameters are needed again at once by backward: never resharded (torchtitan's rule)
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard and i < len(layers) - 1,
                    ignored_params=ignored)
        if i == skip_sync_layer:
            block.set_requires_gradient_sync(False)  # type: ignore[operator]
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard, ignored_params=ignored)


def shutdown(exit_code: int = 0, stuck_s: float = 60.0) -> None:
    """Leave the process group once every rank is done with it (a rank that leaves early breaks a peer's
    last receive, e.g. a gather's). Teardown that is still stuck after ``stuck_s`` seconds (NCCL after CUDA
    graph capture can be) ends the process with ``exit_code``: everything was reported before this point."""
    if not dist.is_initialized():
        return
    dist.barrier()

    def stuck() -> None:
        print(f"warning: process-group teardown stuck for {stuck_s:g} s; exiting", file=sys.stderr, flush=True)
        os._exit(exit_code)

    timer = threading.Timer(stuck_s, stuck)
    timer.daemon = True
    timer.start()
    dist.destroy_process_group()
    timer.cancel()


def check_divisible(n_heads: int, n_kv_heads: int, tp: int) -> None:
    """ValueError (one line) when the TP degree does not divide the heads or KV heads."""
    if n_heads % tp or n_kv_heads % tp:
        raise ValueError(f"--tp {tp} must divide the attention heads ({n_heads}) and KV heads ({n_kv_heads})")


class _CopyToTP(torch.autograd.Function):
    """f: identity forward; all-reduce of the gradient over the TP group backward (a replicated input to sharded
    work)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """g: all-reduce over the TP group forward (sum the partial outputs); identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def shard_experts(experts: nn.Module, rank_: int, world: int, group: Any = None) -> None:
    """Keep this rank's slice of every routed expert's hidden width and sum outputs across the TP ``group``'s
    ranks (None: every rank)."""
    f = experts.d_ff  # type: ignore[attr-defined]
    if f % world:
        raise ValueError(f"--tp {world} must divide the expert width ({f})")
    lo, hi = rank_ * f // world, (rank_ + 1) * f // world
    with torch.no_grad():
        w13 = experts.w13  # type: ignore[attr-defined]
        local13 = torch.cat([w13[:, lo:hi], w13[:, f + lo : f + hi]], dim=1).clone()
        local2 = experts.w2[:, :, lo:hi].clone()  # type: ignore[attr-defined]
    experts.w13 = nn.Parameter(local13)
    experts.w2 = nn.Parameter(local2)
    experts.d_ff = hi - lo  # type: ignore[attr-defined]

    def before(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x, indices, gates, *rest = args
        return (_CopyToTP.apply(x, group), indices, _CopyToTP.apply(gates, group), *rest), kwargs

    experts.register_forward_pre_hook(before, with_kwargs=True)
    experts.register_forward_hook(lambda _m, _a, out: _ReduceFromTP.apply(out, group))


def plan(model: nn.Module, wrong_layer: int | None = None) -> dict[str, object]:
    """The TP plan for a Transformer.

    ``wrong_layer`` plants a classic bug for the validator to catch: that layer's ``wo`` skips its
    all-reduce (its output stays a partial sum on each rank).
    """
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    p: dict[str, object] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    }
    for i, layer in enumerate(model.layers):  # type: ignore[attr-defined]
        p[f"layers.{i}.attn.wqkv"] = ColwiseParallel()
        p[f"layers.{i}.attn.wo"] = RowwiseParallel(output_layouts=Partial()) if i == wrong_layer \
            else RowwiseParallel()
        moe = getattr(layer, "moe", None)
        mlp, prefix = (layer.mlp, f"layers.{i}.mlp") if moe is None else (moe.shared, f"layers.{i}.moe.shared")
        if mlp is None:
            continue
        inputs = mlp.inputs()  # w13 (gate/up fused), or w1 (gpt)
        for name, child in mlp.named_children():
            if any(child is m for m in inputs):
                p[f"{prefix}.{name}"] = ColwiseParallel()
        p[f"{prefix}.w2"] = RowwiseParallel()
    return p


def apply_tp(model: nn.Module, mesh: DeviceMesh, wrong_layer: int | None = None) -> nn.Module:
    """Shard ``model`` in place over ``mesh`` (MoE layers: TP inside the routed experts). ValueError where the TP
    degree does not split a gated MLP's fused gate/up rows into whole blocks (``projections.gate_up_refusal``)."""
    from torch.distributed.tensor.parallel import parallelize_module

    from workloads.models.projections import gate_up_refusal

    for layer in model.layers:  # type: ignore[attr-defined]
        moe = getattr(layer, "moe", None)
        w13 = getattr(layer.mlp if moe is None else moe.shared, "w13", None)
        why = gate_up_refusal(w13.out_features // 2, mesh.size()) if w13 is not None else None
        if why:
            raise ValueError(why)
        if moe is not None:
            shard_experts(layer.moe.experts, mesh.get_local_rank(), mesh.size(), mesh.get_group())
    return parallelize_module(model, mesh, plan(model, wrong_layer))  # type: ignore[arg-type]


def param_groups(model: nn.Module) -> list[dict[str, list[nn.Parameter]]]:
    """Optimizer groups: sharded (DTensor) and plain parameters apart, as fused AdamW takes one kind per call."""
    params = list(model.parameters())
    groups = ([p for p in params if hasattr(p, "device_mesh")], [p for p in params if not hasattr(p, "device_mesh")])
    return [{"params": g} for g in groups if g]


def loss_context(tp: int) -> AbstractContextManager:
    """The context the cross-entropy of vocabulary-sharded logits runs under."""
    if tp == 1:
        return nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (gathered) or a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
