"""Run files: atomic writes, validation of what is loaded, and recovery of a journal."""

import os
import signal
import subprocess
import sys

import orjson
import pytest
from support import wait_until

from tuner.record import journal_header, record_from_journal
from tuner.runs import (
    RECORD_SCHEMA_VERSION,
    RunFileError,
    RunsDirError,
    atomic_write,
    ensure_writable,
    load_record,
    resolve_run,
    validate_record,
)

ATOMIC_KILLED_MID_WRITE = """
import os, sys, time
from pathlib import Path
from tuner import runs
def slow_replace(src, dst):
    open(sys.argv[2], "w").write("written, not renamed")
    time.sleep(60)
os.replace = slow_replace
runs.atomic_write(Path(sys.argv[1]), b'{"new": true}')
"""


@pytest.mark.slow
def test_atomic_write_killed_between_write_and_rename_leaves_the_old_file_whole(tmp_path):
    target = tmp_path / "run.json"
    target.write_bytes(b'{"old": true}')
    flag = tmp_path / "flag"
    proc = subprocess.Popen([sys.executable, "-c", ATOMIC_KILLED_MID_WRITE, str(target), str(flag)])
    wait_until(flag.exists, 20, "the write before the rename", every=0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert orjson.loads(target.read_bytes()) == {"old": True}
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the temp file was written before the kill"
    assert orjson.loads(leftovers[0].read_bytes()) == {"new": True}


def test_atomic_write_replaces(tmp_path):
    target = tmp_path / "a.json"
    atomic_write(target, b"1")
    atomic_write(target, b"2")
    assert target.read_bytes() == b"2"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def good_record(**over):
    rec = {"schema_version": RECORD_SCHEMA_VERSION, "id": "x", "status": "ok", "exit_code": 0,
           "started": "s", "ended": "e", "config": {}, "environment": {}, "series": {}, "events": [], "summary": {}}
    rec.update(over)
    return rec


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "empty"),
        (b"{not json", "truncated"),
        (b"garbage }", "corrupt"),
        (b"[1, 2]", "not a run record"),
        (orjson.dumps(good_record(schema_version=RECORD_SCHEMA_VERSION + 1)), "newer"),
        (orjson.dumps({k: v for k, v in good_record().items() if k != "series"}), "missing series"),
        (orjson.dumps(good_record(status="weird")), "unknown status"),
        (orjson.dumps(good_record(events={})), "events"),
        (orjson.dumps(good_record())[:-20], "truncated"),
    ],
)
def test_bad_run_files_give_one_line(tmp_path, content, words):
    p = tmp_path / "bad.json"
    p.write_bytes(content)
    with pytest.raises(RunFileError) as err:
        load_record(p)
    msg = str(err.value)
    assert "\n" not in msg and words in msg and str(p) in msg


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(RunFileError, match="cannot read"):
        load_record(tmp_path / "nope.json")
    with pytest.raises(RunFileError, match="directory"):
        load_record(tmp_path)


def test_resolve_by_id_prefix(tmp_path):
    (tmp_path / "20260101-000000-dense-aaaa.json").write_bytes(orjson.dumps(good_record()))
    (tmp_path / "20260101-000000-dense-aabb.json").write_bytes(orjson.dumps(good_record()))
    assert resolve_run("20260101-000000-dense-aaaa", tmp_path).name.endswith("aaaa.json")
    with pytest.raises(RunFileError, match="ambiguous"):
        resolve_run("20260101-000000-dense-aa", tmp_path)
    with pytest.raises(RunFileError, match="no such run"):
        resolve_run("zzz", tmp_path)


def test_unwritable_runs_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunsDirError, match="not writable"):
        ensure_writable(blocker / "runs")


def test_journal_without_end_is_recovered_as_interrupted():
    objs = [journal_header("r1", 100.0, {"workload": "dense"}, {"host": "h"})]
    for i in range(5):
        objs.append({"v": 1, "type": "step", "t": 101.0 + i, "rank": 0, "step": i, "step_ms": 10.0, "tokens": 64,
                     "warmup": i == 0})
    rec = record_from_journal(objs)
    validate_record(rec)
    assert rec["status"] == "interrupted" and rec["exit_code"] is None
    assert rec["series"]["step"]["0"]["step"] == [0, 1, 2, 3, 4]
    assert rec["summary"]["steps"]["steady"] == 4
    assert rec["ended"] > rec["started"]
