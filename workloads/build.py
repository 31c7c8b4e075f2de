"""One build order for every workload's model, applied around a model that knows none of it.

``build`` takes a model constructor and the run's options and returns the model ready to run, plus what
actually ran (the ``meta`` event's ``backends``). The order, and why it is this one:

1. attention kernel: probed on this device and shape (a forced kernel that cannot run fails here); the
   model is constructed around it, on the device, in the compute dtype;
2. FP8: the library and recipe are chosen before anything is cut (an explicit mode this machine cannot run
   fails here, and the choice decides whether the tensor-parallel style can take it);
3. tensor parallelism: the DTensor plan over the mesh (training and prefill workloads; refuses FP8, the two
   do not compose yet), or the workload's own slicing (serving). Then FP8 converts the chosen linears:
   conversion swaps ``nn.Linear`` modules, and sharding rebuilds them, so it sees their final slices;
4. activation checkpointing: a wrapper around each block's forward (the block's activations are recomputed
   in backward), never a flag of the model;
5. data parallelism: FSDP2 ``fully_shard`` per block and the root over the dp mesh (HSDP when it is 2-D),
   parameters gathered in the compute dtype and gradients reduced in fp32;
6. compile: ``torch.compile`` of the finished model, lazily (the first step compiles); ``Built.compile``
   compiles any other function (a loss around the model) the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from workloads.models import fp8
from workloads.models.attention import AttentionKernel, make_kernel


@dataclass
class Built:
    """The model as built (sharded, converted, wrapped: its parameters are what trains), its compiled forward,
    the context every forward pass runs under (FP8), the attention kernel, the FP8 choice and what ran;
    ``no_backward``: the grad mode of forward passes with no backward (``fp8.no_backward``)."""

    model: nn.Module
    forward: Callable[..., Any]
    autocast: Callable[[], AbstractContextManager]
    kernel: AttentionKernel
    fp8: fp8.Fp8Choice
    ran: dict[str, Any]
    compile_mode: str = "none"
    no_backward: Callable[[], AbstractContextManager] = torch.inference_mode

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` compiled with the run's ``--compile-mode`` (itself when none)."""
        return fn if self.compile_mode == "none" else torch.compile(fn, mode=self.compile_mode)


