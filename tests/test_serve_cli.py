"""`btune run serve` on CPU: a real record, its serving summary against tuner.stats, refusals before launch,
and two replicas through torchrun counting every request once."""

import subprocess
import sys

import pytest
from support import ONE_THREAD, btune, environ, record_of

from tuner.launch import build_config, make_runner
from tuner.serving import itl_ms
from tuner.stats import describe
from workloads.models.config import PRESETS
from workloads.models.flops import param_counts

pytestmark = pytest.mark.slow  # every test runs btune, the workload or torchrun as processes

SMALL = ["--preset", "tiny", "--warmup", "1", "--max-batch", "4", "--prompt-len", "uniform:2,24",
         "--output-len", "uniform:1,12"]


def requests_of(rec: dict) -> list[dict]:
    return [e for e in rec["events"] if e["type"] == "request"]


@pytest.fixture(scope="module")
def open_loop(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("runs")
    return record_of(btune("run", "serve", *SMALL, "--request-rate", "200", "--num-requests", "14",
                           "--max-prefill-tokens", "16", "--out", str(out), env=ONE_THREAD))


def test_record_holds_every_request_and_the_summary_matches_tuner_stats(open_loop):
    rec = open_loop
    assert rec["status"] == "ok" and rec["config"]["argv"][1:3] == ["-m", "workloads.serve"]
    reqs = requests_of(rec)
    assert sorted(r["rid"] for r in reqs) == list(range(14)) and all(r["finished"] for r in reqs)
    assert "serving" not in rec["summary"]["workload"], "the workload sends raw events; the console computes"
    s = rec["summary"]["serving"]
    assert s["requests"] == {"total": 14, "finished": 14, "unfinished": 0, "unfinished_started": 0,
                             "good": s["requests"]["good"]}
    for key, values in (("ttft_ms", [r["ttft_ms"] for r in reqs]), ("e2e_ms", [r["e2e_ms"] for r in reqs]),
                        ("tpot_ms", [r["tpot_ms"] for r in reqs if r["tpot_ms"] is not None]),
                        ("itl_ms", [x for r in reqs for x in itl_ms(r)])):
        want = describe(values)
        assert s[key].keys() == want.keys()
        for k, v in want.items():
            assert s[key][k] == pytest.approx(v, rel=1e-9), (key, k)
    for r in reqs:  # raw timeline: arrival, every token, finish
        assert r["arrival_s"] <= r["first_token_s"] <= r["finish_s"] == r["token_s"][-1]
        assert len(r["token_s"]) == r["output_len"] == r["output_tokens"]
    assert s["output_tokens"] == sum(r["output_len"] for r in reqs)
    assert s["output_tokens_per_s"] == pytest.approx(s["output_tokens"] / s["duration_s"])
    assert 1 <= s["peak_concurrency"] <= 14


def test_steps_and_engine_series(open_loop):
    rec = open_loop
    steps = rec["series"]["step"]["0"]
    measured = [i for i, w in enumerate(steps["warmup"]) if not w]
    assert sum(steps["tokens"][i] for i in measured) == rec["summary"]["serving"]["tokens_generated"]
    assert all(steps["prefill_tokens"][i] <= 16 for i in measured)
    assert rec["summary"]["tokens_total"] == sum(steps["tokens"][i] for i in measured)
    engine = rec["series"]["series"]["engine"]
    assert {"queue", "running", "kv_used"} <= engine.keys()
    assert max(engine["running"]) <= 4 and all(0 <= x <= 1 for x in engine["kv_used"])
    meta = next(e for e in rec["events"] if e["type"] == "meta")
    assert meta["workload"] == "serve" and meta["plan"]["load"]["mode"] == "open"
    assert meta["flops_per_token"] > 0 and meta["backends"]["compile"]["decode"] == "none"
    # MBU's bytes, recomputed from the raw steps: the weights once per pass, each attended position once
    cfg = PRESETS["tiny"]
    weights = (param_counts(cfg)["matmul"] + param_counts(cfg)["other"]) * 4  # fp32 on CPU
    per_pos = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
    assert (meta["weight_bytes"], meta["kv_bytes_per_token"]) == (weights, per_pos)
    moved = sum(steps["weight_passes"][i] * weights + steps["kv_tokens"][i] * per_pos for i in measured)
    secs = sum(steps["step_ms"][i] for i in measured) / 1000  # every load step is steady (warm-up is its own)
    mbu = rec["summary"]["mbu"]
    assert mbu["value"] is None and "CPU" in mbu["reason"]
    assert mbu["achieved_tb_s"] == pytest.approx(moved / secs / 1e12, rel=1e-9)
    assert all(steps["kv_tokens"][i] > 0 and steps["weight_passes"][i] >= 1 for i in measured)


def test_a_step_cap_reports_unfinished_requests(tmp_path):
    rec = record_of(btune("run", "serve", *SMALL, "--concurrency", "3", "--num-requests", "6",
                          "--output-len", "fixed:20", "--steps", "4", "--out", str(tmp_path), env=ONE_THREAD))
    reqs = requests_of(rec)
    assert rec["summary"]["workload"]["engine"]["stopped"] == "steps"
    assert len(reqs) == 3 and not any(r["finished"] for r in reqs)
    s = rec["summary"]["serving"]
    assert s["requests"]["unfinished"] == 3 and s["goodput"] == 0


#: Serve options refused before launch (with --preset tiny), and the line that says why
#: (tests/test_refusals.py runs them in process too).
REFUSED_SERVE = [
    (["--prompt-len", "fixed:200", "--output-len", "fixed:100"], "exceed tiny's context of 256"),
    (["--max-seq-len", "40"], "longer than the KV cache (--max-seq-len 40)"),
    (["--request-rate", "0"], "a request rate must be > 0"),
    (["--request-rate", "-2"], "--request-rate: '-2' is out of range"),
    (["--request-rate", "5", "--concurrency", "4"], "contradict each other"),
    (["--burstiness", "0.5"], "it needs --request-rate"),
    (["--prompt-len", "uniform:9,2"], "uniform:A,B needs 1 <= A <= B"),
    (["--attention-backend", "flash"], "the flash kernel takes no mask"),
    (["--compile-mode", "reduce-overhead"], "CUDA graphs and autotuning need a GPU"),
    (["--tp", "3"], "--tp 3 must divide the attention heads (4) and KV heads (4)"),
]


@pytest.mark.parametrize(("args", "words"), REFUSED_SERVE)
def test_bad_input_is_refused_before_launch(tmp_path, args, words):
    res = btune("run", "serve", "--preset", "tiny", *args, "--out", str(tmp_path), env=ONE_THREAD)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
    assert not list(tmp_path.glob("*.json")), "nothing was launched"


def test_the_workload_alone_refuses_bad_load_flags():
    res = subprocess.run([sys.executable, "-m", "workloads.serve", "--request-rate", "3", "--concurrency", "2"],
                         capture_output=True, text=True, env=environ(ONE_THREAD), timeout=120)
    assert res.returncode == 2 and "contradict" in res.stderr


def test_two_replicas_count_each_request_once(tmp_path):
    config = build_config("serve", [*SMALL, "--num-requests", "9", "--replicas", "2", "--device", "cpu"])
    assert list(config.argv[1:6]) == ["-m", "workloads.torchrun", "--standalone", "--nproc-per-node", "2"]
    result = make_runner(config, tmp_path, telemetry=False).run()
    rec = result.record
    assert rec["status"] == "ok", rec.get("error")
    reqs = requests_of(rec)
    assert sorted(r["rid"] for r in reqs) == list(range(9))
    assert {r["rank"] for r in reqs} == {0, 1} and all(r["replica"] == r["rank"] for r in reqs)
    assert rec["summary"]["workload"]["replicas"] == 2
    s = rec["summary"]["serving"]
    assert s["requests"]["finished"] == 9 and s["output_tokens"] == sum(r["output_len"] for r in reqs)
    summaries = [e for e in rec["events"] if e["type"] == "summary"]
    assert len(summaries) == 1 and summaries[0]["rank"] == 0
    assert sorted(rec["series"]["step"]) == ["0", "1"]
    # replicas' rates add in the console's summary: the sum of each rank's tokens over its own busy time
    rates = []
    for cols in rec["series"]["step"].values():
        keep = [i for i, w in enumerate(cols["warmup"]) if not w]
        rates.append(sum(cols["tokens"][i] for i in keep) / (sum(cols["step_ms"][i] for i in keep) / 1000))
    assert rec["summary"]["throughput_tokens_per_s"] == pytest.approx(sum(rates))
