"""The runner on real subprocesses: each way a run can end leaves a complete record."""

import os
import signal
import sys
import threading
import time

import orjson
import psutil
import pytest
from support import program, program_runner, wait_until

from tuner.runs import load_record


@pytest.mark.slow
def test_ok_run_writes_a_complete_record(tmp_path):
    seen = []
    r = program_runner(tmp_path, program("emit_steps.py", "6", "0.01", "ok"))
    r.subscribe(seen.append)
    res = r.run()
    assert res.status == "ok" and res.exit_code == 0
    rec = load_record(res.record_path)
    steps = rec["series"]["step"]["0"]
    assert steps["step"] == list(range(6))
    assert steps["warmup"] == [True] + [False] * 5
    assert rec["summary"]["steps"] == {"total": 6, "warmup": 1, "steady": 5}
    assert rec["summary"]["step_ms"]["n"] == 5
    assert rec["summary"]["tokens_total"] == 600
    assert any(e["type"] == "meta" for e in rec["events"])
    assert sum(1 for e in seen if e["type"] == "step") == 6
    assert not list(tmp_path.glob("*.journal.jsonl")), "the journal is removed once the record is whole"
    assert rec["environment"]["python"] and "versions" in rec["environment"]
    assert "PATH" not in orjson.dumps(rec["environment"]).decode()


@pytest.mark.slow
def test_stray_prints_and_fake_json_on_stdout_do_not_become_events(tmp_path):
    res = program_runner(tmp_path, program("emit_steps.py", "3", "0.0", "garbage")).run()
    rec = res.record
    assert res.status == "ok"
    assert rec["series"]["step"]["0"]["step"] == [0, 1, 2]
    logs = [e["message"] for e in rec["events"] if e["type"] == "log"]
    assert logs.count("a stray print from some library") == 3
    assert rec["summary"]["channel"]["bad_lines"] == 0


@pytest.mark.slow
def test_a_workload_that_raises_is_failed_with_its_traceback(tmp_path):
    res = program_runner(tmp_path, program("emit_steps.py", "3", "0.0", "raise")).run()
    assert res.status == "failed" and res.exit_code == 1
    assert "RuntimeError: boom" in res.record["error"]["stderr_tail"]
    assert "boom" in res.record["error"]["message"]
    assert res.record["series"]["step"]["0"]["step"] == [0, 1, 2]


@pytest.mark.slow
def test_nonzero_exit_is_failed(tmp_path):
    res = program_runner(tmp_path, program("emit_steps.py", "1", "0.0", "exit3")).run()
    assert res.status == "failed" and res.exit_code == 3


@pytest.mark.slow
@pytest.mark.parametrize("end", ["oom-cuda", "oom-host"])
def test_out_of_memory_is_recognised(tmp_path, end):
    res = program_runner(tmp_path, program("emit_steps.py", "2", "0.0", end)).run()
    assert res.status == "oom", res.record["error"]


@pytest.mark.slow
def test_sigkill_mid_run_is_killed_and_keeps_every_sample(tmp_path):
    ready = tmp_path / "ready"
    env = {**os.environ, "READY_FILE": str(ready)}
    r = program_runner(tmp_path, program("emit_steps.py", "20", "0.005", "hang"), env=env)
    r.start()
    wait_until(ready.exists, 20, f"{ready} to appear", every=0.02)
    time.sleep(0.2)  # let the socket deliver what was sent before the kill
    os.kill(int(ready.read_text()), signal.SIGKILL)
    res = r.wait()
    assert res.status == "killed" and res.exit_code == -signal.SIGKILL
    assert res.record["series"]["step"]["0"]["step"] == list(range(20))
    assert "SIGKILL" in res.record["error"]["message"]


@pytest.mark.slow
def test_timeout_stops_the_group(tmp_path):
    r = program_runner(tmp_path, program("emit_steps.py", "2", "0.0", "hang"), timeout=1.5, grace=1.0)
    res = r.run()  # the program never ends by itself: run() returns only if the timeout stops it
    assert res.status == "timeout" and res.record["error"]["message"] == "timed out after 1.5 s"
    assert res.exit_code is not None and res.exit_code != 0, "ended by the console's signal, not by itself"
    with pytest.raises(ProcessLookupError):
        os.killpg(r.proc.pid, 0)  # nothing is left in its process group
    assert res.record["series"]["step"]["0"]["step"] == [0, 1]


@pytest.mark.slow
def test_cancel_from_another_thread(tmp_path):
    ready = tmp_path / "ready"
    r = program_runner(tmp_path, program("emit_steps.py", "3", "0.0", "hang"),
                       env={**os.environ, "READY_FILE": str(ready)}, grace=1.0)
    r.start()
    wait_until(ready.exists, 20, f"{ready} to appear", every=0.02)
    threading.Timer(0.1, r.cancel).start()
    res = r.wait()
    assert res.status == "cancelled"
    assert res.record["series"]["step"]["0"]["step"] == [0, 1, 2]


@pytest.mark.slow
def test_children_in_the_group_are_not_left_behind(tmp_path):
    code = ("import subprocess,sys,time;"
            "p=subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']);"
            "open(sys.argv[1],'w').write(str(p.pid)); time.sleep(60)")
    pidfile = tmp_path / "child"
    r = program_runner(tmp_path, [sys.executable, "-c", code, str(pidfile)], timeout=1.0, grace=0.5)
    r.start()
    wait_until(pidfile.exists, 20, f"{pidfile} to appear", every=0.02)
    res = r.wait()
    assert res.status == "timeout"
    child = int(pidfile.read_text())
    time.sleep(0.2)
    try:  # gone, or a zombie nobody has reaped yet (the machine's init may not reap)
        assert psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        pass


@pytest.mark.slow
def test_a_program_that_cannot_start_is_a_failed_run(tmp_path):
    res = program_runner(tmp_path, ["/nonexistent/program"]).run()
    assert res.status == "failed" and res.record_path.exists()
    assert "cannot launch" in res.record["error"]["message"]


def test_argv_must_be_a_list_of_strings(tmp_path):
    with pytest.raises(TypeError):
        program_runner(tmp_path, ["python", "-c", "print(1)", 1])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        program_runner(tmp_path, [])


@pytest.mark.slow
def test_host_telemetry_follows_the_workload(tmp_path):
    res = program_runner(tmp_path, program("emit_steps.py", "10", "0.05", "ok"), sample_hz=20).run()
    host = res.record["series"]["host"]
    assert len(host["t"]) >= 5
    assert max(v for v in host["proc_rss_mb"] if v is not None) > 5
    # No NVML on this machine: one clear note, the rest works.
    notes = res.record["summary"]["notes"]
    if not res.record["environment"]["gpus"]:
        assert len([n for n in notes if "NVML" in n]) == 1
