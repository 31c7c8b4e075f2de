"""Parallel validation: the same weights and inputs in one process and on a mesh (TP, FSDP2, HSDP and their product),
compared tensor by tensor.

Every rank builds the full model from one seed (the one-process reference) and runs it on the whole global batch; a
copy is sharded over the mesh (TP plan, then fully_shard per block and the root) and each data-parallel rank runs it
on its slice of that batch. Logits (this rank's rows), the loss (mean over the data-parallel ranks) and every
gradient (gathered) are compared against the reference, with dtype-aware tolerances on relative error: max |a - b| /
max |reference|, where a gradient's scale is never taken below the whole model's gradient scale (the median of the
reference gradients' max |g|), so a gradient that is mathematically zero is not judged by its float noise (see
``judge``). Rank 0 prints the table and the run exits 1 on any mismatch.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from workloads.options import run_main
from workloads.specs.tp_validate import TP_VALIDATE

if TYPE_CHECKING:
    from workloads.harness import Harness

#: Allowed relative error per compute dtype (bf16 keeps 8 bits of mantissa; sums are reordered by TP).
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}


def compare(name: str, ref: Any, got: Any) -> dict[str, Any]:
    """Max absolute error of ``got`` against ``ref`` and the reference's own scale (max |ref|); ``judge`` decides."""
    ref32, got32 = ref.detach().float(), got.detach().float()
    if ref32.shape != got32.shape:
        return {"tensor": name, "max_abs": None, "max_rel": None, "ok": False,
                "note": f"shape {tuple(got32.shape)} != {tuple(ref32.shape)}"}
    abs_err = (ref32 - got32).abs().max().item() if ref32.numel() else 0.0
    scale = ref32.abs().max().item() if ref32.numel() else 0.0
    return {"tensor": name, "max_abs": abs_err, "scale": scale, "max_rel": None, "ok": None}


def grad_scale(grads: list[Any]) -> float:
    """The whole model's gradient scale: the median over gradient tensors of each one's max |g|.

    Each tensor counts once, whatever its size, so neither the few largest gradients (the max) nor the
    millions of small entries of the biggest matrices (an RMS over every element, measured too small for
    a bf16 GPT at gpt-large width) set it: about half the tensors are judged on their own scale.
    """
    import statistics

    scales = [g.detach().abs().max().float().item() for g in grads if g.numel()]
    return statistics.median(scales) if scales else 0.0


#: How ``judge`` decides, written into the summary so the record says how it judged.
RULE = ("ok when max|tp - ref| <= tol * max(max|ref|, G); G = grad_scale (median over the reference "
        "gradients of each tensor's max |g|) for gradients, 0 for logits and loss; floor = tol * G")


def judge(rows: list[dict[str, Any]], tol: float, model_scale: float) -> float:
    """Fill ``max_rel`` and ``ok`` of ``compare``'s rows in place; return the absolute floor ``tol * model_scale``.

    A tensor's error is relative to its own magnitude, but a gradient's is never relative to less than the
    whole model's gradient scale: a gradient that is mathematically zero (a GPT key bias: softmax ignores a
    constant added to every key) holds only float noise, and noise over noise is not a relative error. A wrong
    shard moves a gradient by about its own magnitude, which is caught unless that whole magnitude is below the
    floor ``tol * model_scale``, i.e. negligible next to the model's typical gradient.
    """
    for r in rows:
        if r["max_abs"] is None:
            r["ok"] = False
            continue
        own = r["scale"]
        base = max(own, model_scale) if r["tensor"].startswith("grad ") else own
        r["floored"] = base > own
        r["max_rel"] = r["max_abs"] / base if base else r["max_abs"]
        r["ok"] = r["max_rel"] <= tol
    return tol * model_scale


def table(rows: list[dict[str, Any]], tol: float, floor: float) -> str:
    width = max(len(r["tensor"]) for r in rows)
    lines = [f"{'tensor':<{width}}  {'max abs err':>12}  {'max |ref|':>12}  {'max rel err':>12}  "
             f"ok (rel <= {tol:g}; gradients: abs err <= floor {floor:.3e} always ok)"]
    for r in rows:
        a = "-" if r["max_abs"] is None else f"{r['max_abs']:.3e}"
        s = "-" if r.get("scale") is None else f"{r['scale']:.3e}"
        b = "-" if r["max_rel"] is None else f"{r['max_rel']:.3e}"
        note = " ".join(x for x in ("(floor)" if r.get("floored") else "", r.get("note", "")) if x)
        lines.append(f"{r['tensor']:<{width}}  {a:>12}  {s:>12}  {b:>12}  {'ok' if r['ok'] else 'MISMATCH'} {note}")
    return "\n".join(lines)


