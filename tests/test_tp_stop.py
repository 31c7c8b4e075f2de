"""A --tp run stops after the same step on every rank, by --duration or by a cancel (gloo on CPU, 2 processes).

Collectives time out after 20 s here, so a rank left waiting for its peer's next step fails the run quickly.
"""

import threading

import pytest
from support import btune, record_of

from tuner.launch import build_config, make_runner

pytestmark = pytest.mark.slow

SHAPE = ["--preset", "tiny", "--tp", "2", "--warmup", "1", "--batch-size", "2", "--seq-len", "16", "--device", "cpu"]


@pytest.fixture(autouse=True)
def quick_collectives(monkeypatch):
    monkeypatch.setenv("BTUNE_COLLECTIVE_TIMEOUT_S", "20")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def steps_per_rank(rec: dict) -> dict[str, list[int]]:
    return {rank: cols["step"] for rank, cols in rec["series"]["step"].items()}


def test_duration_stops_every_rank_after_the_same_step(tmp_path):
    rec = record_of(btune("run", "dense", *SHAPE, "--duration", "1", "--no-telemetry", "--out", str(tmp_path)))
    assert rec["status"] == "ok"
    steps = steps_per_rank(rec)
    assert sorted(steps) == ["0", "1"]
    assert steps["0"] == steps["1"] == list(range(len(steps["0"])))
    assert rec["summary"]["workload"]["interrupted"] is False


def test_cancel_stops_every_rank_after_the_same_step(tmp_path):
    """The console's cancel (SIGINT to the whole group, torchrun forwarding it again): rank 0 decides, both
    ranks finish the step they are in, report it, and leave together; the summary (sent after the last
    barrier, so by both ranks' leave) says interrupted."""
    runner = make_runner(build_config("dense", [*SHAPE, "--duration", "600"]), tmp_path, telemetry=False)
    seen: dict[int, int] = {}
    running = threading.Event()

    def on_event(e: dict) -> None:
        if e.get("type") == "step":
            seen[e.get("rank", 0)] = e["step"]
            if len(seen) == 2 and min(seen.values()) >= 3:
                running.set()

    runner.subscribe(on_event)
    runner.start()
    assert running.wait(180), "both ranks ran steps"
    runner.cancel()
    rec = runner.wait().record
    assert rec["status"] == "cancelled", rec.get("error")
    steps = steps_per_rank(rec)
    assert steps["0"] == steps["1"] and len(steps["0"]) >= 4
    assert rec["summary"]["workload"]["interrupted"] is True, "both ranks reached the end of the run"
