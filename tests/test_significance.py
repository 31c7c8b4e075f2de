"""Run-level significance in compare, and --repeat (issue 15, item 7), on real CPU runs."""

import pytest
from support import ONE_THREAD, btune

from tuner.record import RecordBuilder
from tuner.report import compare, run_level_verdicts


def record(run_id: str, batch: int, p50s: list[float], seed: int = 0) -> dict:
    b = RecordBuilder(run_id, 0.0, {"workload": "dense", "options": {"batch_size": batch, "seed": seed}}, {})
    for i, ms in enumerate(p50s):
        b.add({"v": 1, "type": "step", "t": 1.0 + i, "rank": 0, "step": i, "step_ms": ms, "tokens": 10,
               "warmup": False})
    return b.finish("ok", 0, 10.0)


def test_many_steps_of_one_run_each_are_not_evidence():
    # the old test took each run's steps as the sample: two runs 2% apart, 200 steps each, "real"
    a = record("a", 1, [100.0 + (i % 3) * 0.1 for i in range(200)])
    b = record("b", 2, [102.0 + (i % 3) * 0.1 for i in range(200)])
    (v,) = run_level_verdicts([a, b])
    assert v["real"] is None and v["text"] == "noise unknown: 1 vs 1 runs (use --repeat)"


def test_repeats_are_grouped_by_config_whatever_the_seed():
    base = [record(f"a{i}", 1, [100.0 + i] * 5, seed=i) for i in range(3)]
    slow = [record(f"b{i}", 2, [130.0 + i] * 5, seed=i) for i in range(3)]
    verdicts = run_level_verdicts([*base, *slow])
    assert [v["real"] for v in verdicts] == [None, None, True, True, True]
    assert verdicts[0]["text"] == "same config as base"
    assert verdicts[2]["text"].startswith("real +29.7%") and "3 vs 3 runs" in verdicts[2]["text"]
    assert "step time differs?" in compare([*base, *slow])


@pytest.mark.slow
def test_sweep_with_repeat_runs_each_combination_as_separate_processes(tmp_path):
    res = btune("sweep", "dense", "--preset", "tiny", "--device", "cpu", "--steps", "3", "--warmup", "1",
                "--batch-size", "1,2", "--repeat", "2", "--no-telemetry", "--out", str(tmp_path),
                env=ONE_THREAD, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("  ok: ") == 4
    assert "2 vs 2 runs" in res.stdout and "same config" in res.stdout
    from tuner.runs import list_runs, load_record

    recs = [load_record(p) for p in list_runs(tmp_path)]
    assert sorted((r["config"]["options"]["batch_size"], r["config"]["repeat"]["index"]) for r in recs) == \
        [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert len({r["id"] for r in recs}) == 4
