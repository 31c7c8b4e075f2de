"""Re-create the recorded runs under tests/data/runs (run from the repository root; takes about a minute).

- two real CPU runs of ``dense`` (tiny preset, different batch sizes);
- a real CPU run of ``moe`` (tiny, a balance window of 2 steps, so it sends ``experts`` events);
- a real ``moe`` run that fails: its own option check rejects ``--top-k 64`` (launched through the Runner,
  since ``btune run`` refuses it before launch);
- one real ``dense`` run sampled through the fake NVML of tests/fake_nvml.py (8 fake GPUs: the power, memory
  and util panels are fed by it; the numbers are the fake's, not a GPU's);
- one synthetic run (``python -c`` with tuner.protocol.Emitter) that sends steps and serving ``request`` events
  with fixed timelines (its figures do not depend on the machine); its workload is ``synthetic``;
- a truncated copy of a run file (``…-dense-bad0.json``), for the runs screen's error row;
- a real short CPU run of ``serve`` (tiny, 16 requests: engine steps, request timelines, the serving block);
- a real CPU run of ``tp-validate`` (tiny, TP=2 under torchrun with gloo: no steps, the comparison table on
  stdout and the verdict in its summary).

``serve_run()`` and ``tp_validate_run()`` add only their own file, e.g.
``python -c "import sys; sys.path.insert(0, 'tests/data'); import make_runs; make_runs.serve_run()"``.

The snapshot tests read these files; re-making them changes the snapshots (update with --snapshot-update).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "runs"
BTUNE = [str(Path(sys.executable).with_name("btune"))]

SYNTHETIC = r"""
import random, time
from tuner.protocol import Emitter
rng = random.Random(7)
em = Emitter()
em.meta(workload="synthetic", device="cpu", device_name="cpu", n_devices=1, flops_per_token=None)
rid = 0
for i in range(24):
    em.step(i, 40.0 + rng.random() * 4, 512, warmup=i < 2)
    for _ in range(10):
        arrival = i * 0.05 + rng.random() * 0.05
        first = arrival + (20 + rng.random() * 30) / 1000
        tokens = [first]
        for _ in range(63):
            tokens.append(tokens[-1] + (5 + rng.random() * 2) / 1000)
        e2e, ttft = (tokens[-1] - arrival) * 1000, (first - arrival) * 1000
        em.emit("request", rid=rid, replica=0, finished=True, prompt_len=128, output_len=64, output_tokens=64,
                arrival_s=arrival, first_token_s=first, finish_s=tokens[-1], token_s=tokens, ttft_ms=ttft,
                tpot_ms=(e2e - ttft) / 63, e2e_ms=e2e)
        rid += 1
    time.sleep(0.05)
em.summary(load_duration_s=24 * 0.05 + 0.5, slo={"ttft_ms": 40.0, "tpot_ms": 6.5})
"""


def btune_run(workload: str, *args: str) -> None:
    subprocess.run([*BTUNE, "run", workload, "--out", str(OUT), *args], check=False, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def runner_run(name: str, argv: list[str], options: dict[str, object] | None = None,
               defaults: dict[str, object] | None = None) -> Path:
    from tuner import runs
    from tuner.runner import Runner

    config = {"workload": name, "options": options or {}, "argv": argv, "defaults": defaults or {}}
    runner = Runner(argv, run_id=runs.new_run_id(name), out_dir=OUT, config=config, cwd=str(ROOT))
    return runner.run().record_path


def main() -> None:
    from tuner.launch import build_config

    sys.path.insert(0, str(ROOT / "tests"))
    from fake_nvml import FakeNvml

    from tuner import catalog
    from tuner.launch import make_runner

    OUT.mkdir(parents=True, exist_ok=True)
    btune_run("dense", "--preset", "tiny", "--steps", "6", "--warmup", "2")
    btune_run("dense", "--preset", "tiny", "--steps", "6", "--warmup", "2", "--batch-size", "4")
    btune_run("moe", "--preset", "tiny", "--steps", "6", "--warmup", "2", "--balance-window", "2")
    moe = catalog.get("moe")
    bad = {"preset": "tiny", "top_k": 64, "steps": 2}
    runner_run("moe", [sys.executable, "-m", "workloads.moe", "--preset", "tiny", "--top-k", "64", "--steps", "2"],
               {**moe.defaults(), **bad}, moe.defaults())
    config = build_config("dense", ["--preset", "tiny", "--steps", "8", "--warmup", "2"])
    make_runner(config, OUT, nvml=FakeNvml(8)).run()
    runner_run("synthetic", [sys.executable, "-c", SYNTHETIC])
    good = sorted(OUT.glob("*-dense-*.json"))[0]
    data = good.read_bytes()
    (OUT / "20261121-000000-dense-bad0.json").write_bytes(data[: len(data) // 2])
    serve_run()
    tp_validate_run()


def serve_run() -> None:
    """A real short serving run on CPU."""
    OUT.mkdir(parents=True, exist_ok=True)
    btune_run("serve", "--preset", "tiny", "--num-requests", "16")


def tp_validate_run() -> None:
    """A real TP=2 against TP=1 comparison on CPU (torchrun, gloo)."""
    OUT.mkdir(parents=True, exist_ok=True)
    btune_run("tp-validate", "--preset", "tiny")


if __name__ == "__main__":
    main()
