"""Telemetry samplers: the real no-driver NVML path, a fake NVML with MIG-like and lost GPUs, psutil."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import psutil
import pynvml
import pytest

from tests.fake_nvml import GIB, FakeNvml
from tuner.telemetry import HostSampler, NvmlSampler, Telemetry, throttle_names


class Sink:
    """A thread-safe on_event that keeps every event."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, type_: str, **match: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["type"] == type_ and all(e.get(k) == v for k, v in match.items())]


def run_for(sampler: Any, seconds: float) -> float:
    """Run a sampler for ``seconds``; return the time from start() to the end of stop()."""
    t0 = time.monotonic()
    sampler.start()
    time.sleep(seconds)
    sampler.stop()
    return time.monotonic() - t0


def assert_stopped(sink: Sink, threads_before: set[threading.Thread]) -> None:
    """Once stop() has returned, no sampler thread is left running and no event comes any more."""
    assert not set(threading.enumerate()) - threads_before, "stop() left a sampler thread running"
    n = len(sink.events)
    time.sleep(0.1)  # five periods at 50 Hz
    assert len(sink.events) == n, "events after stop()"


def test_real_nvml_without_driver_posts_one_note() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        reason = str(exc).rstrip(".")
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine")
    sink = Sink()
    sampler = NvmlSampler(sink, hz=50)
    threads = set(threading.enumerate())
    sampler.start()
    time.sleep(0.2)
    sampler.stop()
    assert_stopped(sink, threads)
    inventory = sampler.inventory()  # the same problem again: no second note
    notes = sink.of("telemetry_note")
    assert len(notes) == 1 and notes[0]["source"] == "nvml" and notes[0]["rank"] == -1
    assert notes[0]["message"] == f"NVML unavailable: {reason}; GPU telemetry off"
    assert sampler.notes == [notes[0]["message"]]
    assert not sink.of("gpu") and not sink.of("energy")
    assert inventory == {"available": False, "reason": reason, "devices": []}


def test_pynvml_missing_posts_one_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    sink = Sink()
    sampler = NvmlSampler(sink, hz=50, nvml=None)
    assert sampler.inventory()["available"] is False
    threads = set(threading.enumerate())
    sampler.start()
    sampler.stop()
    assert_stopped(sink, threads)
    notes = sink.of("telemetry_note")
    assert len(notes) == 1
    assert notes[0]["message"].startswith("NVML unavailable: pynvml not importable")
    assert "nvidia-ml-py" in notes[0]["message"]
    assert not sink.of("gpu")


@pytest.mark.parametrize(
    ("fake", "message"),
    [
        (FakeNvml(init_error=pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH), "NVML unavailable: RM has detected"),
        (FakeNvml(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED), "NVML unavailable: Driver Not Loaded"),
        (FakeNvml(ngpus=0), "NVML found no GPUs"),
    ],
)
def test_init_failures_and_no_gpus(fake: FakeNvml, message: str) -> None:
    sink = Sink()
    sampler = NvmlSampler(sink, hz=50, nvml=fake)
    run_for(sampler, 0.1)
    notes = sink.of("telemetry_note")
    assert len(notes) == 1 and notes[0]["message"].startswith(message)
    assert not sink.of("gpu") and not sink.of("energy")
    assert fake.inits == fake.shutdowns  # every successful init is shut down


def test_fake_mig_like_gpu_keeps_the_rest_working() -> None:
    fake = FakeNvml(ngpus=2)
    fake.unsupported[1] = {
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetTotalEnergyConsumption",
    }
    fake.procs[0] = [(1234, 1 * GIB), (999, 2 * GIB)]
    fake.graphics[0] = [(1234, 1 * GIB)]  # a C+G process is listed twice: count it once
    sink = Sink()
    sampler = NvmlSampler(sink, hz=50, pids=lambda: {1234}, nvml=fake)

    threads = set(threading.enumerate())
    started = time.monotonic()
    sampler.start()
    time.sleep(0.4)
    fake.mask[0] = 0x44
    time.sleep(0.8)
    sampler.stop()
    duration = time.monotonic() - started
    assert_stopped(sink, threads)

    gpu0, gpu1 = sink.of("gpu", gpu=0), sink.of("gpu", gpu=1)
    assert len(gpu0) >= 30 and abs(len(gpu0) - len(gpu1)) <= 1
    assert all(e["power_w"] == 300.0 and e["util_gpu"] == 90 and e["util_mem"] == 40 for e in gpu0)
    assert all(e["power_w"] is None and e["util_gpu"] is None and e["util_mem"] is None for e in gpu1)
    assert all(e["mem_used_mb"] == 10 * 1024 and e["mem_total_mb"] == 80 * 1024 for e in gpu0 + gpu1)
    assert all(e["sm_clock_mhz"] == 1980 and e["temp_c"] == 60 and e["rank"] == -1 for e in gpu0 + gpu1)
    assert all(e["proc_mem_mb"] == 1024 for e in gpu0) and all(e["proc_mem_mb"] == 0 for e in gpu1)

    # throttle_reasons: on the first sample and when the mask changes, else omitted
    with_reasons = [e for e in gpu0 if "throttle_reasons" in e]
    assert [e["throttle_reasons"] for e in with_reasons] == [[], ["sw_power_cap", "hw_thermal"]]
    assert gpu0[0] is with_reasons[0] and gpu0[-1]["throttle"] == 0x44
    assert len([e for e in gpu1 if "throttle_reasons" in e]) == 1

    # one note per problem, and the failing functions are not called again
    messages = sorted(e["message"] for e in sink.of("telemetry_note"))
    assert messages == sorted(
        f"gpu 1: {field} not supported (MIG?); omitted" for field in ("power", "utilisation", "energy")
    )
    assert messages == sorted(sampler.notes)
    assert fake.calls["nvmlDeviceGetPowerUsage", 1] == 1
    assert fake.calls["nvmlDeviceGetUtilizationRates", 1] == 1
    assert fake.calls["nvmlDeviceGetTotalEnergyConsumption", 1] == 1

    # energy: GPU 0 only; read at start, at most once a second, and at stop
    energy = sink.of("energy")
    assert energy and all(e["gpu"] == 0 for e in energy)
    reads = fake.calls["nvmlDeviceGetTotalEnergyConsumption", 0]
    assert len(energy) == reads and 3 <= reads <= math.floor(duration) + 2
    assert [e["mj"] for e in energy] == sorted(e["mj"] for e in energy)
    assert energy[-1]["t"] >= gpu0[-1]["t"]  # the final reading comes after the last sample
    assert fake.shutdowns == fake.inits == 1