def build(make_model: Callable[[AttentionKernel], nn.Module], opts: Mapping[str, Any], device: torch.device,
          dtype: torch.dtype, *, heads: tuple[int, int, int], seq_len: int, training: bool, mesh: Any = None,
          shard: Callable[[nn.Module], None] | None = None, tp: int = 1, compile: bool = True,
          dp_mesh: Any = None, skip_sync_layer: int | None = None, ep_group: Any = None,
          ep_replicas: Any = None, misroute: bool = False, cp_mesh: Any = None,
          cp_fault: str | None = None) -> Built:
    """``make_model(kernel)`` built for ``opts`` on ``device`` in ``dtype``, in the order above.

    ``heads``: (query heads, KV heads, head dim) of one rank, and ``seq_len`` the query length, for the
    attention probe. Tensor parallelism: ``mesh`` (a DTensor mesh) or ``shard`` (the workload's own slicing,
    ``tp`` ways). ``compile=False`` leaves compilation to the workload (the serving engine compiles its own
    step functions). ValueError (one line) for what cannot run.
    """
    n_heads, n_kv_heads, head_dim = heads
    # 1. attention kernel
    kernel, attn_reason = make_kernel(
        opts["attention_backend"], device, dtype, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
        seq_len=seq_len, window=opts["attention_window"] or None, training=training,
    )
    # 2. FP8: chosen now, converted after tensor parallelism
    recipe = None if opts["fp8_recipe"] == "auto" else opts["fp8_recipe"]
    choice = fp8.resolve(opts["fp8_mode"], recipe, device)
    with torch.device(device):
        model = make_model(kernel)
    model = model.to(dtype=dtype)
    # 3. tensor parallelism, then the FP8 conversion of the final slices
    if mesh is not None:
        from workloads import parallel

        if choice.library != "off":
            raise ValueError("--fp8-mode with --tp > 1 is not supported yet; use one or the other")
        parallel.check_divisible(model.cfg.n_heads, model.cfg.n_kv_heads, mesh.size())  # type: ignore[union-attr]
        parallel.apply_tp(model, mesh)
        tp = mesh.size()
    elif shard is not None:
        shard(model)
    if cp_mesh is not None:  # context parallelism: this rank's positions, keys and values gathered
        from workloads import parallel

        parallel.apply_cp(model, cp_mesh, seq_len, fault=cp_fault, attention=str(opts.get("cp_attention") or "gather"))
    if ep_group is not None:  # expert parallelism: each rank its share of the routed experts
        from workloads import parallel

        parallel.apply_ep(model, ep_group, misroute=misroute, replicas=ep_replicas)
    head = bool(opts.get("fp8_head", False))
    autocast = fp8.apply(model, choice, head=head)
    # 4. activation checkpointing
    checkpointing = bool(opts.get("activation_checkpointing", False))
    if checkpointing:
        checkpoint_blocks(model)
    # 5. FSDP2 over the data-parallel ranks (around the blocks as they now are: sliced, converted, checkpointed)
    dp = {"shard": 1, "replicate": 1}
    if dp_mesh is not None:
        from workloads import parallel

        reshard = opts.get("reshard_after_forward", "on") == "on"
        parallel.apply_fsdp(model, dp_mesh, dtype, reshard=reshard, skip_sync_layer=skip_sync_layer)
        dp = {"shard": int(opts.get("dp_shard") or 1), "replicate": int(opts.get("dp_replicate") or 1),
              "reshard_after_forward": reshard}
    if not training:
        model.eval()
    # 6. compile
    mode = opts["compile_mode"] if compile else "none"
    built = Built(model, model, autocast, kernel, choice, {}, mode, fp8.no_backward(choice))
    built.forward = built.compile(model)
    built.ran = {
        "attention": {"requested": opts["attention_backend"], "reason": attn_reason, "window": kernel.window},
        "fp8": {"requested": opts["fp8_mode"], "library": choice.library, "recipe": choice.recipe,
                "reason": choice.reason, "lm_head": head and choice.library != "off"},
        "compile": mode,
        "activation_checkpointing": checkpointing,
        "tp": tp,
        **({"dp": dp} if dp_mesh is not None else {}),
        **({"ep": ep_group.size()} if ep_group is not None else {}),
        **({"cp": cp_mesh.size(), "cp_attention": str(opts.get("cp_attention") or "gather")}
           if cp_mesh is not None else {}),
    }
    return built


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each of ``model.layers`` in backward instead of keeping its activations.

    Wraps each block's forward in place (the block keeps its type, name and parameters, so TP plans, FP8
    filters and ``isinstance`` checks see the same model): while autograd records and the call's ``attend`` writes
    no KV cache (recomputing would write it twice), the block runs under ``torch.utils.checkpoint``
    (non-reentrant); otherwise as it is. The recompute runs each block to its end: stopping it early (torch's
    default) raises through the MoE block's ops, and with CUDA memory history recording (``--memory-profile``)
    that fails the backward with ``SystemError: ... returned NULL without setting an exception`` (H200, torch
    2.11); what follows a block's last saved tensor is a residual add.
    """
    for block in model.layers:  # type: ignore[union-attr]
        block.forward = _recomputed(block.forward)


def _recomputed(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(x: Any, *args: Any, **kwargs: Any) -> Any:  # the block's (x, rope, attend)
        attend = args[1] if len(args) > 1 else kwargs.get("attend")
        if torch.is_grad_enabled() and not getattr(attend, "writes_cache", False):
            with set_checkpoint_early_stop(False):
                return checkpoint(forward, x, *args, use_reentrant=False, **kwargs)
        return forward(x, *args, **kwargs)

    return run
