"""tp-validate's tolerance: a mathematically-zero gradient (the key bias: softmax ignores a constant added to
the keys) is judged against a floor from the whole model's gradient scale, not against its own float noise;
a wrong shard still fails."""

import pytest
import torch
from support import ONE_THREAD, btune, record_of

from workloads.tp_validate import TOLERANCE, compare


def rows_of(res) -> dict[str, dict]:
    return {t["tensor"]: t for t in record_of(res)["summary"]["workload"]["tensors"]}


@pytest.mark.slow
def test_default_preset_tp2_passes(tmp_path):
    """`btune run tp-validate --tp 2` with its defaults (preset tiny, a GPT-arch model with biases)."""
    res = btune("run", "tp-validate", "--tp", "2", "--out", str(tmp_path), env=ONE_THREAD)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = record_of(res)
    assert rec["status"] == "ok"
    w = rec["summary"]["workload"]
    assert w["passed"] is True and not w["mismatches"] and w["tp"] == 2
    assert w["tolerance"] == TOLERANCE["fp32"]
    assert max(t["max_rel"] for t in w["tensors"]) <= w["tolerance"]
    # the record says how it judged: the floor and the scale it came from
    assert w["grad_scale"] > 0 and w["floor"] == pytest.approx(w["tolerance"] * w["grad_scale"])
    assert "floor" in w["rule"]
    bias = {t["tensor"]: t for t in w["tensors"]}["grad layers.0.attn.wqkv.bias[k]"]
    assert bias["ok"] and bias["floored"] and bias["max_abs"] <= w["floor"]
    assert bias["scale"] < 1e-6 * w["grad_scale"], "the key bias's gradient is zero up to float noise"
    assert "grad pos_embeddings.weight" in {t["tensor"] for t in w["tensors"]}, "GPT arch: learned positions"


@pytest.mark.slow
def test_planted_fault_on_the_default_preset_still_fails(tmp_path):
    res = btune("run", "tp-validate", "--tp", "2", "--fault", "missing-allreduce", "--out", str(tmp_path),
                env=ONE_THREAD)
    rec = record_of(res, code=1)
    w = rec["summary"]["workload"]
    assert rec["status"] == "failed" and w["passed"] is False
    assert "logits" in w["mismatches"] and "grad layers.0.attn.wo.weight" in w["mismatches"]


def test_zero_gradient_passes_on_the_floor_and_a_wrong_small_shard_fails():
    from workloads.tp_validate import grad_scale, judge

    tol = TOLERANCE["fp32"]
    gen = torch.Generator().manual_seed(0)
    typical = [1e-2 * torch.randn(64, 64, generator=gen) for _ in range(5)]  # set the model's gradient scale
    small = 1e-5 * torch.randn(64, 64, generator=gen)  # a thousand times below it
    zero = 1e-11 * torch.randn(64, generator=gen)  # zero up to float noise
    noisy = zero + 1e-11 * torch.randn(64, generator=gen)
    scale = grad_scale([*typical, small, zero])
    assert scale == pytest.approx(sorted(t.abs().max().item() for t in typical)[1])  # the median of 7 maxima
    rows = [*(compare(f"grad t{i}", t, t * (1 + 1e-6)) for i, t in enumerate(typical)),
            compare("grad zero", zero, noisy), compare("grad small", small, small * (1 + 1e-6))]
    assert rows[5]["max_abs"] > 0.5 * rows[5]["scale"], "on its own scale the noise is a 100% error"
    floor = judge(rows, tol, scale)
    assert all(r["ok"] for r in rows) and floor == pytest.approx(tol * scale)
    assert [r["floored"] for r in rows] == [r["scale"] < scale for r in rows]
    assert rows[5]["floored"] and rows[6]["floored"] and sum(not r["floored"] for r in rows) == 4
    # a wrong shard of the small gradient (its halves swapped) still fails, and so does one of a typical one
    wrong = torch.cat([small[32:], small[:32]])
    rows = [compare("grad small", small, wrong), compare("grad t0", typical[0], typical[0].flip(0))]
    judge(rows, tol, scale)
    assert not rows[0]["ok"] and not rows[1]["ok"]
    # logits and loss get no floor: their own scale only
    rows = [compare("logits", zero, noisy)]
    judge(rows, tol, scale)
    assert not rows[0]["ok"] and not rows[0]["floored"]
    # a shape mismatch stays a mismatch
    rows = [compare("grad big", typical[0], typical[0][:32])]
    judge(rows, tol, 1.0)
    assert not rows[0]["ok"] and "shape" in rows[0]["note"]
