"""The fault suite: every way a run or a run file can go wrong ends in a valid record or one clear line.

Each test reproduces one item of the fault report (issue 14) on real processes, sockets and files.
"""

import fcntl
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import psutil
import pytest
from support import ROOT, btune, live_journal, program, program_runner, start_btune, wait_until
from test_fuzz import read_everything

from tuner import cli
from tuner.record import MAX_COLUMNS, RecordBuilder
from tuner.runner import clean_stale_sockdirs, failure_line
from tuner.runs import JOURNAL_SUFFIX, RunFileError, load_record, read_bounded
from tuner.sweep import expand


def one_line_error(res: subprocess.CompletedProcess, code: int = 2) -> str:
    assert res.returncode == code, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    return lines[0]


# -- 1. typed events -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_malformed_events_drop_their_bad_fields_and_the_run_goes_on(tmp_path):
    seen = []
    r = program_runner(tmp_path, program("emit_steps.py", "4", "0.0", "malformed"), telemetry=False)
    r.subscribe(seen.append)
    res = r.run()
    assert res.status == "ok"
    rec = load_record(res.record_path)
    steps = rec["series"]["step"]["0"]
    # step=[i] and step_ms="fast" lose the event; tokens=[100] loses only the field
    rows = sorted(zip(steps["step"], steps["tokens"], strict=True))
    assert rows == [(i, 100) for i in range(4)] + [(1000 + i, None) for i in range(4)]
    assert all(isinstance(x, int) for x in steps["step"])
    gpu = rec["series"]["gpu"]["0"]
    assert "power_w" not in gpu and "mem_used_mb" not in gpu
    rejected = rec["summary"]["rejected"]
    # per round: step=[i] (1 bad field), step_ms="fast" with tokens="100" (2) and a list as a log message (1)
    # lose the event; tokens=[100] (1), the gpu event (2), the request (2) and experts (2) lose fields
    assert rejected["events"] == 3 * 4
    assert rejected["fields"] == (1 + 2 + 1 + 1 + 2 + 2 + 2) * 4
    assert all(type(e.get("step", 0)) is int for e in seen if e["type"] == "step")
    read_everything(rec, res.record_path)


@pytest.mark.slow
def test_a_journal_of_malformed_events_recovers(tmp_path, monkeypatch):
    r = program_runner(tmp_path, program("emit_steps.py", "3", "0.0", "malformed"), telemetry=False)
    res = r.run()
    journal = tmp_path / f"{res.run_id}{JOURNAL_SUFFIX}"
    raw = [orjson.dumps(o) for o in (
        {"journal": "start", "id": res.run_id, "started": 1.0, "config": {}, "environment": {}},
        {"v": 1, "type": "step", "t": 2.0, "rank": 0, "step": [1], "step_ms": 1.0},
        {"v": 1, "type": "step", "t": 2.0, "rank": 0, "step": 1, "step_ms": 1.0, "tokens": "many"},
        {"v": 1, "type": "gpu", "t": 2.0, "rank": -1, "gpu": 0, "power_w": "garbage"},
    )]
    res.record_path.unlink()
    journal.write_bytes(b"\n".join(raw) + b"\n")
    assert cli.main(["runs", "recover", "--out", str(tmp_path)]) == 0
    rec = load_record(res.record_path)
    assert rec["status"] == "interrupted"
    assert rec["series"]["step"]["0"]["step"] == [1]
    read_everything(rec, res.record_path)


def test_keys_that_change_every_event_cannot_grow_the_record_quadratically():
    b = RecordBuilder("wide", 0.0, {}, {})
    for i in range(3000):
        b.add({"v": 1, "type": "step", "t": float(i), "rank": 0, "step": i, "step_ms": 1.0, f"k{i}": i})
    rec = b.finish("ok", 0, 3000.0)
    cols = rec["series"]["step"]["0"]
    assert len(cols) == MAX_COLUMNS
    assert rec["summary"]["rejected"]["columns"] == 3000 - (MAX_COLUMNS - 3)  # t, step, step_ms
    assert len(orjson.dumps(rec)) < 5_000_000


# -- 2. every way the console ends leaves a record --------------------------------------------------------
def start_console(tmp_path: Path, *extra: str) -> subprocess.Popen:
    return start_btune("run", "dense", "--preset", "tiny", "--device", "cpu", "--duration", "300",
                       "--out", str(tmp_path), "--no-telemetry", *extra)


def wait_steps(tmp_path: Path, n: int = 2) -> Path:
    """The live journal, once it holds ``n`` steady steps."""
    return live_journal(tmp_path, n, b'"warmup":false')


