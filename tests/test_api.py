"""The reporting API (``import btune``): a no-op outside btune, events the console accepts under it (a fake
channel: a unix socket this test listens on), wrong types left out with one warning, phases, ranks; and one
real script run through the console's Runner (slow)."""

from __future__ import annotations

import ast
import json
import os
import socket
import sys
import tempfile
import threading
import time

import pytest
from support import ROOT, program_runner

import btune
from btune import api
from tuner.protocol import check_event, valid_envelope


class Channel:
    """A console's events socket: accepts every connection and keeps what arrives, one connection at a time."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="btune-api-")  # short: a unix socket's path is limited to 107 bytes
        self.path = os.path.join(self.dir, "events.sock")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(8)
        self.server.settimeout(0.05)
        self.data = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            conn.settimeout(None)
            with conn:
                while chunk := conn.recv(65536):
                    self.data += chunk

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.server.close()
        for name in ("events.sock",):
            try:
                os.unlink(os.path.join(self.dir, name))
            except OSError:
                pass
        os.rmdir(self.dir)


def settle(ch: Channel, n: int) -> list[dict]:
    """The events, once ``n`` have arrived (the reader thread drains the closed connection)."""
    api._reset()
    deadline = time.monotonic() + 10
    while ch.data.count(b"\n") < n and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    return [json.loads(line) for line in ch.data.splitlines()]


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("BTUNE_EVENTS", "BTUNE_LOG", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    api._reset()
    yield monkeypatch
    for name in ("BTUNE_EVENTS", "BTUNE_LOG"):
        monkeypatch.delenv(name, raising=False)
    api._reset()


@pytest.fixture
def channel(clean_env):
    ch = Channel()
    clean_env.setenv("BTUNE_EVENTS", ch.path)
    api._reset()
    yield ch
    clean_env.delenv("BTUNE_EVENTS")
    api._reset()  # the API's end closes before the console's
    ch.close()


def accepted(events: list[dict]) -> list[dict]:
    """Each event as the console would keep it: a valid envelope and no field dropped."""
    for ev in events:
        assert valid_envelope(ev), ev
        kept, dropped = check_event(ev)
        assert kept == ev and dropped == 0, ev
    return events


def of(events: list[dict], type_: str) -> list[dict]:
    return [e for e in events if e["type"] == type_]


# -- outside btune ---------------------------------------------------------------------------------
def test_outside_btune_every_call_is_a_no_op(clean_env, capsys):
    assert not btune.enabled()
    btune.meta(model="m", n_params=10, flops_per_token=60)
    for _ in range(3):
        assert btune.step(tokens=100, loss=1.0, lr=0.1) is None
    with btune.phase("eval"):
        pass
    btune.step(tokens="not a number")  # not even checked: nothing is reported
    assert capsys.readouterr() == ("", "")
    assert api._emitter is None


def test_btune_log_gives_one_plain_line_per_call(clean_env, capsys):
    clean_env.setenv("BTUNE_LOG", "1")
    api._reset()
    btune.meta(model="m")
    btune.step(tokens=100, loss=2.5)
    with btune.phase("eval"):
        pass
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == "btune: meta model=m"
    assert lines[1].startswith("btune: step 0 ") and "tokens=100" in lines[1] and "loss=2.5" in lines[1]
    assert lines[2:] == ["btune: phase eval", "btune: phase measuring"]
    assert api._emitter is None


def test_import_btune_needs_the_standard_library_only():
    """Every module-level import of the package is the standard library's (the Emitter is imported in a
    function, under btune only); the import-linter contracts forbid torch and textual anywhere in it."""
    for path in (ROOT / "btune").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in ("__future__", "btune"), (path.name, name)


# -- under btune: the events ---------------------------------------------------------------------------
def test_steps_meta_and_phases_reach_the_channel_as_valid_events(channel):
    btune.meta(model="tiny", n_params=1234, flops_per_token=6 * 1234, weight_bytes=2468, kv_bytes_per_token=64,
               device_name="NVIDIA H200", precision="bf16")
    assert btune.enabled()
    for i in range(3):
        time.sleep(0.01)
        btune.step(tokens=512, loss=1.0 / (i + 1), lr=1e-3, grad_norm=0.5, note="ok")
    with btune.phase("eval", detail="val set"):
        time.sleep(0.2)
    btune.step(tokens=512, loss=0.2, warmup=True)
    events = accepted(settle(channel, 8))
    # the first step ends "starting": the script is measuring from then on
    assert [e["type"] for e in events] == ["meta", "step", "phase", "step", "step", "phase", "phase", "step"]

    meta = events[0]
    assert {k: meta[k] for k in ("model", "n_params", "flops_per_token", "weight_bytes", "kv_bytes_per_token",
                                 "device_name", "precision")} == {
        "model": "tiny", "n_params": 1234, "flops_per_token": 7404, "weight_bytes": 2468, "kv_bytes_per_token": 64,
        "device_name": "NVIDIA H200", "precision": "bf16"}
    assert "n_devices" not in meta  # one process: the console's default (1)

    steps = of(events, "step")
    assert [s["step"] for s in steps] == [0, 1, 2, 3]
    assert [s.get("first", False) for s in steps] == [True, False, False, False]
    assert [s.get("warmup", False) for s in steps] == [False, False, False, True]
    assert {s["clock"] for s in steps} == {"host"} and {s["rank"] for s in steps} == {0}
    assert [s["tokens"] for s in steps] == [512] * 4
    assert [s["loss"] for s in steps] == [1.0, 0.5, 1.0 / 3, 0.2]
    assert steps[1]["lr"] == 1e-3 and steps[1]["grad_norm"] == 0.5 and steps[1]["note"] == "ok"
    assert all(s["step_ms"] >= 10 for s in steps[1:3])  # at least the sleep between two calls
    assert steps[3]["step_ms"] < 200, "the eval phase is not charged to the step after it"
    assert all(s["t"] > 1e9 for s in events)

    phases = of(events, "phase")
    assert [(p["phase"], p.get("detail")) for p in phases] == [("measuring", None), ("eval", "val set"),
                                                                ("measuring", None)]
    assert phases[0]["t"] >= steps[0]["t"]  # the first step (start-up) stays in "starting"


def test_phase_as_a_call_and_nested_context_managers(channel):
    btune.phase("loading")
    with btune.phase("eval"), btune.phase("checkpoint", k=1, n=3):
        pass
    btune.step(tokens=1)
    events = accepted(settle(channel, 6))
    assert [(e["phase"], e.get("k"), e.get("n")) for e in of(events, "phase")] == [
        ("loading", None, None), ("eval", None, None), ("checkpoint", 1, 3), ("eval", None, None),
        ("loading", None, None)]


def test_a_phase_left_before_the_first_step_returns_to_measuring_once_steps_came(channel):
    with btune.phase("eval"):  # a sanity-check eval before training
        pass
    btune.step(tokens=1)
    with btune.phase("eval"):
        pass
    events = accepted(settle(channel, 6))
    assert [e["phase"] for e in of(events, "phase")] == ["eval", "starting", "measuring", "eval", "measuring"]


def test_numbers_of_other_kinds_are_converted(channel):
    class Scalar:  # a 0-d array or tensor: float() gives its value
        def __float__(self) -> float:
            return 2.5

    class Count:  # an integer scalar (numpy.int64): operator.index gives it
        def __index__(self) -> int:
            return 64

    btune.step(tokens=Count(), loss=Scalar(), lr=Scalar())
    btune.step(tokens=100.0, loss=3)
    steps = of(accepted(settle(channel, 2)), "step")
    assert (steps[0]["tokens"], steps[0]["loss"], steps[0]["lr"]) == (64, 2.5, 2.5)
    assert (steps[1]["tokens"], steps[1]["loss"]) == (100.0, 3)


# -- wrong types -----------------------------------------------------------------------------------
def test_wrong_types_are_left_out_with_one_warning_per_kind(channel, capsys):
    for _ in range(3):
        btune.step(tokens="many", loss=[1.0], lr=object(), step=7, warmup="yes", fine=1.5)
        btune.step(tokens=-5, loss=None)
    btune.meta(model=3, flops_per_token="lots", n_devices=0, tokens="some", weird=object(), n_params=10)
    ctx = btune.phase(42)
    with ctx:
        pass
    btune.phase("eval", detail=3, k="1")
    events = accepted(settle(channel, 9))
    steps = of(events, "step")
    assert [s["step"] for s in steps] == list(range(6))
    assert all(s["tokens"] is None and "loss" not in s and "lr" not in s and "warmup" not in s for s in steps)
    assert [s.get("fine") for s in steps] == [1.5, None] * 3
    meta = of(events, "meta")[0]
    assert meta["n_params"] == 10
    assert not {"model", "flops_per_token", "n_devices", "tokens", "tokens_mode", "weird"} & set(meta)
    assert [(p["phase"], "detail" in p, "k" in p) for p in of(events, "phase")] == [("measuring", False, False),
                                                                                  ("eval", False, False)]

    err = capsys.readouterr().err.splitlines()
    assert all(line.startswith("btune: ") and line.endswith("(this warning is shown once)") for line in err)
    kinds = ["step(tokens=", "step(loss=", "step(lr=", "step(step=", "step(warmup=", "meta(model=",
             "meta(flops_per_token=", "meta(n_devices=", "meta(tokens=", "meta(weird=", "phase() takes",
             "phase(detail=", "phase(k="]
    assert len(err) == len(kinds), err  # tokens=-5 is the same kind as tokens="many": no second line
    for kind in kinds:
        assert sum(kind in line for line in err) == 1, (kind, err)


# -- ranks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("rank", "world", "mode", "sent"), [
    ("0", "4", None, 512), ("1", "4", None, None), ("3", "4", None, None),
    ("0", "4", "per_replica", 2048), ("2", "4", "per_replica", None), ("0", "4", "global", 512),
])
def test_under_torchrun_tokens_are_counted_once(channel, rank, world, mode, sent):
    channel_env = pytest.MonkeyPatch()
    try:
        channel_env.setenv("RANK", rank)
        channel_env.setenv("WORLD_SIZE", world)
        api._reset()
        if mode:
            btune.meta(tokens=mode)
        else:
            btune.meta(model="m")
        btune.step(tokens=512, loss=1.0)
        events = accepted(settle(channel, 2))
    finally:
        channel_env.undo()
    meta, step = of(events, "meta")[0], of(events, "step")[0]
    assert meta["rank"] == step["rank"] == int(rank)
    assert meta["n_devices"] == int(world)
    assert meta.get("tokens_mode") == mode
    assert step["tokens"] == sent
    assert step["loss"] == 1.0  # every rank's loss goes out; the console shows rank 0's


# -- a real script through the console's Runner -------------------------------------------------------
SCRIPT = """
import time
import btune

