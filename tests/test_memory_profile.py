"""The memory profile (issue 18, item 5): the snapshot's analysis on hand-built snapshots in the format torch writes
(``torch.cuda.memory._snapshot()``), the window's recording against a fake CUDA allocator, the ``memory`` event in
the protocol, its summary and ``btune show`` section, the reporting API's env-driven profile, and a CPU run."""

from __future__ import annotations

import io
import pickle
import random
import subprocess
import sys

import orjson
import pytest
from support import ROOT, btune, record_of

import btune as btune_api
from btune import api
from tuner.metrics import figures
from tuner.protocol import WORKLOAD_TYPES, Emitter, check_event, make_event, valid_envelope
from tuner.record import RecordBuilder
from tuner.report import show
from workloads import memprofile
from workloads.memprofile import BEFORE_WINDOW, NO_STACK, StepProfile, analyse, site

TORCH = "/venv/lib/python3.11/site-packages/torch"


def frame(filename: str, line: int, name: str) -> dict:
    return {"filename": filename, "line": line, "name": name}


def user(filename: str, line: int, name: str) -> list[dict]:
    """A stack as torch records it, innermost first: torch's frames, then the user's line, then its callers."""
    return [frame(f"{TORCH}/nn/modules/linear.py", 125, "forward"),
            frame(f"{TORCH}/nn/modules/module.py", 1750, "_call_impl"),
            frame(filename, line, name), frame("/proj/train.py", 99, "main")]


def event(action: str, addr: int, size: int, frames: list[dict] | None = None) -> dict:
    return {"action": action, "addr": addr, "size": size, "stream": 0, "frames": frames or []}


