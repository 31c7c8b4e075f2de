"""btune bench: the config's checks, the SQLite history, the two regression rules and missing data (quick), and
real rounds of tiny CPU jobs through the CLI (slow)."""

from __future__ import annotations

import json
import multiprocessing
import random
import socket
import sqlite3
import threading
import urllib.request
from pathlib import Path

import pytest
from support import ROOT, btune, free_port, refused, start_btune, wait_until

from tuner.bench import BenchError
from tuner.bench.config import load, parse
from tuner.bench.detect import baseline_rule, change_rule
from tuner.bench.history import SCHEMA_VERSION, History
from tuner.bench.run import analyse

EXAMPLE = ROOT / "docs" / "examples" / "bench.toml"
SCRIPT = '[[job]]\nname = "s"\ncommand = ["python", "-c", "pass"]\n'


def write(tmp_path: Path, text: str, name: str = "bench.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- the config -----------------------------------------------------------------------------------
def test_the_example_parses_with_registry_metrics():
    config = load(EXAMPLE)
    assert config.name == "nightly"
    assert [j.name for j in config.jobs] == ["dense-tiny", "serve-tiny", "ppl-gate", "script"]
    dense = config.job("dense-tiny")
    assert dense.repeats == 3 and dense.run.options["preset"] == "tiny"
    assert [(w.key, w.higher_is_better) for w in dense.watch] == [("throughput_tokens_per_s", True),
                                                                  ("step_ms.p50", False)]
    assert config.job("serve-tiny").watch[0].key == "ttft_ms.p99"
    assert [(w.key, w.tolerance, w.higher_is_better) for w in config.job("ppl-gate").watch] == [
        ("perplexity", 0.005, False)]
    assert config.job("script").repeats == 2 and config.job("script").run.workload == "command"


@pytest.mark.parametrize(("text", "says"), [
    ('name = "x"\nrepeat = 2\n' + SCRIPT, "unknown key 'repeat'"),
    ('[[job]]\nname = "s"\ncommand = ["python"]\nretries = 1\n', "job 's': unknown key 'retries'"),
    (SCRIPT + 'watch = [{ metric = "duration", tolrance = 0.1 }]\n', "watch 1: unknown key 'tolrance'"),
    ('[[job]]\nname = "d"\nworkload = "dense"\noptions = { preset = "tiny", stepz = 3 }\n', "no option --stepz"),
    ('[[job]]\nname = "d"\nworkload = "dense"\noptions = { steps = -1 }\n', "job 'd'"),
    ('[[job]]\nname = "d"\nworkload = "nope"\n', "unknown workload 'nope'"),
    (SCRIPT + 'watch = [{ metric = "tokens_per_s" }]\n', "not in the registry"),
    ('[[job]]\nname = "d"\nworkload = "dense"\nwatch = [{ metric = "perplexity" }]\n', "not one of dense's figures"),
    (SCRIPT + 'watch = [{ metric = "duration", direction = "up" }]\n', "direction 'up'"),
    ('[[job]]\nname = "d"\nworkload = "dense"\ncommand = ["x"]\n', "not both or neither"),
    (SCRIPT + SCRIPT, "used twice"),
    ('name = "x"\n', "no [[job]]"),
    ("name = [", "not TOML"),
])
def test_a_bad_config_is_one_line(tmp_path, text, says):
    with pytest.raises(BenchError) as info:
        load(write(tmp_path, text))
    assert says in str(info.value) and "\n" not in str(info.value)


def test_the_cli_refuses_bad_input_before_anything_runs(tmp_path, capsys):
    history = tmp_path / "h.sqlite"
    bad = write(tmp_path, '[[job]]\nname = "d"\nworkload = "dense"\noptions = { preset = "huge!" }\n')
    line = refused(capsys, ["bench", str(bad), "--history", str(history), "--out", str(tmp_path / "runs")])
    assert line.startswith("error: btune bench: ") and "preset" in line
    assert not history.exists()
    assert "cannot read" in refused(capsys, ["bench", str(tmp_path / "missing.toml"), "--out", str(tmp_path)])
    good = write(tmp_path, SCRIPT, "good.toml")
    assert "no job 'x'" in refused(capsys, ["bench", str(good), "--job", "x", "--history", str(history)])
    assert not history.exists()
    history.write_bytes(b"this is not a database, it is text" * 100)
    assert "cannot use history" in refused(capsys, ["bench", str(good), "--history", str(history),
                                                    "--out", str(tmp_path / "runs")])
    fresh = tmp_path / "fresh.sqlite"
    History(fresh).close()
    assert "no such round" in refused(capsys, ["bench", str(good), "--history", str(fresh), "--baseline", "7",
                                               "--out", str(tmp_path / "runs")])
    assert History(fresh).rounds() == []


# -- the history ----------------------------------------------------------------------------------
def _job_rows(values: list[float], metric: str = "m", status: str = "ok") -> list[dict]:
    return [{"repeat": i + 1, "run_id": f"r{i}", "record_path": f"/x/r{i}.json", "status": status,
             "metrics": [(metric, v, "ms")]} for i, v in enumerate(values)]


def test_history_create_append_read(tmp_path):
    h = History(tmp_path / "h.sqlite")
    r1 = h.start_round("nightly", "abc", "deadbeef", "/res/1")
    h.add_job(r1, "j", _job_rows([1.0, 2.0]))
    h.add_job(r1, "k", [{"repeat": 1, "status": "failed", "metrics": []}])
    h.end_round(r1, {"gpu": "H200", "driver": "570", "torch": "2.13", "btune": "0.1", "host": "n1"})
    h.close()
    h = History(tmp_path / "h.sqlite")  # reopened: the same rows
    (rnd,) = h.rounds("nightly")
    assert rnd["git_commit"] == "deadbeef" and rnd["gpu"] == "H200" and rnd["ended"]
    assert h.values("nightly") == {(r1, "j", "m"): [1.0, 2.0]}
    assert h.job_runs(r1) == {"j": ["ok", "ok"], "k": ["failed"]}
    assert [r["value"] for r in h.rows()] == [1.0, 2.0] and h.rows()[0]["commit"] == "deadbeef"
    assert h.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert h.db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_a_history_from_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "h.sqlite"
    History(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(BenchError, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
        History(path)


def test_a_locked_history_is_one_line(tmp_path):
    path = tmp_path / "h.sqlite"
    History(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(BenchError, match=r"cannot use history .*locked"):
            History(path, busy_ms=100)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert History(path).rounds() == []


def _append(path: str, worker: int, jobs: int) -> None:
    h = History(path)
    rnd = h.start_round(f"w{worker}", "", None, "")
    for j in range(jobs):
        h.add_job(rnd, f"job{j}", _job_rows([float(worker), float(j), 3.0]))
    h.close()


def test_concurrent_writers_keep_every_row(tmp_path):
    path = str(tmp_path / "h.sqlite")
    threads = [threading.Thread(target=_append, args=(path, w, 20)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    h = History(path)
    assert len(h.rounds()) == 6 and len(h.rows()) == 6 * 20 * 3


@pytest.mark.slow
def test_concurrent_writer_processes_keep_every_row(tmp_path):
    path = str(tmp_path / "h.sqlite")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append, args=(path, w, 30)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    h = History(path)
    assert len(h.rounds()) == 4 and len(h.rows()) == 4 * 30 * 3


# -- the rules ------------------------------------------------------------------------------------
def test_baseline_rule_needs_significance_effect_and_the_bad_direction():
    base = [100.0, 101.0, 99.0]
    slower = baseline_rule("j", "tps", base, [90.0, 91.0, 89.5], 0.05, True, 1)
    assert slower.regression and slower.delta < -0.05 and slower.p < 0.05
    assert not baseline_rule("j", "tps", base, [110.0, 111.0, 109.0], 0.05, True, 1).regression  # faster
    assert not baseline_rule("j", "ms", base, [90.0, 91.0, 89.5], 0.05, False, 1).regression  # lower ms: better
    assert not baseline_rule("j", "tps", base, [97.0, 98.0, 96.5], 0.05, True, 1).regression  # within tolerance
    noisy = baseline_rule("j", "tps", [100.0, 70.0, 130.0], [90.0, 60.0, 115.0], 0.05, True, 1)
    assert not noisy.regression and noisy.p > 0.05  # a big mean change inside the noise
    one = baseline_rule("j", "tps", [100.0], [50.0], 0.05, True, 1)
    assert not one.regression and "too few runs" in one.message


def _noise(n: int, mean: float, sd: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(mean, sd) for _ in range(n)]


def test_a_step_that_persists_three_rounds_is_a_regression():
    series = _noise(8, 100, 1, 1) + _noise(3, 90, 1, 2)
    found = change_rule("j", "tps", list(range(1, 12)), series, 0.05, True)
    assert [f.baseline for f in found if f.regression] == [9]


def test_a_step_seen_once_is_not_yet_a_regression():
    series = [*_noise(8, 100, 1, 1), 90.0]
    assert not [f for f in change_rule("j", "tps", list(range(1, 10)), series, 0.05, True) if f.regression]


def test_a_single_outlier_is_not_a_regression():
    series = _noise(10, 100, 1, 3)
    series[5] = 70.0
    assert not [f for f in change_rule("j", "tps", list(range(1, 11)), series, 0.05, True) if f.regression]


@pytest.mark.parametrize("seed", range(5))
def test_a_a_noise_is_not_a_regression(seed):
    series = _noise(20, 100, 3, seed)
    assert not [f for f in change_rule("j", "tps", list(range(1, 21)), series, 0.05, True) if f.regression]


def test_an_improvement_is_not_a_regression():
    series = _noise(8, 100, 1, 1) + _noise(3, 120, 1, 2)
    found = change_rule("j", "tps", list(range(1, 12)), series, 0.05, True)
    assert found and not any(f.regression for f in found)


def test_missing_data_and_failed_runs_are_alerts(tmp_path):
    config = parse({"name": "n", "job": [{"name": "a", "command": ["python", "-c", "pass"],
                                          "watch": [{"metric": "duration"}]},
                                         {"name": "b", "command": ["python", "-c", "pass"],
                                          "watch": [{"metric": "duration"}]}]})
    h = History(tmp_path / "h.sqlite")
    r1 = h.start_round("n", "", None, "")
    h.add_job(r1, "a", _job_rows([1.0, 1.1], "duration"))
    h.add_job(r1, "b", _job_rows([1.0, 1.1], "duration"))
    r2 = h.start_round("n", "", None, "")
    h.add_job(r2, "a", _job_rows([1.05, 1.0], "duration"))
    h.add_job(r2, "b", [{"repeat": 1, "status": "failed", "metrics": []}])
    found = analyse(h, config, list(config.jobs), r2)
    alerts = {(f.job, f.rule) for f in found if f.regression}
    assert alerts == {("b", "failed"), ("b", "missing")}
    assert [f.rule for f in found if f.job == "a"] == ["baseline"]


# -- real rounds through the CLI ------------------------------------------------------------------
BENCH = """name = "ci"
repeats = 2
[[job]]
name = "serve"
workload = "serve"
repeats = 1
options = {{ preset = "tiny", num_requests = 4, device = "cpu" }}
watch = [{{ metric = "requests_finished", tolerance = 0.10 }}]  # timings are noise on a shared CPU
[[job]]
name = "script"
command = ["python", "-c", "import time; time.sleep({sleep})"]
watch = [{{ metric = "duration", tolerance = 0.3 }}]
[[job]]
name = "gone"
command = ["python", "-c", "import sys; sys.exit({gone})"]
watch = [{{ metric = "duration", tolerance = 5 }}]
"""


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    """Three rounds in one history: a first, an A/A, and one where the script sleeps 3x longer (a real
    slowdown) and the last job fails; then ``--job script`` alone, as slow as the third."""
    tmp = tmp_path_factory.mktemp("bench")
    history, out = tmp / "h.sqlite", tmp / "runs"
    args = ["--history", str(history), "--out", str(out), "--no-telemetry"]
    results = []
    for sleep, gone in ((0.4, 0), (0.4, 0), (1.2, 1)):
        cfg = write(tmp, BENCH.format(sleep=sleep, gone=gone), f"b{len(results)}.toml")
        results.append(btune("bench", str(cfg), *args, "--commit", f"c{len(results)}"))
    results.append(btune("bench", str(cfg), *args, "--job", "script"))
    return history, out, results


@pytest.mark.slow
def test_first_and_a_a_rounds_pass(rounds):
    history, out, results = rounds
    first, aa = results[0], results[1]
    assert first.returncode == 0, first.stdout + first.stderr
    assert "no earlier round" in first.stdout
    assert aa.returncode == 0, aa.stdout + aa.stderr
    assert "no regression, no missing data" in aa.stdout
    first_dir = sorted(out.glob("bench/ci-*"))[0]  # named by start time
    summary = json.loads((first_dir / "summary.json").read_text())
    assert summary["round"]["commit"] == "c0" and summary["result_dir"] == str(first_dir)
    assert [j["name"] for j in summary["jobs"]] == ["serve", "script", "gone"]
    assert json.loads((first_dir / "report.json").read_text())["regression"] is False
    assert (first_dir / "report.md").read_text() in first.stdout
    assert len(History(history).rounds()) == 4


@pytest.mark.slow
def test_a_real_slowdown_and_a_failed_job_exit_1(rounds):
    _, out, results = rounds
    slow = results[2]
    assert slow.returncode == 1, slow.stdout + slow.stderr
    assert "| script | duration | baseline | against round 2: REGRESSION" in slow.stdout
    assert "| gone | - | failed | FAILED" in slow.stdout
    assert "| gone | duration | missing | MISSING" in slow.stdout
    doc = json.loads(sorted(out.glob("bench/ci-*/report.json"))[2].read_text())
    assert doc["regression"] and {f["rule"] for f in doc["findings"] if f["regression"]} == {
        "baseline", "failed", "missing"}


@pytest.mark.slow
def test_job_runs_one_job_and_a_persisting_change_is_a_change_point(rounds):
    history, _, results = rounds
    one = results[3]
    # the same slow script as round 3: no change against it, but the slowdown now persists two rounds
    assert one.returncode == 1, one.stdout + one.stderr
    assert "| script | duration | baseline | against round 3: no significant change" in one.stdout
    assert "| script | duration | change-point | REGRESSION: change at round 3" in one.stdout
    h = History(history)
    last = h.rounds()[-1]["id"]
    assert h.job_runs(last) == {"script": ["ok", "ok"]}


# -- reading the history back ---------------------------------------------------------------------
def _history_with_a_step(path: Path) -> list[int]:
    h = History(path)
    ids = []
    for n, mean in enumerate([100.0] * 6 + [130.0] * 3):
        rnd = h.start_round("n", "", f"sha{n}", "")
        h.add_job(rnd, "j", _job_rows([mean + 0.5, mean - 0.5], "step_ms.p50"))
        h.add_job(rnd, "k", _job_rows([5.0, 5.0], "duration"))
        h.end_round(rnd, {"gpu": "H200"})
        ids.append(rnd)
    h.close()
    return ids


def test_bench_history_marks_the_change(tmp_path, capsys):
    from tuner import cli

    ids = _history_with_a_step(tmp_path / "h.sqlite")
    assert cli.main(["bench", "history", "j", "step_ms.p50", "--history", str(tmp_path / "h.sqlite")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "j step_ms.p50 (ms)" and len(lines) == 1 + len(ids)
    marked = [line for line in lines if "<-" in line]
    assert len(marked) == 1 and f"round {ids[6]:>4}" in marked[0] and "REGRESSION" in marked[0]
    assert "sha6" in marked[0] and "k duration" not in out


def test_bench_export_flat_rows(tmp_path, capsys):
    from tuner import cli

    _history_with_a_step(tmp_path / "h.sqlite")
    assert cli.main(["bench", "export", "--format", "csv", "--history", str(tmp_path / "h.sqlite")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "round,started,commit,gpu,job,metric,value,unit,run_id" and len(lines) == 1 + 9 * 4
    assert lines[1].split(",")[2:] == ["sha0", "H200", "j", "step_ms.p50", "100.5", "ms", "r0"]
    assert cli.main(["bench", "export", "--history", str(tmp_path / "h.sqlite")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 36 and rows[-1]["job"] == "k" and rows[-1]["value"] == 5.0
    assert "no history at" in refused(capsys, ["bench", "export", "--history", str(tmp_path / "none.sqlite")])
    assert "invalid choice" in refused(capsys, ["bench", "export", "--format", "prometheus"])


# -- the live endpoint ----------------------------------------------------------------------------
def test_metrics_port_in_use_or_a_bad_host_is_one_line_and_nothing_runs(tmp_path, capsys):
    cfg, out = write(tmp_path, SCRIPT), tmp_path / "runs"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = refused(capsys, ["bench", str(cfg), "--out", str(out), "--metrics-port", str(port)])
    assert line == f"error: --metrics-port {port}: cannot listen on 127.0.0.1:{port}: Address already in use"
    line = refused(capsys, ["bench", str(cfg), "--out", str(out), "--metrics-port", str(free_port()),
                            "--metrics-host", "no-such-host.invalid"])
    assert line.startswith("error: --metrics-port ") and "no-such-host.invalid" in line
    assert "a port is 1..65535" in refused(capsys, ["bench", str(cfg), "--metrics-port", "0"])
    assert not out.exists()  # no history, no result directory, no run


LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never through a proxy


@pytest.mark.slow
def test_metrics_port_serves_the_bench_run_that_is_running(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    cfg = write(tmp_path, '[[job]]\nname = "serve"\nworkload = "serve"\nrepeats = 1\n'
                          'options = { preset = "tiny", num_requests = 8, device = "cpu" }\n')
    port, out = free_port(), tmp_path / "runs"
    proc = start_btune("bench", str(cfg), "--out", str(out), "--history", str(tmp_path / "h.sqlite"),
                       "--no-telemetry", "--metrics-port", str(port))

    def scrape() -> dict[str, list] | None:
        try:
            with LOCAL.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        got: dict[str, list] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                got.setdefault(s.name, []).append(s)
        served = [s for s in got.get("btune_request_e2e_seconds_count", []) if s.value > 0]
        return got if served or got.get("btune_tokens_per_second") else None

    try:
        got = wait_until(scrape, 120, "the bench's endpoint to serve its run's figures", every=0.2)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stdout + stderr
    (info,) = got["btune_run_info"]
    rec = json.loads(next(out.glob("bench/*/summary.json")).read_text())
    run_id = rec["jobs"][0]["runs"][0]["run_id"]
    assert info.labels["run"] == run_id and info.labels["workload"] == "serve"
    figures = got.get("btune_request_e2e_seconds_count", []) + got.get("btune_tokens_per_second", [])
    assert figures and all(s.labels["run"] == run_id for s in figures)


def test_a_version_1_history_is_upgraded_in_place_and_keeps_its_rows(tmp_path):
    path = tmp_path / "h.sqlite"
    with sqlite3.connect(path) as db:  # the version-1 schema, as btune 0.1 wrote it
        db.executescript("""
            CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (1);
            CREATE TABLE rounds (id INTEGER PRIMARY KEY AUTOINCREMENT, started TEXT NOT NULL, ended TEXT,
                config_name TEXT NOT NULL, config_hash TEXT, gpu TEXT, driver TEXT, torch TEXT, btune TEXT, host TEXT,
                git_commit TEXT, result_dir TEXT);
            CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL REFERENCES rounds(id),
                job TEXT NOT NULL, repeat_index INTEGER NOT NULL, run_id TEXT, record_path TEXT, status TEXT NOT NULL);
            CREATE TABLE metrics (run INTEGER NOT NULL REFERENCES runs(id), job TEXT NOT NULL, metric TEXT NOT NULL,
                value REAL NOT NULL, unit TEXT NOT NULL DEFAULT '');
            INSERT INTO rounds (started, config_name) VALUES ('2026-11-30T00:00:00Z', 'nightly');
            INSERT INTO runs (round, job, repeat_index, status) VALUES (1, 'j', 1, 'ok');
            INSERT INTO metrics VALUES (1, 'j', 'tokens_per_s', 5.0, 'tok/s');""")
    h = History(path)
    assert h.db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    (old,) = h.rows()
    assert old["value"] == 5.0 and old["better"] is None and old["tolerance"] is None
    h.add_job(1, "j", [{"repeat": 2, "status": "ok", "metrics": [("tokens_per_s", 6.0, "tok/s", False, 0.2)]}])
    assert [(r["value"], r["better"], r["tolerance"]) for r in h.rows()] == [(5.0, None, None), (6.0, False, 0.2)]


def test_the_history_views_read_each_watch_s_direction_and_tolerance(tmp_path):
    """A figure watched "lower is better" (a registry figure that is higher-is-better): its drop is an
    improvement, its rise the regression; and the watch's tolerance, not the default, decides what is marked."""
    from tuner.bench.report import history_series

    h = History(tmp_path / "h.sqlite")
    for i, v in enumerate([100.0] * 6 + [80.0] * 3):
        rnd = h.start_round("nightly", "abc", f"sha{i}", "/res")
        h.add_job(rnd, "j", [{"repeat": 1, "status": "ok",
                              "metrics": [("tokens_per_s", v + 0.01 * (i % 2), "tok/s", False, 0.1)]}])
    rows = h.rows()
    (s,) = history_series(rows)
    (change,) = s.changes.values()
    assert not change.regression and change.baseline == 7  # lower is better: a drop is no regression
    (s,) = history_series([dict(r, better=None, tolerance=None) for r in rows])  # the registry's direction
    assert [c.regression for c in s.changes.values()] == [True]
    assert not history_series(rows, tolerance=0.5)[0].changes  # a 20% change under a 50% tolerance: unmarked