btune.meta(model="tiny", n_params=1000, flops_per_token=6000.0, device_name="cpu")
for i in range(8):
    time.sleep(0.01)
    btune.step(tokens=512, loss=1.0 / (i + 1), lr=0.1)
    if i == 3:
        with btune.phase("eval"):
            time.sleep(0.3)
print("done", flush=True)
"""


@pytest.mark.slow
def test_a_script_using_the_api_under_the_runner(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for name in ("RANK", "WORLD_SIZE", "BTUNE_LOG"):
        env.pop(name, None)
    res = program_runner(tmp_path / "runs", [sys.executable, str(script)], env=env, telemetry=False).run()
    assert res.status == "ok", res.record.get("error")
    rec = res.record
    steps = rec["series"]["step"]["0"]
    assert steps["step"] == list(range(8))
    assert steps["tokens"] == [512] * 8
    assert steps["loss"] == [1.0 / (i + 1) for i in range(8)]
    assert steps["lr"] == [0.1] * 8
    assert steps["step_ms"][4] < 300, "the eval phase is not charged to the step after it"
    summary = rec["summary"]
    assert summary["steps"] == {"total": 8, "warmup": 1, "steady": 7}
    assert summary["tokens_total"] == 512 * 8
    assert summary["loss_first"] == 1.0 and summary["loss_last"] == 1.0 / 8
    steady_s = sum(steps["step_ms"][1:]) / 1000.0
    assert summary["throughput_tokens_per_s"] == pytest.approx(512 * 7 / steady_s, rel=1e-9)
    assert summary["tflops"] == pytest.approx(6000.0 * 512 * 7 / steady_s / 1e12, rel=1e-9)
    phases = [e["phase"] for e in rec["events"] if e["type"] == "phase"]
    assert phases == ["measuring", "eval", "measuring"]
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    assert meta["model"] == "tiny" and meta["n_params"] == 1000
    assert summary["channel"]["bad_lines"] == 0
