"""Context parallelism (--cp): each rank two chunks of every sequence, keys and values all-gathered, FSDP over
--dp-shard x --cp; validated against one process on gloo, a planted fault caught, its refusals one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support import ONE_THREAD, PROGRAMS, ROOT, btune, record_of

from tuner import catalog
from workloads import dense
from workloads.options import Machine, OptionError
from workloads.parallel import cp_chunks

DENSE, MOE = catalog.get("dense"), catalog.get("moe")
CPU = Machine()


def problems(spec, **opts) -> list[str]:
    full = catalog.validate(spec, opts)
    return [why for _, why in spec.checks(full, CPU)] if spec.checks else []


def test_each_rank_holds_an_early_and_a_late_chunk_and_together_they_cover_the_sequence():
    seq, cp = 96, 3
    held = [cp_chunks(seq, cp, r) for r in range(cp)]
    covered = sorted(i for a, b in held for i in [*range(a.start, a.stop), *range(b.start, b.stop)])
    assert covered == list(range(seq))
    # causal work per rank (sum over its query positions of the keys each attends) is balanced exactly
    work = [sum(p + 1 for s in pair for p in range(s.start, s.stop)) for pair in held]
    assert len(set(work)) == 1


@pytest.mark.parametrize(("opts", "says"), [
    ({"preset": "tiny", "cp": 2}, "needs RoPE positions"),
    ({"preset": "tiny-llama", "cp": 2, "seq_len": 126}, "must split into 2 x 2 equal chunks"),
    ({"preset": "tiny-llama", "cp": 2, "attention_window": 16}, "sliding window"),
    ({"preset": "tiny-llama", "cp": 2, "cp_attention": "ring", "attention_backend": "math"}, "runs the flash kernel"),
])
def test_what_cannot_be_context_parallel_is_refused_in_one_line(opts, says):
    found = problems(DENSE, **opts)
    assert any(says in p for p in found), found


def test_cp_is_a_training_option():
    with pytest.raises(OptionError, match="--cp is only valid with --mode train"):
        catalog.validate(DENSE, {"preset": "tiny-llama", "cp": 2, "mode": "prefill"})


def test_expert_parallelism_spans_the_fsdp_ranks_data_and_context_alike():
    assert not problems(MOE, preset="tiny", cp=2, ep=2)
    assert any("--dp-shard x --cp ranks" in p for p in problems(MOE, preset="tiny", cp=2, ep=4))


def test_the_estimate_per_rank_holds_half_the_tokens_plus_the_gathered_keys():
    base = {**DENSE.defaults(), "preset": "llama-3.1-8b", "layers": 4, "seq_len": 16384, "batch_size": 1}
    one = dense.plan(base, "cuda")["memory_estimate_bytes"]
    two = dense.plan({**base, "cp": 2}, "cuda")["memory_estimate_bytes"]
    kv = 2 * 4 * 16384 * 8 * 128 * 2  # every layer's gathered keys and values, bf16
    assert two["activations"] == one["activations"] // 2 + kv
    assert two["logits"] == one["logits"] // 2
    assert two["weights"] == -(-one["weights"] // 2)  # FSDP over the two context-parallel ranks


def test_the_ring_keeps_its_own_keys_expanded_to_every_query_head_instead_of_everyones():
    base = {**DENSE.defaults(), "preset": "llama-3.1-8b", "layers": 4, "seq_len": 16384, "batch_size": 1, "cp": 2}
    gather = dense.plan(base, "cuda")["memory_estimate_bytes"]
    ring = dense.plan({**base, "cp_attention": "ring"}, "cuda")["memory_estimate_bytes"]
    gathered = 2 * 4 * 16384 * 8 * 128 * 2  # every layer's gathered keys and values (8 KV heads), bf16
    expanded = 2 * 4 * 8192 * (32 - 8) * 128 * 2  # this rank's keys and values for the 24 other query heads
    assert ring["activations"] - gather["activations"] == expanded - gathered


@pytest.mark.slow
@pytest.mark.parametrize("cp", [2, 3])
def test_torchs_ring_on_this_ranks_chunks_equals_causal_attention_over_the_whole_sequence(tmp_path, cp):
    """workloads.ring against SDPA on the whole sequence: each rank's output and its queries', keys' and values'
    gradients (grouped-query heads, both rotaters), on gloo with ``cp`` processes."""
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cp}",
                          str(PROGRAMS / "ring_check.py")], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    worst = [float(line.split()[-1]) for line in res.stdout.splitlines() if line.startswith("worst")]
    assert len(worst) == 2 * cp and max(worst) < 1e-5, res.stdout



@pytest.mark.slow
@pytest.mark.parametrize("args", [["--preset", "tiny-llama", "--tp", "1", "--dp-shard", "2", "--cp", "2"],
                                  ["--model", "moe", "--preset", "tiny", "--tp", "1", "--cp", "2", "--ep", "2"],
                                  ["--preset", "tiny-llama", "--tp", "1", "--cp", "2", "--cp-attention", "ring"],
                                  ["--model", "moe", "--preset", "tiny", "--tp", "1", "--cp", "2", "--ep", "2",
                                   "--cp-attention", "ring-gather"]],
                         ids=["dense-fsdp2xcp2", "moe-cp2xep2", "dense-cp2-ring", "moe-cp2xep2-ring-gather"])
def test_validation_against_one_process(tmp_path, args):
    """Logits (this rank's chunks), the loss and every gradient against one process with the same weights."""
    res = btune("run", "tp-validate", *args, "--out", str(tmp_path), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "validation: PASS" in res.stdout
    summary = record_of(res)["summary"]["workload"]
    assert summary["passed"] and summary["cp"] == 2 and not summary["mismatches"]


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["gather", "ring"])
def test_a_planted_fault_is_caught(tmp_path, attention):
    """cp-local-keys: each rank attends only its own keys; the logits and every gradient upstream move."""
    res = btune("run", "tp-validate", "--preset", "tiny-llama", "--tp", "1", "--cp", "2", "--fault", "cp-local-keys",
                "--cp-attention", attention, "--out", str(tmp_path), timeout=600)
    assert res.returncode == 1
    assert "validation: FAIL" in res.stdout and "logits" in res.stdout.split("validation: FAIL")[1].splitlines()[0]


@pytest.mark.slow
def test_a_context_parallel_run_counts_each_sequence_once(tmp_path):
    res = btune("run", "dense", "--preset", "tiny-llama", "--cp", "2", "--steps", "3", "--warmup", "1",
                "--out", str(tmp_path), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = record_of(res)
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    assert meta["n_devices"] == 2 and meta["backends"]["cp"] == 2 and meta["plan"]["cp"] == 2
    per_step = meta["plan"]["batch_size"] * meta["plan"]["seq_len"]
    assert meta["plan"]["tokens_per_step"] == per_step  # the two ranks share each sequence: counted once
    assert rec["summary"]["tokens_total"] == per_step * 4
    assert sorted(rec["series"]["step"]) == ["0", "1"], "each rank's step times are kept"
