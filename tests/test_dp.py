"""Data parallelism on CPU (gloo, 2-4 processes): FSDP2 (--dp-shard), HSDP (--dp-replicate x --dp-shard) and FSDP x TP
for the dense workload; each mesh validated against one process, a planted fault per degree caught."""

import functools

import pytest
import support
from support import ONE_THREAD, record_of, refused

from workloads.dense import plan as dense_plan
from workloads.specs.dense import DENSE

btune = functools.partial(support.btune, env=ONE_THREAD)  # ranks share 2 cores: one thread each


@pytest.mark.slow
def test_fsdp_run_counts_every_data_parallel_rank_s_tokens(tmp_path):
    res = btune("run", "dense", "--preset", "tiny-llama", "--dp-shard", "2", "--steps", "4", "--warmup", "1",
                "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = record_of(res)
    steps = rec["series"]["step"]
    assert sorted(steps) == ["0", "1"], "each rank's step times are kept"
    assert steps["0"]["loss"] != steps["1"]["loss"], "each data-parallel rank reads its own batches"
    s = rec["summary"]
    assert s["tokens_total"] == 5 * 8 * 128 * 2, "--batch-size is per rank: both ranks' tokens count"
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    assert meta["n_devices"] == 2 and meta["backends"]["dp"] == {"shard": 2, "replicate": 1,
                                                                 "reshard_after_forward": True}
    # the memory estimate is per rank: a half of the weights, gradients and optimizer state, one block gathered
    opts = {**DENSE.defaults(), "preset": "tiny-llama"}
    one, two = dense_plan(opts, "cpu")["memory_estimate_bytes"], meta["plan"]["memory_estimate_bytes"]
    assert two["weights"] == -(-one["weights"] // 2) and two["optimizer"] == -(-one["optimizer"] // 2)
    assert two["gathered"] > 0 and two["activations"] == one["activations"]


@pytest.mark.slow
def test_moe_fsdp_and_ep_run_counts_every_data_parallel_rank_s_tokens(tmp_path):
    res = btune("run", "moe", "--preset", "tiny", "--dp-shard", "2", "--ep", "2", "--steps", "4", "--warmup", "1",
                "--out", str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = record_of(res)
    assert rec["summary"]["tokens_total"] == 5 * 8 * 128 * 2
    steps = rec["series"]["step"]
    assert sorted(steps) == ["0", "1"] and steps["0"]["loss"] != steps["1"]["loss"]
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    assert meta["backends"]["ep"] == 2 and meta["backends"]["dp"]["shard"] == 2


#: One validation per mesh and a planted fault per degree (TP's missing all-reduce: tests/test_tp_validate_tolerance.py)
VALIDATIONS = [
    (["--tp", "1", "--dp-shard", "2", "--fault", "skip-grad-sync"], False),
    (["--tp", "1", "--dp-replicate", "2", "--dp-shard", "2"], True),
    (["--tp", "2", "--dp-shard", "2"], True),
    # MoE: TP inside the experts sums over the TP group only (not every rank); a replica's router the same
    (["--model", "moe", "--preset", "tiny", "--tp", "2", "--dp-shard", "2"], True),
    # expert parallelism: each rank its half of the experts, tokens there and back by all-to-all
    (["--model", "moe", "--preset", "tiny", "--tp", "1", "--dp-shard", "2", "--ep", "2"], True),
    (["--model", "moe", "--preset", "tiny", "--tp", "1", "--dp-shard", "2", "--ep", "2", "--fault", "ep-misroute"],
     False),
    # and over two replicas of that (HSDP): each expert's gradient averaged over the replicas holding it
    (["--model", "moe", "--preset", "tiny", "--tp", "1", "--dp-replicate", "2", "--dp-shard", "2", "--ep", "2"], True),
    # and with TP inside each rank's experts (their width split over the TP group)
    (["--model", "moe", "--preset", "tiny", "--tp", "2", "--dp-shard", "2", "--ep", "2"], True),
]


@pytest.mark.slow
@pytest.mark.parametrize(("mesh", "passes"), VALIDATIONS,
                         ids=["fsdp-fault", "hsdp", "fsdp-x-tp", "moe-fsdp-x-tp", "moe-ep", "moe-ep-fault",
                              "moe-ep-hsdp", "moe-ep-x-tp"])
def test_each_mesh_against_one_process(tmp_path, mesh, passes):
    preset = [] if "--preset" in mesh else ["--preset", "tiny-llama"]
    res = btune("run", "tp-validate", *preset, *mesh, "--out", str(tmp_path))
    assert res.returncode == (0 if passes else 1), res.stdout[-3000:] + res.stderr[-3000:]
    w = record_of(res, code=None)["summary"]["workload"]
    assert w["passed"] is passes
    names = {t["tensor"] for t in w["tensors"]}
    assert {"logits", "loss", "grad layers.0.attn.wo.weight", "grad output.weight"} <= names
    if "moe" in mesh:
        assert any(n.endswith("experts.w13") for n in names)
    if not passes:
        bad = set(w["mismatches"])
        if "skip-grad-sync" in mesh:  # block 0's gradients, and only those (MoE: its first block is dense)
            assert bad and all(t.startswith("grad layers.0.") for t in bad)
        else:
            assert "logits" in bad


@pytest.mark.parametrize(("argv", "says"), [
    (["run", "dense", "--mode", "prefill", "--dp-shard", "2"], "--dp-shard is only valid with --mode train"),
    (["run", "moe", "--mode", "prefill", "--dp-shard", "2"], "--dp-shard is only valid with --mode train"),
    (["run", "moe", "--ep", "2"], "they number 2 (now --dp-shard 1)"),
    (["run", "moe", "--ep", "3", "--dp-shard", "3"], "must divide the routed experts (8)"),
    (["run", "dense", "--ep", "2"], "unrecognized arguments: --ep 2"),
    (["run", "tp-validate", "--ep", "2", "--dp-shard", "2"], "the dense model has no experts"),
    (["run", "tp-validate", "--tp", "1", "--dp-shard", "2", "--fault", "missing-allreduce"], "needs --tp > 1"),
    (["run", "tp-validate", "--fault", "skip-grad-sync"], "needs --dp-shard or --dp-replicate > 1"),
    (["run", "dense", "--dp-shard", "3", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:1"],
     "multiple of --nnodes 2"),
])
def test_bad_degrees_are_refused_before_launch(tmp_path, capsys, argv, says):
    assert says in refused(capsys, [argv[0], "--out", str(tmp_path), *argv[1:]])
    assert not list(tmp_path.iterdir())