def test_fake_gpu_lost_mid_run() -> None:
    fake = FakeNvml(ngpus=2)
    sink = Sink()
    sampler = NvmlSampler(sink, hz=50, nvml=fake)
    sampler.start()
    time.sleep(0.3)
    fake.lost.add(0)
    lost_at = time.time()
    time.sleep(0.5)
    sampler.stop()

    notes = sink.of("telemetry_note")
    assert [n["message"] for n in notes] == ["gpu 0: lost (GPU is lost); no more samples from it"]
    assert fake.calls_after_lost[0] == 1  # the call that found it lost, nothing after
    assert len([e for e in sink.of("gpu", gpu=1) if e["t"] > lost_at + 0.05]) >= 10
    assert not [e for e in sink.of("gpu", gpu=0) if e["t"] > lost_at + 0.05]
    assert not [e for e in sink.of("energy", gpu=0) if e["t"] > lost_at + 0.05]
    assert sink.of("energy", gpu=1)[-1]["t"] > lost_at  # GPU 1's final reading still taken
    assert fake.shutdowns == 1


def test_fake_inventory() -> None:
    fake = FakeNvml(ngpus=2)
    sampler = NvmlSampler(Sink(), nvml=fake)
    inventory = sampler.inventory()
    assert inventory["available"] is True
    assert inventory["driver_version"] == "550.54.15" and inventory["nvml_version"] == "12.550.54.15"
    assert inventory["cuda_driver_version"] == "12.4"
    assert inventory["devices"] == [
        {"index": i, "name": "NVIDIA H100 80GB HBM3", "uuid": f"GPU-fake-{i}", "mem_total_mb": 80 * 1024,
         "compute_capability": "9.0"}
        for i in range(2)
    ]
    assert fake.inits == fake.shutdowns == 1


def test_throttle_names() -> None:
    assert throttle_names(0) == []
    assert throttle_names(0x1 | 0x4 | 0x800) == ["idle", "sw_power_cap", "0x800"]


BURNER = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
while True:
    pass
"""


@pytest.mark.slow
def test_host_sampler_follows_a_burning_process_tree() -> None:
    proc = subprocess.Popen([sys.executable, "-c", BURNER], stdout=subprocess.PIPE, text=True)
    grandchild = int(proc.stdout.readline())
    try:
        sink = Sink()
        sampler = HostSampler(sink, hz=10, root_pid=proc.pid)
        tree = [psutil.Process(proc.pid), psutil.Process(grandchild)]

        def cpu_s() -> float:
            return sum(t.user + t.system for t in (p.cpu_times() for p in tree))

        c0 = cpu_s()
        elapsed = run_for(sampler, 1.2)
        burned = 100 * (cpu_s() - c0) / elapsed  # the tree's CPU % over the sampler's life, read independently
        host = sink.of("host")
        assert host[0]["proc_cpu_percent"] is None  # no baseline yet
        seen = [h["proc_cpu_percent"] for h in host[1:]]
        # the sampled tree CPU % follows the burn whatever else loads the machine (a busy CI core burns less)
        assert burned > 10 and all(v is not None and v > 0 for v in seen)
        assert sum(seen) / len(seen) == pytest.approx(burned, rel=0.4)
        last = host[-1]
        assert last["proc_rss_mb"] > 0 and last["nprocs"] == 2
        assert 0 <= last["cpu_percent"] <= 100 and last["mem_used_mb"] > 0 and 0 < last["mem_percent"] <= 100
        assert sampler.pids() == {proc.pid, grandchild}
    finally:
        proc.kill()
        proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGTERM)


def test_host_sampler_rate_and_no_root() -> None:
    sink = Sink()
    sampler = HostSampler(sink, hz=20)
    assert sampler.period == pytest.approx(1 / 20)
    elapsed = run_for(sampler, 1.0)
    host = sink.of("host")
    # the k-th sample is due k periods after the start, never sooner: no more samples than periods elapsed
    assert 2 <= len(host) <= elapsed * 20
    assert [e["t"] for e in host] == sorted(e["t"] for e in host)
    assert all(e["proc_cpu_percent"] is None and e["nprocs"] is None for e in host)
    assert sampler.pids() == set() and sampler.notes == []


def test_telemetry_owns_both_samplers() -> None:
    fake = FakeNvml(ngpus=1)
    sink = Sink()
    telemetry = Telemetry(sink, hz=20, nvml=fake)
    telemetry.start(root_pid=os.getpid())
    time.sleep(0.3)
    telemetry.stop()
    assert sink.of("host") and sink.of("gpu", gpu=0) and len(sink.of("energy")) == 2
    assert sink.of("host")[-1]["nprocs"] >= 1
    assert telemetry.notes == [] and telemetry.inventory()["devices"][0]["index"] == 0