def expert_slice(name: str, ref_grad: Any, local: Any, rank: int, world: int) -> Any:
    """The reference gradient of a routed-expert weight cut to this TP rank's slice (``rank`` of ``world``: plain
    local shards; under FSDP the gathered gradient is the TP slice too)."""
    if not name.endswith(("experts.w13", "experts.w2")) or local.shape == ref_grad.shape:
        return ref_grad
    if name.endswith("w2"):
        f = ref_grad.shape[2]
        return ref_grad[:, :, rank * f // world:(rank + 1) * f // world]
    f = ref_grad.shape[1] // 2
    lo, hi = rank * f // world, (rank + 1) * f // world
    import torch

    return torch.cat([ref_grad[:, lo:hi], ref_grad[:, f + lo:f + hi]], dim=1)


def grad_rows(ref: Any, name: str, want: Any, got: Any) -> list[dict[str, Any]]:
    """``compare``'s rows for parameter ``name``'s gradient: one, or for a fused q/k/v weight or bias one per part
    (``grad layers.0.attn.wqkv.bias[k]``), each judged on its own scale (a GPT key bias's gradient is zero: only
    float noise, which the floor, not q's and v's scale, should judge)."""
    owner = name.rpartition(".")[0]  # layers.N.attn.wqkv
    layout = getattr(ref.get_submodule(owner.rpartition(".")[0]), "layout", None) if owner.endswith("wqkv") else None
    if layout is None or want.shape != got.shape:
        return [compare(f"grad {name}", want, got)]
    from workloads.models.projections import PARTS

    return [compare(f"grad {name}[{part}]", layout.get(want, part), layout.get(got, part)) for part in PARTS]


def _reference(h: Harness) -> tuple[dict[str, Any], Any]:
    """The plan (the dense workload's, or the MoE preset's model in it) and the TP=1 reference model."""
    import torch

    from workloads import parallel
    from workloads.dense import plan
    from workloads.models.config import ModelConfig
    from workloads.models.moe import MoETransformer
    from workloads.models.moe_config import resolve
    from workloads.models.transformer import Transformer

    opts, moe = h.opts, h.opts["model"] == "moe"
    dense = {**opts, "duration": 0.0, "activation_checkpointing": False, "preset": "tiny" if moe else opts["preset"]}
    p = h.resolve(lambda _opts, device_type: plan(dense, device_type))
    if moe:
        mcfg = resolve({"preset": opts["preset"], "layers": opts["layers"]})
        if p["seq_len"] + 1 > mcfg.base.max_seq_len:
            mcfg = replace(mcfg, base=replace(mcfg.base, max_seq_len=p["seq_len"] + 1))
        cfg = mcfg.base
        p["model"] = {"moe": opts["preset"], "base": asdict(cfg)}
    else:
        cfg = ModelConfig(**p["model"])
    parallel.check_divisible(cfg.n_heads, cfg.n_kv_heads, opts["tp"])
    with torch.device(h.device):
        ref = MoETransformer(mcfg, impl="grouped", gemm="bmm") if moe else Transformer(cfg)
    return p, ref.to(dtype=h.dtype)


def run(opts: dict[str, Any]) -> int:
    import torch
    import torch.nn.functional as F

    from workloads import parallel
    from workloads.harness import EXIT_FAILED, EXIT_OK, SETUP_ERRORS, Harness

    h = Harness("tp-validate", opts)
    try:
        h.join()
        p, ref = _reference(h)
    except SETUP_ERRORS as exc:
        return h.setup_failed(exc)
    tp, moe, cp = opts["tp"], opts["model"] == "moe", opts["cp"]
    dp = opts["dp_shard"] * opts["dp_replicate"]
    sharded = copy.deepcopy(ref)
    if h.mesh is not None:
        sharded = parallel.apply_tp(sharded, h.mesh, wrong_layer=0 if opts["fault"] == "missing-allreduce" else None)
    if h.cp_mesh is not None:
        parallel.apply_cp(sharded, h.cp_mesh, p["seq_len"], fault=opts["fault"] if opts["fault"] != "none" else None,
                          attention=opts["cp_attention"])
    ep, ep_rank = opts["ep"], 0
    if ep > 1:
        group, replicas = parallel.ep_groups(h.dp_mesh)
        parallel.apply_ep(sharded, group, misroute=opts["fault"] == "ep-misroute", replicas=replicas)
        ep_rank = torch.distributed.get_rank(group)  # which experts this rank holds (the same in every replica)
    if h.dp_mesh is not None:
        parallel.apply_fsdp(sharded, h.dp_mesh, h.dtype, skip_sync_layer=0 if opts["fault"] == "skip-grad-sync"
                            else None)
    gen = torch.Generator(device="cpu").manual_seed(opts["seed"])
    vocab, b = ref.cfg.vocab_size, p["batch_size"]
    tokens = torch.randint(0, vocab, (b * dp, p["seq_len"] + 1), generator=gen).to(h.device)  # the global batch
    dp_rank = h.data_rank
    mine = slice(dp_rank * b, (dp_rank + 1) * b)
    x, y = tokens[:, :-1], tokens[:, 1:]
    train = opts["mode"] == "train"
    tol = TOLERANCE[p["dtype"]]
    h.meta(p, tolerance=tol)

    def logits_of(model: Any, inputs: Any) -> Any:
        out = model(inputs)
        return out.logits if moe else out

    with torch.set_grad_enabled(train):
        ref_logits = logits_of(ref, x)
        ref_loss = F.cross_entropy(ref_logits.flatten(0, 1).float(), y.flatten())
        tp_logits = logits_of(sharded, parallel.cp_slice(x[mine], h.cp_mesh))  # --cp: this rank's chunks
        with parallel.loss_context(tp):
            tp_loss = F.cross_entropy(tp_logits.flatten(0, 1).float(), parallel.cp_slice(y[mine], h.cp_mesh).flatten())
            if train:
                tp_loss.backward()
        if train:
            ref_loss.backward()
    loss = parallel.full(tp_loss).detach().clone()
    if dp * cp > 1:  # the global batch's loss: the mean of the data- and context-parallel ranks' (equal) slices'
        torch.distributed.all_reduce(loss)  # losses (a replica's TP ranks hold the same value, so over every rank)
        loss /= h.world
    rows = [compare("logits", parallel.cp_slice(ref_logits[mine], h.cp_mesh), parallel.full(tp_logits)),
            compare("loss", ref_loss, loss)]
    scale = 0.0
    if train:
        tp_params = dict(sharded.named_parameters())
        for name, param in ref.named_parameters():
            other = tp_params[name].grad
            if param.grad is None or other is None:
                rows.append({"tensor": f"grad {name}", "max_abs": None, "max_rel": None, "ok": False,
                             "note": "no gradient"})
                continue
            got = parallel.full(other)
            want = param.grad
            if ep > 1 and name.endswith(("experts.w13", "experts.w2")):  # this rank's experts
                n = want.shape[0] // ep
                want = want[ep_rank * n:(ep_rank + 1) * n]
            tp_rank = h.mesh.get_local_rank() if h.mesh is not None else 0
            rows += grad_rows(ref, name, expert_slice(name, want, got, tp_rank, tp), got)
        # every rank holds the whole reference model, so every rank computes the same scale
        scale = grad_scale([q.grad for q in ref.parameters() if q.grad is not None])
    floor = judge(rows, tol, scale)
    passed = all(r["ok"] for r in rows)
    everywhere = torch.tensor([1 if passed else 0], device=h.device)
    torch.distributed.all_reduce(everywhere, op=torch.distributed.ReduceOp.MIN)  # every rank's slices count
    if not everywhere.item() and passed:
        rows.append({"tensor": "another rank's shards", "max_abs": None, "max_rel": None, "ok": False,
                     "note": "a mismatch on another rank"})
        passed = False
    if h.rank == 0:
        print(table(rows, tol, floor))
        mesh = " x ".join(f"{k} {v}" for k, v in (("dp-replicate", opts["dp_replicate"]),
                                                     ("dp-shard", opts["dp_shard"]), ("cp", cp), ("tp", tp)) if v > 1)
        mesh += f" (ep {ep})" if ep > 1 else ""
        mesh += f" (cp attention: {opts['cp_attention']})" if cp > 1 else ""
        print(f"tp-validate: {mesh} vs one process, {p['dtype']}, {len(rows)} tensors: "
              f"{'PASS' if passed else 'FAIL'} (worst rel err {max(r['max_rel'] or 0 for r in rows):.3e})")
    summary = {"passed": passed, "tp": tp, "dp_shard": opts["dp_shard"], "dp_replicate": opts["dp_replicate"], "ep": ep,
               "cp": cp, "cp_attention": opts["cp_attention"] if cp > 1 else None,
               "tolerance": tol, "floor": floor, "grad_scale": scale, "rule": RULE,
               "tensors": rows, "mismatches": [r["tensor"] for r in rows if not r["ok"]]}
    return h.finish(EXIT_OK if passed else EXIT_FAILED, summary)


def main(argv: list[str] | None = None) -> int:
    return run_main(TP_VALIDATE, argv, run)


if __name__ == "__main__":
    sys.exit(main())
