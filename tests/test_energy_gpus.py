"""Energy and J/token count the run's GPUs only (issue 15, item 3).

The fake NVML has 8 GPUs whose energy counters grow at different rates (GPU h adds (h + 1) * 30 J a read),
so charging the wrong GPUs, or all of them, shows in the numbers. Every expected figure is computed here
from the record's raw energy series, independently of tuner.summary.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from support import ROOT

from tests.fake_nvml import FakeNvml
from tuner.protocol import make_event
from tuner.record import RecordBuilder, normalize
from tuner.runner import Runner
from tuner.summary import summarize
from tuner.telemetry import NvmlSampler
from workloads import harness

Sampled = tuple[FakeNvml, list[dict[str, Any]]]
MIG_REASON = "MIG: the board's energy counter covers every slice"
TOKENS_PER_STEP = 1000


def fake8() -> FakeNvml:
    fake = FakeNvml(ngpus=8)
    fake.energy_step = [30_000 * (h + 1) for h in range(8)]
    fake.uuids = [f"GPU-{h:08x}-4e93-df4c-5c50-04ae00c11a7{h}" for h in range(8)]
    return fake


def torch_uuid(fake: FakeNvml, gpu: int) -> str:
    """The UUID as torch's ``get_device_properties(i).uuid`` prints it: no ``GPU-`` prefix."""
    return fake.uuids[gpu].removeprefix("GPU-")


def sample(fake: FakeNvml, seconds: float = 1.25) -> list[dict[str, Any]]:
    """Run the real NVML sampler over the fake for ``seconds``; its events (about 3 energy readings a GPU)."""
    events: list[dict[str, Any]] = []
    sampler = NvmlSampler(events.append, hz=50, nvml=fake)
    sampler.start()
    time.sleep(seconds)
    sampler.stop()
    return events


@pytest.fixture(scope="module")
def sampled8_once() -> list[dict[str, Any]]:
    return sample(fake8())


@pytest.fixture
def sampled8(sampled8_once: list[dict[str, Any]]) -> Sampled:
    """``fake8()`` and the events of sampling it: sampled once for the module (the sampler runs in real time),
    a copy for each test."""
    return fake8(), copy.deepcopy(sampled8_once)


def steps_around(events: list[dict[str, Any]], n: int = 50) -> list[dict[str, Any]]:
    """Steady steps of equal length and tokens that cover every energy reading (one warm-up before)."""
    ts = [e["t"] for e in events if e["type"] == "energy"]
    t0, t1 = min(ts) - 0.05, max(ts) + 0.05
    dt = (t1 - t0) / n
    out = [make_event("step", rank=0, t=t0, step=0, step_ms=10.0, tokens=TOKENS_PER_STEP, warmup=True)]
    out += [make_event("step", rank=0, t=t0 + (i + 1) * dt, step=i + 1, step_ms=dt * 1000, tokens=TOKENS_PER_STEP,
                       warmup=False) for i in range(n)]
    return out