def block(addr: int, size: int, state: str = "active_allocated", frames: list[dict] | None = None) -> dict:
    return {"address": addr, "size": -(-size // 512) * 512, "requested_size": size, "state": state,
            "frames": frames or []}


def hand_snapshot() -> dict:
    """Weights (0x1000, 1000 B) and a buffer (0x5000, 300 B) live before the window; the trace allocates A, B, C, frees
    the buffer and A, then reuses A's address for D. Live bytes: 1300, 1700, 1900, 1600, 2100 (the peak: weights, A, B,
    C), 1700, 1800."""
    a, b, c = user("/proj/model.py", 20, "attention"), [frame(f"{TORCH}/optim/adamw.py", 50, "_multi_tensor_adamw")], \
        user("/proj/model.py", 31, "mlp")
    trace = [event("segment_alloc", 0x2000, 2 << 20), event("alloc", 0x2000, 400, a), event("alloc", 0x3000, 200, b),
             event("free_requested", 0x5000, 300), event("free_completed", 0x5000, 300),
             event("alloc", 0x4000, 500, c), event("free_requested", 0x2000, 400), event("free_completed", 0x2000, 400),
             event("alloc", 0x2000, 100, user("/proj/model.py", 40, "norm")), event("snapshot", 0, 0)]
    segments = [
        {"device": 0, "address": 0x1000, "total_size": 2 << 20, "stream": 0, "segment_type": "large",
         "allocated_size": 0, "active_size": 0,
         "blocks": [block(0x1000, 1000), block(0x2000, 100, frames=trace[8]["frames"]), block(0x3000, 200, frames=b),
                    block(0x4000, 500, frames=c), block(0x4200, 4096, "inactive")]},
        {"device": 1, "address": 0x9000, "total_size": 2 << 20, "stream": 0, "segment_type": "large",
         "allocated_size": 0, "active_size": 0, "blocks": [block(0x9000, 7777)]},
    ]
    return {"segments": segments, "device_traces": [trace, [event("alloc", 0x9100, 5, a)]]}


# -- the analysis ----------------------------------------------------------------------------------------------------
def test_the_peak_and_the_sites_live_at_it():
    res = analyse(hand_snapshot(), device=0)
    assert res["peak_bytes"] == 2100
    assert res["start_bytes"] == 1300  # the weights (live at the end) and the buffer freed in the window
    assert res["entries"] == 10
    assert res["top_sites"] == [
        {"site": BEFORE_WINDOW, "bytes": 1000, "blocks": 1},
        {"site": "proj/model.py:31 mlp", "bytes": 500, "blocks": 1},
        {"site": "proj/model.py:20 attention", "bytes": 400, "blocks": 1},
        {"site": "optim/adamw.py:50 _multi_tensor_adamw", "bytes": 200, "blocks": 1},  # torch's only: its frame
    ]


def test_each_device_is_its_own_trace():
    res = analyse(hand_snapshot(), device=1)
    assert res["peak_bytes"] == 7777 + 5
    assert [s["bytes"] for s in res["top_sites"]] == [7777, 5]
    assert analyse({"segments": [], "device_traces": []}, 0) == {"peak_bytes": 0, "top_sites": [], "entries": 0,
                                                                 "start_bytes": 0}


def test_sites_are_limited_to_the_top_n_by_bytes():
    trace = [event("alloc", 0x100 * i, 10 * i, user(f"/p/m{i}.py", i, "f")) for i in range(1, 16)]
    res = analyse({"segments": [], "device_traces": [trace]}, top=10)
    assert len(res["top_sites"]) == 10
    assert [s["bytes"] for s in res["top_sites"]] == [10 * i for i in range(15, 5, -1)]
    assert res["peak_bytes"] == sum(10 * i for i in range(1, 16))


def test_site_is_the_first_frame_outside_torch_site_packages_and_the_standard_library():
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    assert site(user("/home/me/proj/model.py", 7, "forward")) == "proj/model.py:7 forward"
    through = [frame(f"{TORCH}/nn/functional.py", 3, "linear"), frame(f"{stdlib}/contextlib.py", 81, "inner"),
               frame("/v/lib/python3.11/site-packages/transformers/x.py", 5, "fwd"), frame("/p/train.py", 9, "step")]
    assert site(through) == "p/train.py:9 step"
    assert site([frame(f"{TORCH}/optim/adamw.py", 50, "step")]) == "optim/adamw.py:50 step"
    native = [frame("??", 0, "unwind::unwind()"), frame("/c10/cuda/CUDACachingAllocator.cpp", 1, "malloc"),
              frame("/torch/csrc/autograd/generated/Functions.cpp", 4, "MmBackward0::apply")]
    assert site(native) == "generated/Functions.cpp:4 MmBackward0::apply"
    assert site([]) == NO_STACK and site(None) == NO_STACK


def brute_force(start: dict[int, int], trace: list[dict]) -> int:
    """The peak of live bytes, recounting the live set from scratch after every event."""
    live = dict(start)
    best = sum(live.values())
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
        best = max(best, sum(live.values()))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_a_trace_cut_by_the_ring_buffer_against_a_brute_force_count(seed):
    """A random program's full history; the snapshot keeps only the trace's last events (max_entries) and the blocks
    live at its end: the analysis rebuilds what was live when the kept trace begins and finds the same peak."""
    rng = random.Random(seed)
    live: dict[int, int] = {}
    full: list[dict] = []
    free_addrs = list(range(0x1000, 0x1000 + 64 * 0x100, 0x100))
    for _ in range(400):
        if live and (rng.random() < 0.45 or not free_addrs):
            addr = rng.choice(sorted(live))
            size = live.pop(addr)
            full += [event("free_requested", addr, size), event("free_completed", addr, size)]
            free_addrs.append(addr)
        else:
            addr = free_addrs.pop(rng.randrange(len(free_addrs)))
            live[addr] = rng.randrange(1, 5000)
            full.append(event("alloc", addr, live[addr], user("/p/m.py", addr, "f")))
    cut = rng.randrange(len(full))
    kept = full[cut:]
    at_cut: dict[int, int] = {}
    for e in full[:cut]:
        if e["action"] == "alloc":
            at_cut[e["addr"]] = e["size"]
        elif e["action"] == "free_completed":
            at_cut.pop(e["addr"], None)
    blocks = [block(a, s, frames=[]) for a, s in sorted(live.items())]
    snap = {"segments": [{"device": 0, "address": 0x1000, "total_size": 1 << 20, "blocks": blocks}],
            "device_traces": [kept]}
    res = analyse(snap, 0)
    assert res["peak_bytes"] == brute_force(at_cut, kept)
    assert res["start_bytes"] == sum(at_cut.values())
    assert sum(s["bytes"] for s in analyse(snap, 0, top=1000)["top_sites"]) == res["peak_bytes"]


# -- recording a window, against a fake CUDA allocator ----------------------------------------------------------------
class FakeCuda:
    """What memprofile calls of torch.cuda, recorded; the snapshot is ``hand_snapshot()``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, available: bool = True) -> None:
        self.calls: list[tuple] = []
        self.peak = 5000
        cuda = memprofile.torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: available)
        monkeypatch.setattr(cuda, "current_device", lambda: 0)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda dev=None: self.peak)
        monkeypatch.setattr(cuda, "reset_peak_memory_stats", self.reset)
        monkeypatch.setattr(cuda.memory, "_record_memory_history", self.record)
        monkeypatch.setattr(cuda.memory, "_snapshot", lambda *a, **k: hand_snapshot())

    def reset(self, dev=None) -> None:
        self.calls.append(("reset", dev))
        self.peak = 2560

    def record(self, enabled, **kw) -> None:
        self.calls.append(("record", enabled, tuple(sorted(kw))))


def test_a_window_records_steps_1_to_n_and_sends_the_event(monkeypatch, tmp_path):
    fake = FakeCuda(monkeypatch)
    monkeypatch.setenv("BTUNE_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("BTUNE_RUN_ID", "r1")
    sent: list[dict] = []
    prof = StepProfile.start(3, None, lambda **f: sent.append(f))
    assert prof is not None
    for i in range(6):
        prof.before(i)
        prof.after(i)
        if i == 0:
            assert fake.calls == []  # step 0 holds start-up: not in the window
    prof.close()
    assert fake.calls == [("reset", 0), ("record", "all", ("clear_history", "max_entries")), ("record", None, ())]
    assert len(sent) == 1
    ev = sent[0]
    path = tmp_path / "r1.memory.pickle"
    assert ev["snapshot"] == str(path) and ev["window"] == [1, 3]
    assert ev["peak_bytes"] == 2100 and ev["max_memory_allocated"] == 2560 and ev["entries"] == 10
    assert ev["top_sites"][0] == {"site": BEFORE_WINDOW, "bytes": 1000, "blocks": 1}
    with open(path, "rb") as f:
        assert pickle.load(f) == hand_snapshot()  # what torch.cuda.memory._dump_snapshot writes: memory_viz reads it
    assert prof.peak(2560) == 5000  # the run's peak: the window reset torch's counter
    kept, dropped = check_event(make_event("memory", **ev))
    assert kept is not None and dropped == 0


def test_a_window_cut_short_ends_at_the_last_step(monkeypatch, tmp_path):
    FakeCuda(monkeypatch)
    sent: list[dict] = []
    prof = StepProfile.start(10, None, lambda **f: sent.append(f), path=str(tmp_path / "x.pickle"))
    for i in range(4):
        prof.before(i)
        prof.after(i)
    prof.close()
    assert sent[0]["window"] == [1, 3] and sent[0]["snapshot"] == str(tmp_path / "x.pickle")


def test_without_cuda_one_line_and_a_note(monkeypatch, capsys):
    FakeCuda(monkeypatch, available=False)
    sent: list[dict] = []
    assert StepProfile.start(2, None, lambda **f: sent.append(f)) is None
    err = capsys.readouterr().err
    assert err == "btune: --memory-profile: no CUDA device; running without a memory profile\n"
    assert sent == [{"snapshot": None, "window": [1, 2], "note": "no CUDA device; running without a memory profile"}]


def test_the_snapshot_path_without_a_console(monkeypatch):
    monkeypatch.delenv("BTUNE_RUN_DIR", raising=False)
    monkeypatch.delenv("BTUNE_RUN_ID", raising=False)
    import os

    assert memprofile.snapshot_path() == os.path.abspath(f"btune-memory-{os.getpid()}.pickle")


# -- the reporting API ------------------------------------------------------------------------------------------------
@pytest.fixture
def api_env(monkeypatch):
    for name in ("BTUNE_EVENTS", "BTUNE_LOG", "BTUNE_MEMORY_PROFILE", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    for name in ("BTUNE_LOG", "BTUNE_MEMORY_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    api._reset()


def test_the_api_profiles_steps_1_to_n_from_the_environment(api_env, tmp_path, capsys):
    fake = FakeCuda(api_env)
    api_env.setenv("BTUNE_LOG", "1")
    api_env.setenv("BTUNE_MEMORY_PROFILE", "2")
    api_env.setenv("BTUNE_RUN_DIR", str(tmp_path))
    api_env.setenv("BTUNE_RUN_ID", "cmd")
    api._reset()
    btune_api.step(tokens=1)  # step 0; the window starts after it
    assert [c[:2] for c in fake.calls] == [("reset", 0), ("record", "all")]
    btune_api.step(tokens=1)
    btune_api.step(tokens=1)  # step 2: the window's last
    btune_api.step(tokens=1)
    assert [c[:2] for c in fake.calls] == [("reset", 0), ("record", "all"), ("record", None)]
    err = capsys.readouterr().err
    assert f"btune: memory snapshot={tmp_path / 'cmd.memory.pickle'} peak_bytes=2100" in err
    assert (tmp_path / "cmd.memory.pickle").exists()


def test_the_api_without_cuda_says_so_once_and_runs_on(api_env, capsys):
    FakeCuda(api_env, available=False)
    api_env.setenv("BTUNE_LOG", "1")
    api_env.setenv("BTUNE_MEMORY_PROFILE", "2")
    api._reset()
    for _ in range(4):
        btune_api.step()
    err = capsys.readouterr().err
    assert err.count("btune: --memory-profile: no CUDA device; running without a memory profile") == 1
    assert err.count("btune: step ") == 4


def test_the_api_checks_nothing_more_without_the_variable(api_env):
    api._reset()
    assert api._memory_at == -1
    api_env.setenv("BTUNE_LOG", "1")
    api_env.setenv("BTUNE_MEMORY_PROFILE", "3")
    api_env.setenv("RANK", "1")  # rank 0 alone profiles
    api._reset()
    assert api._memory_at == -1


@pytest.mark.slow
def test_import_btune_and_its_steps_load_no_torch_without_the_variable():
    code = ("import os, sys; os.environ.pop('BTUNE_MEMORY_PROFILE', None); os.environ['BTUNE_LOG'] = '1'\n"
            "import btune; btune.api._reset()\n"
            "[btune.step(tokens=1) for _ in range(5)]\n"
            "print('torch' in sys.modules, 'workloads.memprofile' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.stdout.split() == ["False", "False"], res.stderr


# -- the protocol ----------------------------------------------------------------------------------------------------
def memory_event(**over) -> dict:
    fields = {"snapshot": "/runs/r.memory.pickle", "window": [1, 2], "peak_bytes": 2100, "max_memory_allocated": 2560,
              "top_sites": [{"site": "proj/model.py:31 mlp", "bytes": 500, "blocks": 1}], "entries": 10, "device": 0}
    return make_event("memory", t=10.0, **{**fields, **over})


def test_the_protocol_accepts_a_memory_event_and_checks_its_fields():
    assert "memory" in WORKLOAD_TYPES
    ev = memory_event()
    assert valid_envelope(ev) and check_event(ev) == (ev, 0)
    assert check_event(memory_event(snapshot=None, note="no CUDA device"))[1] == 0
    assert check_event({k: v for k, v in ev.items() if k != "window"}) == (None, 1)
    assert check_event(memory_event(window=[1]))[0] is None
    kept, dropped = check_event(memory_event(top_sites=[{"bytes": 3}], peak_bytes=-1, note=5))
    assert dropped == 3 and "top_sites" not in kept and "peak_bytes" not in kept and kept["window"] == [1, 2]


def test_the_emitter_sends_a_memory_event():
    buf = io.BytesIO()
    Emitter(stream=buf, rank=0).memory(snapshot=None, window=[1, 4], note="no CUDA device")
    ev = orjson.loads(buf.getvalue())
    assert ev["type"] == "memory" and ev["window"] == [1, 4] and ev["note"] == "no CUDA device"
    assert "peak_bytes" not in ev and check_event(ev) == (ev, 0)


# -- the summary and btune show ---------------------------------------------------------------------------------------
def synthetic_record(**memory) -> dict:
    b = RecordBuilder("r-mem", 0.0, {"workload": "dense", "options": {"memory_profile": 2}}, {})
    for i in range(4):
        b.add(make_event("step", t=1.0 + i, step=i, step_ms=10.0, tokens=100, first=i == 0))
    b.add(memory_event(**memory))
    b.add(make_event("summary", t=9.0, memory_estimate_bytes={"weights": 800, "total": 2000},
                     torch_mem_peak_bytes=5000))
    return b.finish("ok", 0, 10.0)


def test_the_summary_puts_the_peak_beside_torchs_and_the_estimate():
    mp = synthetic_record()["summary"]["memory_profile"]
    assert mp["peak_bytes"] == 2100 and mp["peak_mb"] == pytest.approx(2100 / 2**20)
    assert mp["max_memory_allocated"] == 2560 and mp["run_peak_bytes"] == 5000 and mp["estimate_bytes"] == 2000
    assert mp["snapshot"] == "/runs/r.memory.pickle" and mp["window"] == [1, 2]
    assert mp["top_sites"] == [{"site": "proj/model.py:31 mlp", "bytes": 500, "blocks": 1}]
    fig = next(f for f in figures(synthetic_record()["summary"], "command") if f.metric.name == "memory_profile_peak")
    assert fig.value == pytest.approx(2100 / 2**20)
    assert RecordBuilder("x", 0.0, {"workload": "dense"}, {}).finish("ok", 0, 1.0)["summary"]["memory_profile"] is None


def test_show_has_a_memory_profile_section():
    text = show(synthetic_record())
    section = text[text.index("Memory profile (steps 1-2)"):]
    for want in ("peak of live allocations (trace replay)", "2.1 KiB",
                 "torch max_memory_allocated, same window", "torch peak over the whole run", "dry-run estimate",
                 "peak vs estimate", "+5.0%", "proj/model.py:31 mlp",
                 "snapshot  /runs/r.memory.pickle  (open it at https://pytorch.org/memory_viz)"):
        assert want in section, want
    noted = show(synthetic_record(snapshot=None, peak_bytes=None, max_memory_allocated=None, top_sites=[],
                                  note="no CUDA device; running without a memory profile"))
    assert "Memory profile (steps 1-2)\n  note: no CUDA device; running without a memory profile" in noted
    assert "snapshot  " not in noted
    assert "Memory profile" not in show(RecordBuilder("x", 0.0, {"workload": "dense"}, {}).finish("ok", 0, 1.0))


# -- a real run on CPU ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dense_on_cpu_with_memory_profile_runs_on_and_says_why_there_is_none(tmp_path):
    res = btune("run", "dense", "--preset", "tiny", "--steps", "4", "--memory-profile", "2", "--device", "cpu",
                "--out", str(tmp_path))
    rec = record_of(res)
    assert rec["status"] == "ok"
    mem = [e for e in rec["events"] if e["type"] == "memory"]
    assert len(mem) == 1 and mem[0]["snapshot"] is None and mem[0]["window"] == [1, 2]
    assert mem[0]["note"] == "no CUDA device; running without a memory profile"
    said = [e for e in rec["events"] if e["type"] == "log" and e.get("stream") == "stderr"
            and "memory" in e["message"]]  # the workload's stderr, as the record keeps it
    assert [e["message"] for e in said] == ["btune: --memory-profile: no CUDA device; running without a memory profile"]
    assert "Memory profile (steps 1-2)\n  note: no CUDA device; running without a memory profile" in res.stdout
    assert rec["config"]["options"]["memory_profile"] == 2
    assert rec["summary"]["memory_profile"]["note"] == mem[0]["note"]
    assert not list(tmp_path.glob("*.pickle"))


@pytest.mark.slow
@pytest.mark.skipif(not memprofile.torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("workload", ["moe", "dense"])
def test_checkpointed_runs_on_cuda_with_memory_profile(workload, tmp_path):
    """Checkpointing under a recorded memory history: the MoE run failed in backward with a SystemError while the
    recompute stopped early (H200, torch 2.11); each block is now recomputed to its end."""
    res = btune("run", workload, "--preset", "tiny", "--steps", "4", "--memory-profile", "2", "--device", "cuda",
                "--activation-checkpointing", "--out", str(tmp_path))
    rec = record_of(res)
    assert rec["status"] == "ok", rec.get("error")
    mem = [e for e in rec["events"] if e["type"] == "memory"]
    assert len(mem) == 1 and mem[0]["peak_bytes"] > 0 and mem[0]["top_sites"]
