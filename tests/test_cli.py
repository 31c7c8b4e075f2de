"""The `btune` and `btune-tui --replay` commands, run as real subprocesses."""

import contextlib
import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil
import pytest
from support import btune, environ, live_journal, start_btune, tui

from tuner.runs import RECORD_SCHEMA_VERSION, load_record


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One real tiny dense run on CPU, shared by the read-only tests."""
    out = tmp_path_factory.mktemp("runs")
    res = btune("run", "dense", "--preset", "tiny", "--steps", "6", "--warmup", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.parent == out and path.exists()
    return path


@pytest.mark.slow
def test_tiny_dense_run_end_to_end(tiny_run):
    rec = load_record(tiny_run)
    assert rec["status"] == "ok" and rec["exit_code"] == 0
    s = rec["summary"]
    assert s["steps"] == {"total": 8, "warmup": 2, "steady": 6}
    for key in ("n", "mean", "p50", "p90", "p95", "p99", "stdev", "cv"):
        assert key in s["step_ms"] and key in s["tokens_per_s"]
    assert s["tokens_per_s"]["n"] == 6 and s["tokens_per_s"]["mean"] > 0
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    assert meta["flops_per_token"] > 0 and meta["device_name"] == "cpu"
    assert s["mfu"]["bf16"]["value"] is None and "CPU" in s["mfu"]["bf16"]["reason"]
    assert s["loss_last"] < 7.0
    assert rec["config"]["workload"] == "dense" and rec["config"]["argv"][1:3] == ["-m", "workloads.dense"]


@pytest.mark.slow
def test_list_shows_workloads_and_options():
    res = btune("list")
    assert res.returncode == 0 and "dense" in res.stdout and "--attention-backend" in res.stdout
    doc = orjson.loads(btune("list", "--json").stdout)
    dense = next(w for w in doc if w["name"] == "dense")
    assert "tiny" in dense["presets"] and any(o["name"] == "steps" for o in dense["options"])


#: Bad input to btune and the line that refuses it
#: (tests/test_refusals.py runs them in process too).
BAD_INPUT = [
    (["run", "nosuch"], "unknown workload 'nosuch'; available: dense"),
    (["run", "dense", "--preset", "huge"], "--preset: 'huge' is not allowed; expected one of tiny"),
    (["run", "dense", "--bogus", "1"], "unrecognized arguments: --bogus 1; allowed:"),
    (["run", "dense", "--steps", "-5"], "--steps: '-5' is out of range"),
    (["run", "dense", "--batch-size", "lots"], "--batch-size: 'lots' is not valid; expected an integer"),
    (["run", "dense", "--mode", "prefill", "--lr", "0.1"], "--lr is only valid with --mode train"),
    (["run", "dense", "--sample-hz", "0"], "--sample-hz 0"),
    (["show"], "the following arguments are required: run"),
    (["nosuchcommand"], "invalid choice"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "words"), BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_launches_nothing(tmp_path, args, words):
    res = btune(*args, cwd=tmp_path)
    assert res.returncode == 2, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "btune_runs").exists()


@pytest.mark.slow
def test_unwritable_runs_directory_is_exit_2(tmp_path):
    (tmp_path / "file").write_text("x")
    res = btune("run", "dense", "--steps", "1", "--out", str(tmp_path / "file" / "runs"))
    assert res.returncode == 2 and "not writable" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_device_cuda_without_a_gpu_is_refused_before_launch(tmp_path):
    res = btune("run", "dense", "--device", "cuda", "--out", str(tmp_path))
    assert res.returncode == 2 and "no NVIDIA GPU is visible" in res.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_dry_run_prints_the_plan_without_a_record(tmp_path):
    res = btune("run", "dense", "--preset", "llama-3.1-8b", "--layers", "4", "--dry-run", "--out", str(tmp_path))
    plan = orjson.loads(res.stdout)
    assert res.returncode == 0 and plan["model"]["n_layers"] == 4 and plan["flops_per_token"] > 0
    assert plan["memory_estimate_bytes"]["total"] > plan["memory_estimate_bytes"]["weights"]
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_run_that_fails_exits_nonzero_with_the_path_last(tmp_path):
    res = btune("run", "dense", "--steps", "100000", "--timeout", "4", "--out", str(tmp_path))
    assert res.returncode == 1
    path = Path(res.stdout.strip().splitlines()[-1])
    rec = load_record(path)
    assert rec["status"] == "timeout" and "timed out after 4 s" in rec["error"]["message"]
    assert "status    timeout" in res.stdout


@pytest.mark.slow
def test_show_compare_export(tiny_run, tmp_path):
    show = btune("show", str(tiny_run))
    assert show.returncode == 0 and "step time p50" in show.stdout and "status    ok" in show.stdout
    assert orjson.loads(btune("show", str(tiny_run), "--json").stdout)["id"] == tiny_run.stem
    cmp = btune("compare", str(tiny_run), str(tiny_run))
    assert cmp.returncode == 0 and "(+0.0%)" in cmp.stdout and "same config" in cmp.stdout

    rows = orjson.loads(btune("export", str(tiny_run), "--format", "json").stdout)
    rec = load_record(tiny_run)
    p50 = next(r for r in rows if r["metric"] == "step_ms" and r["statistic"] == "p50")
    assert p50["value"] == rec["summary"]["step_ms"]["p50"] and p50["unit"] == "ms"
    assert p50["run_id"] == rec["id"] and p50["workload"] == "dense" and p50["options"]["preset"] == "tiny"
    csv_text = btune("export", str(tiny_run), "--format", "csv").stdout
    assert csv_text.splitlines()[0] == "run_id,workload,status,started,options,metric,statistic,value,unit"
    assert len(csv_text.splitlines()) == len(rows) + 1
    prom = btune("export", str(tiny_run), "--format", "prometheus").stdout
    assert "# TYPE btune_step_seconds summary" in prom
    p50_s = rec["summary"]["step_ms"]["p50"] / 1000
    assert f'btune_step_seconds{{quantile="0.5",run="{rec["id"]}",status="ok",workload="dense"}} {p50_s!r}' in prom
    assert "opt_" not in prom and 'btune_run_info{' in prom and 'preset="tiny"' in prom
    out = tmp_path / "x.csv"
    assert btune("export", str(tiny_run), "--format", "csv", "-o", str(out)).returncode == 0
    assert out.read_text() == csv_text


@pytest.mark.slow
def test_replay_text_json_and_speed(tiny_run):
    text = tui("--replay", str(tiny_run))
    assert text.returncode == 0 and "step 5" in text.stdout
    assert any(line.startswith("end: ok") for line in text.stdout.splitlines())
    assert "throughput (steady tokens / steady time)" in text.stdout  # the registry's blocks close the replay
    lines = [orjson.loads(x) for x in tui("--replay", str(tiny_run), "--json").stdout.splitlines()]
    steps = [e for e in lines if e["type"] == "step"]
    rec = load_record(tiny_run)
    assert [e["step"] for e in steps] == rec["series"]["step"]["0"]["step"]
    assert [e["t"] for e in lines[1:-1]] == sorted(e["t"] for e in lines[1:-1])
    assert lines[-1]["type"] == "end" and lines[-1]["status"] == "ok"


def paced_record(tmp_path: Path) -> Path:
    rec = {"schema_version": RECORD_SCHEMA_VERSION, "id": "paced", "status": "ok", "exit_code": 0,
           "started": "s", "ended": "e", "started_ts": 1000.0, "config": {"workload": "dense"}, "environment": {},
           "series": {"step": {"0": {"t": [1000.5, 1001.0, 1002.0], "step": [0, 1, 2], "step_ms": [1.0] * 3,
                                     "tokens": [1] * 3}}}, "events": [], "summary": {}}
    path = tmp_path / "paced.json"
    path.write_bytes(orjson.dumps(rec))
    return path


@pytest.mark.slow
def test_replay_speed_is_an_option_of_the_command(tmp_path):
    assert tui("--replay", str(paced_record(tmp_path)), "--speed", "4").returncode == 0


def test_replay_speed_paces_the_timeline(tmp_path):
    path = paced_record(tmp_path)
    # The pacing itself, on a clock the test owns: each event is due at (t - started) / speed.
    from tuner.replay import replay

    clock = [0.0]
    monotonic = time.monotonic
    time.monotonic = lambda: clock[0]  # type: ignore[assignment]
    try:
        def sleep(s: float) -> None:
            clock[0] += s

        replay(load_record(path), io.StringIO(), speed=4, sleep=sleep)
    finally:
        time.monotonic = monotonic  # type: ignore[assignment]
    assert clock[0] == pytest.approx(0.5)  # the last event is 2 s in: 0.5 s at 4x
    clock[0] = 0.0
    replay(load_record(path), io.StringIO(), speed=0, sleep=sleep)
    assert clock[0] == 0.0


@pytest.mark.slow
def test_replay_never_imports_textual(tiny_run):
    code = ("import sys; sys.modules['textual'] = None\n"
            "from tuner.tui.main import main as tui_main\n"
            f"rc = tui_main(['--replay', {str(tiny_run)!r}, '--json'])\n"
            "assert 'textual' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
            "sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ(), timeout=60)
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["corrupt", "truncated", "newer", "missing"])
def test_bad_run_files_to_show_compare_replay_are_exit_2(tiny_run, tmp_path, kind):
    path = tmp_path / f"{kind}.json"
    good = tiny_run.read_bytes()
    content = {"corrupt": b"\x00\xffnot json at all",
               "truncated": good[: len(good) // 2],
               "newer": orjson.dumps({**orjson.loads(good), "schema_version": RECORD_SCHEMA_VERSION + 1})}.get(kind)
    if content is not None:
        path.write_bytes(content)
    for res in (btune("show", str(path)), btune("compare", str(tiny_run), str(path)),
                btune("export", str(path)), tui("--replay", str(path))):
        assert res.returncode == 2, res
        err = res.stderr.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in res.stderr and str(path) in err[0]


@pytest.mark.slow
def test_console_killed_mid_run_is_recovered_as_interrupted(tmp_path):
    proc = start_btune("run", "dense", "--steps", "100000", "--out", str(tmp_path),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = live_journal(tmp_path, 3, timeout=60)
    workload = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.wait()
    # the workload is in its own process group: stop it as its console would have
    for line in journal.read_bytes().splitlines()[:1]:
        assert b'"journal":"start"' in line
    for child in workload:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(workload, timeout=60)
    listing = btune("runs", "--out", str(tmp_path))
    assert "btune runs recover" in listing.stdout
    res = btune("runs", "recover", "--out", str(tmp_path))
    assert res.returncode == 0 and "as interrupted" in res.stdout
    rec = load_record(next(tmp_path.glob("*.json")))
    assert rec["status"] == "interrupted"
    assert len(rec["series"]["step"]["0"]["step"]) >= 3
    assert not list(tmp_path.glob("*.journal.jsonl"))


@pytest.mark.slow
def test_runs_listing_marks_an_unreadable_file(tiny_run, tmp_path):
    (tmp_path / "broken.json").write_bytes(b"{")
    (tmp_path / tiny_run.name).write_bytes(tiny_run.read_bytes())
    res = btune("runs", "--out", str(tmp_path))
    assert res.returncode == 0 and "unreadable" in res.stdout and tiny_run.stem in res.stdout


@pytest.mark.slow
def test_ctrl_c_cancels_and_still_writes_the_record(tmp_path):
    proc = start_btune("run", "dense", "--steps", "100000", "--out", str(tmp_path),
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal has it
    live_journal(tmp_path, 2, timeout=60)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert out.strip().splitlines()[-1].endswith(".json"), (out[-2000:], err)
    rec = load_record(Path(out.strip().splitlines()[-1]))
    assert rec["status"] == "cancelled" and len(rec["series"]["step"]["0"]["step"]) >= 2