def meta(rank: int = 0, uuid: str | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {"workload": "test", "device": "cuda:0" if uuid else "cpu", "n_devices": 1}
    if uuid is not None:
        fields["device_uuid"] = uuid
    return make_event("meta", rank=rank, **fields)


def record(events: list[dict[str, Any]], environment: dict[str, Any] | None = None) -> dict[str, Any]:
    builder = RecordBuilder("t", min(e["t"] for e in events) - 1, {"workload": "test"}, environment or {})
    for ev in sorted(events, key=lambda e: e["t"]):
        builder.add(ev)
    return builder.finish("ok", 0)


def delta_j(rec: dict[str, Any], gpu: int) -> float:
    mj = rec["series"]["energy"][str(gpu)]["mj"]
    return (mj[-1] - mj[0]) / 1000.0


def j_per_token(rec: dict[str, Any], gpus: list[int]) -> float:
    """The GPUs' counter deltas (every reading lies inside the steady steps) over the tokens of the span all
    of them cover (steps all alike, so tokens = rate * span)."""
    series = rec["series"]["energy"]
    first = max(series[str(g)]["t"][0] for g in gpus)
    last = min(series[str(g)]["t"][-1] for g in gpus)
    joules = sum(delta_j(rec, g) for g in gpus)
    steps = rec["series"]["step"]["0"]
    rate = TOKENS_PER_STEP / (steps["step_ms"][-1] / 1000.0)  # tokens a second
    return joules / (rate * (last - first))


def test_meta_uuid_counts_that_gpu_only(sampled8: Sampled) -> None:
    fake, events = sampled8
    events += [*steps_around(events), meta(uuid=torch_uuid(fake, 3))]  # torch's form: no GPU- prefix
    rec = record(events)
    s = rec["summary"]
    assert sorted(rec["series"]["energy"]) == [str(g) for g in range(8)]  # the raw data keeps every GPU
    assert sorted(rec["series"]["gpu"]) == [str(g) for g in range(8)]
    assert s["energy_gpus"] == [3]
    assert s["energy_j"] == pytest.approx(delta_j(rec, 3))
    assert s["energy_j_per_gpu"] == {"3": pytest.approx(delta_j(rec, 3))}
    assert s["joules_per_token"] == pytest.approx(j_per_token(rec, [3]), rel=1e-6)
    assert "energy_note" not in s
    assert sorted(s["gpu"]) == [str(g) for g in range(8)]  # per-GPU telemetry stays for every GPU


def test_two_ranks_count_both_gpus(sampled8: Sampled) -> None:
    fake, events = sampled8
    events += [*steps_around(events), meta(0, fake.uuids[5]), meta(1, fake.uuids[2].lower())]
    rec = record(events)
    s = rec["summary"]
    assert s["energy_gpus"] == [2, 5]
    assert s["energy_j"] == pytest.approx(delta_j(rec, 2) + delta_j(rec, 5))
    assert set(s["energy_j_per_gpu"]) == {"2", "5"}
    assert s["joules_per_token"] == pytest.approx(j_per_token(rec, [2, 5]), rel=1e-6)


def test_a_loaded_record_keeps_the_uuid_and_the_figures(sampled8: Sampled) -> None:
    fake, events = sampled8
    events += [*steps_around(events), meta(uuid=fake.uuids[6])]
    rec = record(events)
    again = normalize(rec)
    assert next(e for e in again["events"] if e["type"] == "meta")["device_uuid"] == fake.uuids[6]
    assert again["summary"]["energy_gpus"] == [6]
    assert again["summary"]["energy_j"] == pytest.approx(delta_j(rec, 6))


@pytest.mark.parametrize(
    ("visible", "gpus"),
    [("1,6", [1, 6]), ("GPU-00000004", [4]), ("7, GPU-00000000-4e93", [0, 7]), ("2,bogus,5", [2])],
)
def test_no_uuid_honours_cuda_visible_devices(visible: str, gpus: list[int], sampled8: Sampled) -> None:
    _, events = sampled8
    events += [*steps_around(events), meta()]
    rec = record(events)
    environment = {"env": {"CUDA_VISIBLE_DEVICES": visible}}
    s = summarize(rec["series"], rec["events"], rec["started_ts"], rec["ended_ts"], environment=environment)
    assert s["energy_gpus"] == gpus
    assert s["energy_j"] == pytest.approx(sum(delta_j(rec, g) for g in gpus))
    assert s["joules_per_token"] == pytest.approx(j_per_token(rec, gpus), rel=1e-6)
    assert "CUDA_VISIBLE_DEVICES" in s["energy_note"]


def test_cuda_visible_devices_that_hides_every_gpu(sampled8: Sampled) -> None:
    _, events = sampled8
    events += [*steps_around(events), meta()]
    rec = record(events)
    s = summarize(rec["series"], rec["events"], rec["started_ts"], rec["ended_ts"],
                  environment={"env": {"CUDA_VISIBLE_DEVICES": "-1"}})
    assert s["energy_j"] is None and s["joules_per_token"] is None and s["energy_gpus"] == []
    assert "hides every GPU" in s["energy_note"]


def test_no_uuid_and_no_cuda_visible_devices_counts_every_gpu_with_a_note(sampled8: Sampled) -> None:
    _, events = sampled8
    events += [*steps_around(events), meta()]
    rec = record(events)
    s = rec["summary"]
    assert s["energy_gpus"] == list(range(8))
    assert s["energy_j"] == pytest.approx(sum(delta_j(rec, g) for g in range(8)))
    assert s["joules_per_token"] == pytest.approx(j_per_token(rec, list(range(8))), rel=1e-6)
    assert "every GPU" in s["energy_note"]


def test_mig_mode_on_the_runs_gpu_gives_no_energy() -> None:
    fake = fake8()
    fake.mig = {3}
    events = sample(fake)
    energy3 = [e for e in events if e["type"] == "energy" and e["gpu"] == 3]
    assert energy3[0]["mig"] is True and energy3[0]["uuid"] == fake.uuids[3]
    assert any(e["type"] == "telemetry_note" and "MIG" in e["message"] for e in events)
    steps = steps_around(events)
    # the workload ran on the MIG board (its slice's UUID is not the board's), or it names the board
    for named in (meta(uuid="MIG-6c2a9b1e-0c2f-5a0b-9d55-1b2a3c4d5e6f"), meta(uuid=fake.uuids[3]), meta()):
        s = record(events + steps + [named])["summary"]
        assert s["energy_j"] is None and s["joules_per_token"] is None
        assert s["energy_note"] == MIG_REASON
    # another, whole GPU of the same host is counted as usual
    rec = record(events + steps + [meta(uuid=fake.uuids[0])])
    assert rec["summary"]["energy_gpus"] == [0]
    assert rec["summary"]["energy_j"] == pytest.approx(delta_j(rec, 0))


def test_an_unknown_uuid_is_not_charged_another_gpu(sampled8: Sampled) -> None:
    _, events = sampled8
    s = record(events + steps_around(events) + [meta(uuid="GPU-ffffffff-0000-0000-0000-000000000000")])["summary"]
    assert s["energy_j"] is None and s["joules_per_token"] is None and s["energy_gpus"] == []
    assert "GPU-ffffffff-0000-0000-0000-000000000000" in s["energy_note"]


EMITTER = r"""
import sys, time
from tuner.protocol import Emitter
em = Emitter()
em.meta(workload="synthetic", device="cuda:0", device_name="fake", n_devices=1, device_uuid=sys.argv[1])
for i in range(28):
    time.sleep(0.1)
    em.step(i, 100.0, 1000, warmup=i < 2)
em.summary(steps_run=28)
"""


@pytest.mark.slow
def test_a_real_run_through_the_runner(tmp_path: Path) -> None:
    fake = fake8()
    uuid = torch_uuid(fake, 4)
    runner = Runner([sys.executable, "-c", EMITTER, uuid], run_id="energy-gpus", out_dir=tmp_path,
                    config={"workload": "synthetic"}, nvml=fake, cwd=str(ROOT))
    rec = runner.run().record
    s = rec["summary"]
    assert sorted(rec["series"]["energy"]) == [str(g) for g in range(8)]
    assert s["energy_gpus"] == [4]
    assert s["energy_j"] == pytest.approx(delta_j(rec, 4))
    assert set(s["energy_j_per_gpu"]) == {"4"}
    # J/token from GPU 4's readings inside the steady steps, over the tokens of those steps in that span
    steps = rec["series"]["step"]["0"]
    windows = [(t - ms / 1000, t) for t, ms, w in zip(steps["t"], steps["step_ms"], steps["warmup"], strict=True)
               if not w]
    w0, w1 = windows[0][0], windows[-1][1]
    pts = [(t, v) for t, v in zip(rec["series"]["energy"]["4"]["t"], rec["series"]["energy"]["4"]["mj"],
                                  strict=True) if w0 - 1e-3 <= t <= w1 + 1e-3]
    assert len(pts) >= 2, "the run is long enough for two readings inside the steady window"
    a, b = pts[0][0], pts[-1][0]
    tokens = sum(1000 * max(0.0, min(e, b) - max(s0, a)) / (e - s0) for s0, e in windows)
    assert s["joules_per_token"] == pytest.approx((pts[-1][1] - pts[0][1]) / 1000 / tokens, rel=1e-6)


def test_workload_device_uuid() -> None:
    assert harness.device_uuid(torch.device("cpu")) is None


def test_workload_device_uuid_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    class Uuid:  # torch._C._CUuuid prints 8-4-4-4-12 hex without a prefix
        def __str__(self) -> str:
            return "9a48c30d-4e93-df4c-5c50-04ae00c11a75"

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d: SimpleNamespace(uuid=Uuid()))
    assert harness.device_uuid(torch.device("cuda", 0)) == "GPU-9a48c30d-4e93-df4c-5c50-04ae00c11a75"

    def broken(_d: Any) -> Any:
        raise RuntimeError("no CUDA")

    monkeypatch.setattr(torch.cuda, "get_device_properties", broken)
    assert harness.device_uuid(torch.device("cuda", 0)) is None