def workload_pids(console: subprocess.Popen) -> list[int]:
    return [p.pid for p in psutil.Process(console.pid).children(recursive=True)]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_to_btune_run_cancels_and_writes_the_record(tmp_path, sig):
    console = start_console(tmp_path)
    wait_steps(tmp_path)
    children = workload_pids(console)
    assert children
    console.send_signal(sig)
    _, err = console.communicate(timeout=120)
    assert console.returncode == 1, err
    recs = list(tmp_path.glob("*.json"))
    assert len(recs) == 1 and not list(tmp_path.glob(f"*{JOURNAL_SUFFIX}"))
    rec = load_record(recs[0])
    assert rec["status"] == "cancelled"
    if sig != signal.SIGINT:
        assert rec["error"]["message"] == f"cancelled by {sig.name}"
    assert rec["summary"]["steps"]["steady"] >= 2
    assert not [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


@pytest.mark.slow
def test_sigkill_of_the_console_ends_the_workload_and_the_journal_recovers(tmp_path):
    console = start_console(tmp_path)
    journal = wait_steps(tmp_path)
    children = [psutil.Process(p) for p in workload_pids(console)]
    console.kill()
    console.wait()
    gone, alive = psutil.wait_procs(children, timeout=60)  # the watchdog sees the channel close
    assert not alive, f"orphaned workload: {alive}"
    assert all(p.returncode == 75 for p in gone if p.returncode is not None)
    res = btune("runs", "recover", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    rec = load_record(tmp_path / journal.name.replace(JOURNAL_SUFFIX, ".json"))
    assert rec["status"] == "interrupted" and rec["summary"]["steps"]["steady"] >= 2


@pytest.mark.slow
def test_a_full_disk_gives_one_line_keeps_the_journal_and_recovers_later(tmp_path):
    limit = 150_000  # bytes per file: the journal outgrows it mid-run (EFBIG, as a full disk gives ENOSPC)

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    # the CLI's run loop (tuner.console.execute) over a workload that sends 3,000 steps
    code = ("import sys; from pathlib import Path\n"
            "from tuner.console import execute\nfrom tuner.launch import RunConfig\n"
            f"argv = {program('emit_steps.py', '3000', '0', 'ok')!r}\n"
            f"sys.exit(execute(RunConfig('test', {{}}, tuple(argv)), Path({str(tmp_path)!r})))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         preexec_fn=small_files, timeout=300)
    line = one_line_error(res)
    assert "cannot write the run record" in line and "btune runs recover" in line
    assert not list(tmp_path.glob("*.json"))
    (journal,) = tmp_path.glob(f"*{JOURNAL_SUFFIX}")
    assert journal.stat().st_size <= limit
    again = btune("runs", "recover", "--out", str(tmp_path))  # room again
    assert again.returncode == 0, again.stderr
    (path,) = tmp_path.glob("*.json")
    rec = load_record(path)
    assert rec["status"] == "interrupted" and 0 < rec["summary"]["steps"]["total"] < 3000


# -- 5. recovery writes only inside the runs directory, never over a record or a live run ------------------
def journal_doc(run_id: str, steps: int = 3) -> bytes:
    lines = [{"journal": "start", "id": run_id, "started": 100.0, "config": {"workload": "x"}, "environment": {}}]
    lines += [{"v": 1, "type": "step", "t": 100.0 + i, "rank": 0, "step": i, "step_ms": 5.0, "tokens": 10}
              for i in range(steps)]
    return b"".join(orjson.dumps(o) + b"\n" for o in lines)


@pytest.mark.slow
def test_recovery_ignores_the_id_inside_the_journal(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    outside = tmp_path / "x.json"
    outside.write_text("precious")
    (runs / f"evil{JOURNAL_SUFFIX}").write_bytes(journal_doc("../x"))
    (runs / f"abs{JOURNAL_SUFFIX}").write_bytes(journal_doc(str(tmp_path / "y")))
    res = btune("runs", "recover", "--out", str(runs))
    assert res.returncode == 0, res.stderr
    assert outside.read_text() == "precious" and not (tmp_path / "y.json").exists()
    assert sorted(p.name for p in runs.glob("*.json")) == ["abs.json", "evil.json"]
    assert load_record(runs / "evil.json")["id"] == "evil"


@pytest.mark.slow
def test_recovery_never_replaces_a_record_and_never_touches_a_live_run(tmp_path):
    (tmp_path / f"done{JOURNAL_SUFFIX}").write_bytes(journal_doc("done"))
    (tmp_path / f"live{JOURNAL_SUFFIX}").write_bytes(journal_doc("live"))
    # a record written since (the run's own console finished it): never replaced, its journal left alone
    r = RecordBuilder("done", 1.0, {}, {}).finish("ok", 0, 2.0)
    (tmp_path / "done.json").write_bytes(orjson.dumps(r))
    # the live one: a console holds its lock (a real flock, held by another process)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"fh = open({str(tmp_path / ('live' + JOURNAL_SUFFIX))!r}, 'ab')\n"
        "fcntl.flock(fh, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = btune("runs", "recover", "--out", str(tmp_path))
        listing = btune("runs", "--out", str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 0 and "skipped live" in res.stdout, res.stderr
    assert (tmp_path / f"live{JOURNAL_SUFFIX}").exists() and not (tmp_path / "live.json").exists()
    assert (tmp_path / "done.json").read_bytes() == orjson.dumps(r)
    assert " live " in listing.stdout + " "
    # the lock gone, the live run is an interrupted one now
    assert btune("runs", "recover", "--out", str(tmp_path)).returncode == 0
    assert load_record(tmp_path / "live.json")["status"] == "interrupted"
    assert (tmp_path / "done.json").read_bytes() == orjson.dumps(r)


def test_recovery_refuses_to_replace_a_record_that_appears_meanwhile(tmp_path):
    from tuner.runs import atomic_write

    (tmp_path / "r.json").write_text("first")
    with pytest.raises(FileExistsError):
        atomic_write(tmp_path / "r.json", b"second", replace=False)
    assert (tmp_path / "r.json").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left


@pytest.mark.slow
def test_a_live_run_holds_its_journal_lock(tmp_path):
    r = program_runner(tmp_path, program("emit_steps.py", "2", "0.0", "hang"), telemetry=False)
    r.start()
    try:
        journal = tmp_path / f"{r.run_id}{JOURNAL_SUFFIX}"
        fd = os.open(journal, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        res = btune("runs", "recover", "--out", str(tmp_path))
        assert "still live" in res.stdout and journal.exists()
    finally:
        r.cancel()
        r.wait()


# -- 7/8. bounded reads; recovery that continues -----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("command", [["show"], ["compare", "{p}", "{p}"], ["export"]])
def test_special_files_are_refused_in_one_line(tmp_path, command):
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for p in (zero, fifo):
        args = [a.format(p=p) for a in command] + ([] if "{p}" in " ".join(command) else [str(p)])
        line = one_line_error(btune(*args, timeout=60))  # a hang would time out here
        assert "not a regular file" in line


def test_a_run_file_over_the_size_bound_is_refused(tmp_path, monkeypatch):
    p = tmp_path / "big.json"
    p.write_bytes(b" " * (3 << 20))
    monkeypatch.setenv("BTUNE_MAX_RUN_FILE_MB", "2")
    with pytest.raises(RunFileError, match="too large"):
        read_bounded(p)


@pytest.mark.slow
def test_btune_show_refuses_a_run_file_over_the_size_bound_in_one_line(tmp_path):
    p = tmp_path / "big.json"
    p.write_bytes(b" " * (3 << 20))
    assert "too large" in one_line_error(btune("show", str(p), env={"BTUNE_MAX_RUN_FILE_MB": "2"}))


@pytest.mark.slow
def test_recovery_reports_each_bad_journal_and_recovers_the_others(tmp_path):
    (tmp_path / f"a-empty{JOURNAL_SUFFIX}").write_bytes(b"")
    (tmp_path / f"b-notime{JOURNAL_SUFFIX}").write_bytes(b'{"journal": "start", "id": "b", "started": "soon"}\n')
    (tmp_path / f"c-dir{JOURNAL_SUFFIX}").mkdir()
    (tmp_path / f"d-zero{JOURNAL_SUFFIX}").symlink_to("/dev/zero")
    (tmp_path / f"e-good{JOURNAL_SUFFIX}").write_bytes(journal_doc("e-good"))
    res = btune("runs", "recover", "--out", str(tmp_path), timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    errors = res.stderr.strip().splitlines()
    assert len(errors) == 4 and all(e.startswith("error: ") for e in errors)
    assert "recovered e-good as interrupted" in res.stdout
    assert load_record(tmp_path / "e-good.json")["summary"]["steps"]["total"] == 3


# -- 9. the smaller items --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("ref", ["2026*", "x" * 300, "[", "a/../../etc/passwd"])
def test_odd_run_references_get_one_line(tmp_path, ref):
    (tmp_path / "20261130-000000-dense-0000.json").write_text("{}")
    one_line_error(btune("show", ref, "--out", str(tmp_path)))


@pytest.mark.slow
@pytest.mark.parametrize("version", [0, -1, True, 2])
def test_schema_versions_out_of_range_are_refused(tmp_path, version):
    rec = RecordBuilder("v", 1.0, {}, {}).finish("ok", 0, 2.0)
    rec["schema_version"] = version
    p = tmp_path / "v.json"
    p.write_bytes(orjson.dumps(rec))
    one_line_error(btune("show", str(p)))


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["run", "dense", "--timeout", "nan"], ["run", "dense", "--timeout", "inf"], ["run", "dense", "--step", "3"],
    ["run", "dense", "--duration", "nan"], ["run", "dense", "--sample-hz", "nan"],
    ["sweep", "dense", "--timeout", "-inf"],
])
def test_non_finite_numbers_and_abbreviations_are_refused(args):
    one_line_error(btune(*args))


def test_sweep_keeps_a_distributions_own_commas():
    combos = expand("serve", ["--prompt-len", "uniform:4,48,fixed:16", "--output-len", "uniform:2,32"])
    assert [c["prompt_len"] for c in combos] == ["uniform:4,48", "fixed:16"]
    assert {c["output_len"] for c in combos} == {"uniform:2,32"}


def test_torchruns_banner_is_not_the_error_line():
    stderr = (
        "[rank0]: Traceback (most recent call last):\n"
        '[rank0]:   File "/x/dense.py", line 9, in <module>\n'
        "[rank0]: ValueError: --tp 2 must divide the attention heads (3) and KV heads (3)\n"
        "E1130 08:00:00.000000 1 torch/distributed/elastic/multiprocessing/api.py:882] failed (exitcode: 1)\n"
        "Traceback (most recent call last):\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
        "============================================================\n"
        "workloads.dense FAILED\n"
        "------------------------------------------------------------\n"
        "Failures:\n  <NO_OTHER_FAILURES>\n"
        "Root Cause (first observed failure):\n[0]:\n  time      : 2026-11-30_08:00:00\n"
        "  exitcode  : 1 (pid: 1)\n  error_file: <N/A>\n"
        "  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html\n"
        "============================================================\n")
    assert failure_line(stderr) == "ValueError: --tp 2 must divide the attention heads (3) and KV heads (3)"


@pytest.mark.slow
def test_json_output_that_nobody_reads_never_stalls_the_workload(tmp_path):
    # --json to a pipe this test does not read until the record exists: 5,000 step events are far more than
    # the pipe and the socket hold, so a console that wrote them in line would hold up the workload for good
    from tuner.console import execute
    from tuner.launch import RunConfig

    config = RunConfig("test", {}, tuple(program("emit_steps.py", "5000", "0", "ok")))
    read_fd, write_fd = os.pipe()
    out = os.fdopen(write_fd, "w")
    codes: list[int] = []
    th = threading.Thread(target=lambda: codes.append(execute(config, tmp_path, json_lines=True, out=out)))
    th.start()
    try:
        (path,) = wait_until(lambda: list(tmp_path.glob("*.json")), 240, "the record (stalled behind its stdout?)")
        rec = load_record(path)
        assert rec["status"] == "ok" and rec["summary"]["steps"]["total"] == 5000
    finally:
        chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: chunks.append(os.fdopen(read_fd, "rb").read()))
        reader.start()
        th.join(timeout=60)
        out.close()
        reader.join(timeout=60)
    printed = b"".join(chunks)
    assert codes == [0]
    assert printed.count(b'"type":"step"') > 100  # the events were still printed, behind the run


@pytest.mark.slow
def test_stale_socket_folders_of_dead_consoles_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"btune-{dead.pid}-abcd1234"
    stale.mkdir()
    (stale / "events.sock").write_text("")
    mine = tmp_path / f"btune-{os.getpid()}-abcd1234"
    mine.mkdir()
    assert clean_stale_sockdirs(str(tmp_path)) == 1
    assert not stale.exists() and mine.exists()


@pytest.mark.slow
def test_the_console_removes_its_socket_folder(tmp_path):
    r = program_runner(tmp_path, program("emit_steps.py", "1", "0.0", "ok"), telemetry=False)
    folder = Path(r._sockdir)
    assert r.run().status == "ok"
    assert not folder.exists()


@pytest.mark.slow
def test_a_workload_whose_console_is_gone_ends_itself(tmp_path):
    # a console that died before the workload connected leaves a socket path nobody listens on
    path = tmp_path / "events.sock"
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    res = subprocess.run(program("emit_steps.py", "2", "0.0", "hang"), env={**os.environ, "BTUNE_EVENTS": str(path)},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 75 and "console" in res.stderr
