"""Tables that show what differs (issue 17, item 4): compare and sweep tables name runs by the options that
differ between them (run ids in a note), carry units, fit 120 columns (wrapping or leaving columns out with a
note); ``btune runs`` has an options column. Quick tier: records are built in process, commands run in process."""

from pathlib import Path

import pytest

from tuner import cli
from tuner.record import RecordBuilder
from tuner.report import compare, differing_options, name_rows, run_names, sweep_table

DATA = Path(__file__).parent / "data" / "runs"
DEFAULTS = {"preset": "tiny", "batch_size": 0, "seq_len": 0, "attention_backend": "auto", "steps": 0, "seed": 0}


def record(run_id: str, p50: float = 20.0, workload: str = "dense", status: str = "ok", **options) -> dict:
    opts = {**DEFAULTS, **options}
    b = RecordBuilder(run_id, 0.0, {"workload": workload, "options": opts, "defaults": DEFAULTS}, {})
    for i in range(4):
        b.add({"v": 1, "type": "step", "t": 1.0 + i, "rank": 0, "step": i, "step_ms": p50, "tokens": 1000,
               "warmup": False})
    rec = b.finish(status, 0, 10.0)
    rec["summary"]["tflops"] = 0.0002965 * 20.0 / p50
    return rec


def sweep_of(n: int) -> list[dict]:
    sizes, backends = [1, 2, 4, 8, 16, 32][: (n + 1) // 2], ["flash", "flex"]
    return [record(f"20261201-0000{i:02d}-dense-{i:04x}", 20.0 + i, batch_size=b, attention_backend=a)
            for i, (b, a) in enumerate([(b, a) for b in sizes for a in backends][:n])]


def test_differing_options_are_those_that_vary_within_a_workload():
    recs = [record("a", batch_size=1, steps=10), record("b", batch_size=2, steps=10),
            record("m", workload="moe", steps=10, top_k=None)]
    assert differing_options(recs) == ["batch_size=1", "batch_size=2", "preset=tiny steps=10 top_k=None"]
    rows = dict(name_rows(recs))
    assert rows["workload"] == ["dense", "dense", "moe"] and rows["batch_size"] == ["1", "2", "0"]
    assert "steps" not in rows  # the same in every run of each workload


def test_repeats_are_numbered_when_nothing_else_tells_them_apart():
    recs = [record("a", batch_size=1), record("b", batch_size=1), record("c", batch_size=2)]
    assert run_names(recs) == ["batch_size=1 run=1", "batch_size=1 run=2", "batch_size=2 run=1"]
    assert run_names(recs, repeats=False) == ["batch_size=1", "batch_size=1", "batch_size=2"]


def test_compare_heads_columns_by_differing_options_with_ids_in_a_note():
    recs = sweep_of(3)
    text = compare(recs)
    lines = text.splitlines()
    assert lines[0].split() == ["batch_size", "1", "1", "2"]
    assert lines[1].split() == ["attention_backend", "flash", "flex", "flash"]
    table_part = text.split("\n\n")[0]
    assert not any(r["id"] in table_part for r in recs)  # ids only in the note
    assert "run ids, left to right: " + ", ".join(r["id"] for r in recs) in " ".join(text.split())
    assert "seq_len" not in text and "preset" not in table_part  # options that do not differ are left out
    assert "step time p50 [ms]" in text and "achieved FLOP/s [MFLOP/s]" in text  # units, scaled per row
    assert all(len(ln) <= 120 for ln in lines)


def test_compare_wraps_columns_past_120_with_a_note():
    recs = sweep_of(8)
    text = compare(recs)
    assert all(len(ln) <= 120 for ln in text.splitlines())
    assert "(continued: columns" in text
    for label in ("status", "step time p50 [ms]", "step time differs? (run-level)"):
        assert text.count(label) >= 2  # every block repeats the row names


def test_sweep_table_is_a_row_per_run_named_by_options_and_fits():
    recs = sweep_of(6)
    text = sweep_table(recs)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["#", "batch_size", "attention_backend"]
    assert "[ms]" in lines[1] and "[MFLOP/s]" in lines[1]  # units on the second header line
    assert lines[3].split()[:3] == ["1", "1", "flash"] and lines[8].split()[:3] == ["6", "4", "flex"]
    assert all(len(ln) <= 120 for ln in lines)
    assert "#6 " + recs[5]["id"] in " ".join(text.split())
    assert "baseline" in lines[3] and "unknown (1 vs 1)" in lines[4]


def test_sweep_table_leaves_columns_out_with_a_note_when_it_cannot_fit():
    recs = sweep_of(4)
    narrow = sweep_table(recs, width=70)
    assert all(len(ln) <= 70 for ln in narrow.splitlines() if not ln.startswith("run ids"))
    words = " ".join(narrow.split())
    assert "left out to fit 70 columns:" in words and "(btune compare shows every figure)" in words
    assert "step vs #1" in narrow.splitlines()[0]  # the verdict column stays


def test_sweep_table_with_repeats_tests_each_config():
    base = [record(f"a{i}", 20.0 + 0.1 * i, batch_size=1, seed=i) for i in range(3)]
    slow = [record(f"b{i}", 30.0 + 0.1 * i, batch_size=2, seed=i) for i in range(3)]
    text = sweep_table([*base, *slow])
    assert "same config" in text and "real +" in text and "3 vs 3 runs" in text


def test_btune_runs_has_an_options_column(capsys):
    assert cli.main(["runs", "--out", str(DATA)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "options (that differ between runs)" in header and "throughput" in header
    line = next(ln for ln in out.splitlines() if ln.startswith("20261121-063420-dense-0049"))
    assert line.rstrip().endswith("batch_size=4") and "tok/s" in line
    assert "unreadable" in out


def test_btune_compare_in_process(capsys):
    a, b = sorted(DATA.glob("*-dense-0049.json")) + sorted(DATA.glob("*-dense-775d.json"))
    assert cli.main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["batch_size", "4", "0"]
    assert all(len(ln) <= 120 for ln in out.splitlines())


@pytest.mark.parametrize("workload", ["serve", "moe"])
def test_sweep_table_headline_columns_follow_the_workload(workload):
    recs = [record(f"{workload}{i}", 20.0 + i, workload=workload, batch_size=i) for i in range(2)]
    for r in recs:
        r["summary"]["serving"] = {"output_tokens_per_s": 100.0, "ttft_ms": {"p50": 5.0, "p99": 9.0},
                                   "requests": {"unfinished": 2.0}}
    head = sweep_table(recs).splitlines()[0]
    if workload == "serve":
        assert "output" in head and "TTFT p50" in head and "unfinished" in head and "throughput" not in head
    else:
        assert "throughput" in head
