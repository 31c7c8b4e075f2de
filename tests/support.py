"""What the test modules share (no tests here): the real commands run as subprocesses, the records they print,
test programs under tests/programs, waiting on a live run, free ports. Fixtures are in conftest.py.

Tests that use the process helpers start processes: mark them ``@pytest.mark.slow`` (see conftest.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest

    from tuner.runner import Runner

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = Path(__file__).parent / "programs"

#: ``btune`` and ``btune-tui`` as their installed scripts run them, on this test run's interpreter.
BTUNE = [sys.executable, "-c", "import sys; from tuner.cli import main; sys.exit(main())"]
TUI = [sys.executable, "-c", "import sys; from tuner.tui.main import main; sys.exit(main())"]
#: Extra variables for runs of several processes on a small machine (--tp, --replicas): one thread each.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def environ(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    """The environment of a command the tests run: this process's as it is now (monkeypatched variables
    included), unbuffered, so the lines of a process killed mid-run arrive, and ``extra`` (a variable set to
    None is removed)."""
    return {k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}.items() if v is not None}


def btune(*args: str, env: dict[str, str | None] | None = None, cwd: Path | None = None, timeout: float = 300,
          **kw: Any) -> subprocess.CompletedProcess:
    """``btune ARGS`` in a subprocess, its output captured as text. ``env``: the variables to change (see
    environ); ``timeout`` only guards against a hang."""
    return subprocess.run([*BTUNE, *args], capture_output=True, text=True, env=environ(env), cwd=cwd,
                          timeout=timeout, **kw)


def tui(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``btune-tui ARGS`` in a subprocess (``--replay`` runs headless)."""
    return subprocess.run([*TUI, *args], capture_output=True, text=True, env=environ(), timeout=timeout)


def start_btune(*args: str, env: dict[str, str | None] | None = None, **kw: Any) -> subprocess.Popen:
    """``btune ARGS`` started and left running; stdout and stderr are text pipes unless ``kw`` says otherwise."""
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **kw}
    return subprocess.Popen([*BTUNE, *args], env=environ(env), **kw)


def record_of(res: subprocess.CompletedProcess, code: int | None = 0) -> dict:
    """The record of a ``btune run``: the path is its last line of output. Asserts the exit code first
    (``code=None``: any)."""
    from tuner.runs import load_record

    if code is not None:
        assert res.returncode == code, res.stdout[-3000:] + res.stderr[-3000:]
    return load_record(Path(res.stdout.strip().splitlines()[-1]))


def program(name: str, *args: str) -> list[str]:
    """argv for a test program under tests/programs."""
    return [sys.executable, str(PROGRAMS / name), *args]


def program_runner(out_dir: Path, argv: list[str], **kw: Any) -> Runner:
    """A console Runner of ``argv`` (a test program, usually) writing its record to ``out_dir``."""
    from tuner.runner import Runner

    return Runner(argv, run_id=f"t-{time.monotonic_ns()}", out_dir=out_dir, config={"workload": "test"}, **kw)


def wait_until(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll ``cond()`` until it returns something true, and return that (AssertionError after ``timeout`` s:
    a guard against a hang, not a bound being tested)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def live_journal(directory: Path, n: int, marker: bytes = b'"type":"step"', timeout: float = 120) -> Path:
    """The journal of the run live in ``directory``, once ``marker`` occurs ``n`` times in it (steps, by default)."""
    from tuner.runs import JOURNAL_SUFFIX

    def found() -> Path | None:
        return next((j for j in directory.glob(f"*{JOURNAL_SUFFIX}") if j.read_bytes().count(marker) >= n), None)

    return wait_until(found, timeout, f"{n} x {marker.decode()} in a journal under {directory}")


def running(procs: list[Any]) -> list[Any]:
    """Those of ``procs`` (psutil Processes) still running; a zombie that nobody has reaped has ended."""
    import psutil

    out = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The one line ``btune ARGV`` refuses with: exit 2, nothing on stdout, no traceback."""
    from tuner import cli

    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and not out, (out, err)
    return lines[0]


def start_program_server(program: str | Path) -> tuple[subprocess.Popen, str]:
    """``python PROGRAM PORT`` (a test file that serves on 127.0.0.1:PORT when run) on a free port; the process
    and its base URL (``http://127.0.0.1:PORT/v1``) once the port accepts connections."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(program), str(port)], env=environ())

    def up() -> bool:
        assert proc.poll() is None, f"{program} ended with {proc.returncode}"
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(up, 30, f"the test server {Path(program).name}")
    return proc, f"http://127.0.0.1:{port}/v1"


def saved_bytes(model: Any, run: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``run()`` executes, ``model``'s parameters
    aside (torch imported here: this module stays torch-free for the tests that run btune as a process)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        s = x.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = max(saved.get(s.data_ptr(), 0), s.nbytes())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        run()
    return sum(saved.values())
