"""``btune run -- CMD ARG...``: any command as a workload (issue 18, item 1), and what the record keeps of it."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from support import ROOT, btune, program, record_of, start_btune

from tuner.command import Command, CommandError, parse_env, redact_argv, resolve, torchrun_devices
from tuner.runs import list_runs, load_record, orphan_journals

PYPATH = f"PYTHONPATH={os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))}"


# -- quick: what the record keeps, what is refused ----------------------------------------------------------------
def test_secrets_never_reach_the_record():
    argv = ["python", "serve.py", "--api-key", "sk-123", "--token=abc", "HF_TOKEN=hf_x", "MODE=fast",
            "--url", "https://bob:hunter2@example.com/v1", "--lr", "3e-4"]
    assert redact_argv(argv) == ["python", "serve.py", "--api-key", "<redacted>", "--token=<redacted>",
                                 "HF_TOKEN=<redacted>", "MODE=fast", "--url", "https://bob:<redacted>@example.com/v1",
                                 "--lr", "3e-4"]
    cmd = Command(("python", "x.py"), env={"OPENAI_API_KEY": "sk-1", "CUDA_VISIBLE_DEVICES": "1"})
    text = json.dumps(cmd.as_options())
    assert "sk-1" not in text and '"CUDA_VISIBLE_DEVICES": "1"' in text


def test_environment_additions_and_argv_checks(tmp_path):
    assert parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    for bad in ("A", "=1", "1A=2", "A B=1"):
        with pytest.raises(CommandError, match="NAME=VALUE"):
            parse_env([bad])
    with pytest.raises(CommandError, match="no command"):
        resolve(Command(()))
    with pytest.raises(CommandError, match="command not found"):
        resolve(Command(("no-such-program-btune",)))
    with pytest.raises(CommandError, match="no such file"):
        resolve(Command(("./missing.sh",), cwd=str(tmp_path)))
    script = tmp_path / "plain.txt"
    script.write_text("not executable")
    with pytest.raises(CommandError, match="not an executable"):
        resolve(Command((str(script),)))
    with pytest.raises(CommandError, match="not a directory"):
        resolve(Command(("python",), cwd=str(tmp_path / "nowhere")))
    assert resolve(Command((sys.executable, "-c", "pass"))).argv[0] == sys.executable


def test_torchrun_devices():
    assert torchrun_devices(["torchrun", "--nproc-per-node", "4", "train.py"]) == 4
    assert torchrun_devices(["/v/bin/torchrun", "--nproc_per_node=8", "train.py"]) == 8
    assert torchrun_devices(["python", "-m", "torch.distributed.run", "--nproc-per-node=2", "x.py"]) == 2
    assert torchrun_devices(["torchrun", "--nproc-per-node", "gpu", "x.py"]) == 1
    assert torchrun_devices(["python", "train.py", "--nproc-per-node", "4"]) == 1


# -- slow: real commands under the runner --------------------------------------------------------------------------
@pytest.mark.slow
def test_a_plain_command_is_recorded_like_a_workload(tmp_path):
    code = "import time\nfor i in range(3):\n    print('line', i, flush=True)\n    time.sleep(0.2)\n"
    res = btune("run", "--out", str(tmp_path), "--env", "CUDA_VISIBLE_DEVICES=", "--env", "MY_SECRET=s3cr3t",
                "--", sys.executable, "-c", code)
    rec = record_of(res)
    assert rec["status"] == "ok" and rec["exit_code"] == 0
    assert rec["config"]["workload"] == "command"
    assert rec["config"]["argv"] == [sys.executable, "-c", code]
    assert rec["config"]["options"]["env"] == {"CUDA_VISIBLE_DEVICES": "", "MY_SECRET": "<redacted>"}
    assert "s3cr3t" not in Path(res.stdout.strip().splitlines()[-1]).read_text()
    assert rec["environment"]["env"]["CUDA_VISIBLE_DEVICES"] == ""  # the command's environment, not btune's
    assert rec["output"]["stdout_tail"] == "line 0\nline 1\nline 2\n"
    assert rec["output"]["lines"] == {"stdout": 3, "stderr": 0}
    logs = [e["message"] for e in rec["events"] if e["type"] == "log"]
    assert logs == ["line 0", "line 1", "line 2"]
    assert rec["summary"]["duration_s"] >= 0.6
    assert rec["summary"]["host"]["proc_rss_mb_max"] > 0
    assert "command   " in res.stdout and "line 2" in res.stdout


@pytest.mark.slow
def test_a_crashing_command_fails_with_its_error_line(tmp_path):
    res = btune("run", "--out", str(tmp_path), "--", sys.executable, "-c",
                "print('working'); raise RuntimeError('bad shape 3x4')")
    rec = record_of(res, code=1)
    assert rec["status"] == "failed" and rec["exit_code"] == 1
    assert rec["error"]["message"] == "exit status 1: RuntimeError: bad shape 3x4"
    assert "Traceback" in rec["output"]["stderr_tail"]


@pytest.mark.slow
def test_out_of_memory_is_read_from_stderr(tmp_path):
    code = "import sys; print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB', file=sys.stderr)" \
           "; sys.exit(1)"
    rec = record_of(btune("run", "--out", str(tmp_path), "--", sys.executable, "-c", code), code=1)
    assert rec["status"] == "oom"


@pytest.mark.slow
def test_timeout_and_a_command_killed_mid_run(tmp_path):
    rec = record_of(btune("run", "--out", str(tmp_path), "--timeout", "1", "--", sys.executable, "-c",
                          "import time; print('start', flush=True); time.sleep(60)"), code=1)
    assert rec["status"] == "timeout" and rec["output"]["stdout_tail"] == "start\n"
    code = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    proc = start_btune("run", "--out", str(tmp_path / "k"), "--", sys.executable, "-c", code)
    deadline = time.time() + 30
    while not list((tmp_path / "k").glob("*.journal.jsonl")) and time.time() < deadline:
        time.sleep(0.1)
    journal = next((tmp_path / "k").glob("*.journal.jsonl"))
    pid = None
    while pid is None and time.time() < deadline:
        for line in journal.read_text().splitlines():
            if '"type":"log"' in line:
                pid = int(json.loads(line)["message"])
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    rec = load_record(Path(out.strip().splitlines()[-1]))
    assert rec["status"] == "killed" and rec["error"]["message"] == "killed by SIGKILL"


@pytest.mark.slow
def test_the_console_killed_leaves_a_journal_that_recovers(tmp_path):
    proc = start_btune("run", "--out", str(tmp_path), "--", sys.executable, "-c",
                       "import time\nfor i in range(100):\n    print('tick', i, flush=True)\n    time.sleep(0.1)")
    deadline = time.time() + 30
    while time.time() < deadline:
        journals = list(tmp_path.glob("*.journal.jsonl"))
        if journals and journals[0].read_text().count('"type":"log"') >= 3:
            break
        time.sleep(0.1)
    proc.kill()  # the console dies (SIGKILL: no handler runs); the command goes on until its output breaks
    proc.wait(timeout=30)
    time.sleep(0.5)
    res = btune("runs", "recover", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    rec = load_record(list_runs(tmp_path)[0])
    assert rec["status"] == "interrupted" and rec["config"]["workload"] == "command"
    ticks = [e["message"] for e in rec["events"] if e["type"] == "log"]
    assert ticks[:3] == ["tick 0", "tick 1", "tick 2"]
    assert not orphan_journals(tmp_path)


@pytest.mark.slow
def test_megabytes_of_output_are_counted_not_journalled(tmp_path):
    code = "import sys\nfor i in range(200000):\n    sys.stdout.write(f'{i:09d} ' + 'x' * 40 + '\\n')\n"
    rec = record_of(btune("run", "--out", str(tmp_path), "--", sys.executable, "-c", code))
    assert rec["output"]["lines"]["stdout"] == 200000
    kept = [e for e in rec["events"] if e["type"] == "log"]
    assert rec["output"]["lines_not_kept"]["stdout"] + len(kept) + rec["summary"].get("logs_dropped", 0) == 200000
    assert rec["output"]["lines_not_kept"]["stdout"] > 150000
    assert rec["output"]["stdout_tail"].splitlines()[-1].startswith("000199999 ")
    assert any("lines a second" in n for n in rec["summary"]["notes"])


@pytest.mark.slow
def test_bad_commands_get_one_line_and_no_run(tmp_path):
    cases = [
        (["run", "--out", str(tmp_path), "--"], "no command after --"),
        (["run", "--out", str(tmp_path), "--", "no-such-program-btune"], "command not found"),
        (["run", "--out", str(tmp_path), "--", str(ROOT / "README.md")], "not an executable file"),
        (["run", "--out", str(tmp_path), "dense", "--", "python"], "not both"),
        (["run", "--out", str(tmp_path), "--env", "NOEQUALS", "--", "python"], "NAME=VALUE"),
        (["run", "--out", str(tmp_path), "--parse", "(unclosed", "--", "python"], "--parse"),
        (["run", "--out", str(tmp_path), "--cwd", str(tmp_path / "x"), "--", "python"], "not a directory"),
        (["run", "--out", str(tmp_path), "--cwd", "/tmp", "dense"], "belong to a command run"),
    ]
    for args, message in cases:
        res = btune(*args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.stderr, (args, res.stderr)
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.slow
def test_torchrun_with_two_ranks_using_the_api(tmp_path):
    seen = tmp_path / "seen.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    def run():
        return btune("run", "--out", str(tmp_path), "--env", PYPATH, "--env", "OMP_NUM_THREADS=1", "--env",
                     "GLOO_SOCKET_IFNAME=lo", "--", *launcher, "--standalone", "--nproc-per-node", "2",
                     *program("api_ranks.py", str(seen))[1:], timeout=240)

    res = run()
    if res.returncode == 1 and "SIGABRT" in res.stdout + res.stderr and seen.exists():
        # gloo itself aborts a rank at teardown now and then, after the script's work and its last barrier (seen
        # in CI under load; upstream: pytorch/pytorch#188266); btune rightly records that run as failed. Once more:
        seen.unlink()
        res = run()
    rec = record_of(res)
    truth = json.loads(seen.read_text())
    assert sorted(rec["series"]["step"]) == ["0", "1"]
    rank0 = rec["series"]["step"]["0"]
    assert rank0["tokens"] == truth["tokens"]  # per replica x 2, counted once (rank 0)
    assert set(rec["series"]["step"]["1"]["tokens"]) == {None}
    assert rank0["loss"] == pytest.approx(truth["loss"], rel=1e-6)
    assert rec["summary"]["tokens_total"] == sum(truth["tokens"])
    phases = [p["phase"] for p in rec["summary"]["phases"]]
    assert "eval" in phases
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    assert meta["n_devices"] == 2 and meta["model"] == "linear-16"
    cmp = btune("compare", str(res.stdout.strip().splitlines()[-1]), str(res.stdout.strip().splitlines()[-1]))
    assert cmp.returncode == 0 and "throughput" in cmp.stdout


@pytest.mark.slow
def test_parse_reads_a_recorded_torchtitan_log_and_compares_with_a_builtin_run(tmp_path):
    import re

    log = ROOT / "tests" / "data" / "logs" / "torchtitan.log"
    res = btune("run", "--out", str(tmp_path), "--parse", "torchtitan", "--",
                *program("replay_log.py", str(log), "0.05", "step:"))
    rec = record_of(res)
    plain = [re.sub(r"\x1b\[[0-9;]*m", "", ln) for ln in log.read_text().splitlines()]
    truth = [(int(m.group(1)), float(m.group(2)), float(m.group(3).replace(",", "")))
             for ln in plain if (m := re.search(r"- step:\s+(\d+)\s+loss:\s+([\d.]+).*tps:\s+([\d,]+)", ln))]
    steps = rec["series"]["step"]["0"]
    assert steps["step"] == [s for s, _, _ in truth]
    assert steps["loss"] == [loss for _, loss, _ in truth]
    assert set(steps["source"]) == {"parse"} and steps["first"][0] is True
    for tokens, ms, (_, _, tps) in zip(steps["tokens"], steps["step_ms"], truth, strict=True):
        assert tokens == pytest.approx(tps * ms / 1000.0)  # tps per device, one device (not a torchrun command)
    assert all(v is not None for v in steps["mfu_reported_pct"])
    assert rec["config"]["options"]["parse"] == "torchtitan"
    dense = record_of(btune("run", "dense", "--preset", "tiny", "--steps", "3", "--warmup", "1", "--device", "cpu",
                            "--out", str(tmp_path)))
    cmp = btune("compare", str(tmp_path / f"{rec['id']}.json"), str(tmp_path / f"{dense['id']}.json"))
    assert cmp.returncode == 0, cmp.stderr
    assert "throughput" in cmp.stdout and rec["id"] in cmp.stdout and dense["id"] in cmp.stdout
