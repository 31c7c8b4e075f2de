"""What ``btune run`` writes (issue 17, item 5), with a stand-in runner (quick tier, no process): ``--json`` is
JSON lines to the last line; piped output says how often it writes and never skips steps silently; the NVML
note is printed once."""

import io
from pathlib import Path

import orjson

from tuner import console
from tuner.console import ConsoleStatus, execute
from tuner.launch import RunConfig
from tuner.record import RecordBuilder
from tuner.runner import RunResult

NOTE = "NVML unavailable: NVML Shared Library Not Found; GPU telemetry off"


class FakeRunner:
    """Sends ``events`` to its subscribers on start, then returns a record built from them."""

    def __init__(self, events: list[dict], out_dir: Path) -> None:
        self.events, self.out_dir, self.subs = events, out_dir, []
        self.run_id = "20261201-000000-dense-abcd"

    def subscribe(self, fn) -> None:
        self.subs.append(fn)

    def start(self) -> None:
        for ev in self.events:
            for fn in self.subs:
                fn(ev)

    def wait(self) -> RunResult:
        b = RecordBuilder(self.run_id, 0.0, {"workload": "dense", "options": {"preset": "tiny"}}, {})
        for ev in self.events:
            b.add({"v": 1, **ev})
        rec = b.finish("ok", 0, 9.0)
        return RunResult(self.run_id, "ok", 0, self.out_dir / f"{self.run_id}.json", rec)

    def cancel(self, reason: str = "") -> None:
        pass


def events(n: int) -> list[dict]:
    out: list[dict] = [{"type": "telemetry_note", "t": 0.5, "rank": -1, "kind": "nvml", "message": NOTE}]
    out += [{"type": "step", "t": 1.0 + i, "rank": 0, "step": i, "step_ms": 10.0, "tokens": 100,
             "warmup": i < 2} for i in range(n)]
    return out


def run_fake(tmp_path, monkeypatch, json_lines: bool, n: int = 5) -> str:
    evs = events(n)
    monkeypatch.setattr(console, "make_runner", lambda *a, **k: FakeRunner(evs, tmp_path))
    out = io.StringIO()
    code = execute(RunConfig("dense", {"preset": "tiny"}, ("python", "-m", "workloads.dense")), tmp_path,
                   json_lines=json_lines, out=out)
    assert code == 0
    return out.getvalue()


def test_json_output_is_json_lines_to_the_last(tmp_path, monkeypatch):
    text = run_fake(tmp_path, monkeypatch, json_lines=True)
    docs = [orjson.loads(line) for line in text.splitlines()]  # every line parses
    assert [d["type"] for d in docs[-6:-1]] == ["step"] * 5
    assert docs[-1] == {"type": "record", "id": "20261201-000000-dense-abcd", "status": "ok",
                        "path": str(tmp_path / "20261201-000000-dense-abcd.json")}


def test_the_nvml_note_is_printed_once(tmp_path, monkeypatch):
    text = run_fake(tmp_path, monkeypatch, json_lines=False)
    assert text.count(NOTE) == 1, text
    assert text.splitlines()[-1].endswith(".json")  # the plain output still ends with the record's path


def test_piped_output_says_it_thins_and_counts_what_each_line_stands_for(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(console.time, "time", lambda: clock[0])
    out = io.StringIO()
    status = ConsoleStatus(out, tty=False)
    for i in range(10):  # 10 steps in 0.9 s, then one more after a second
        status({"type": "step", "step": i, "step_ms": 10.0, "tokens": 100})
        clock[0] += 0.1
    clock[0] += 1.0
    status({"type": "step", "step": 10, "step_ms": 10.0, "tokens": 100})
    status({"type": "step", "step": 11, "step_ms": 10.0, "tokens": 100})
    status.done()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("btune: not a terminal: a status line at most every 1 s")
    assert "the record has every step" in lines[0]
    assert "step 0" in lines[1] and "since the last line" not in lines[1]
    assert "step 10" in lines[2] and "(10 steps since the last line)" in lines[2]  # steps 1..10
    assert "step 11" in lines[3]  # the last step is always written
    assert len(lines) == 4


def test_a_tty_rewrites_one_line_and_writes_no_note(monkeypatch):
    out = io.StringIO()
    status = ConsoleStatus(out, tty=True)
    status({"type": "step", "step": 0, "step_ms": 60208.4, "tokens": 100})
    status.tick()
    assert "not a terminal" not in out.getvalue() and "60.21 s" in out.getvalue()
