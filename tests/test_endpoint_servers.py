"""``btune run serve --endpoint`` against real OpenAI-compatible servers started here on 127.0.0.1: btune's own
engine (``btune serve-api``) and a third party's (Hugging Face ``transformers serve`` with the trained tiny model
saved in tests/data), each driven open-loop and closed-loop through the real CLI.

The metrics are the console's (tuner/serving.py); here they are checked against the recorded chunk timestamps
and against what each server says it did."""

from __future__ import annotations

import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from support import ROOT, btune, free_port, record_of, wait_until
from test_api_server import Server

TINY_MODEL = ROOT / "tests" / "data" / "tiny_model"

pytestmark = pytest.mark.slow


def requests_of(rec: dict) -> list[dict]:
    return [e for e in rec["events"] if e["type"] == "request"]


def endpoint_of(rec: dict) -> dict:
    return next(e for e in rec["events"] if e["type"] == "meta")["endpoint"]


def check_latencies(rec: dict) -> None:
    """TTFT, ITL and E2E percentiles of the summary equal numpy's over the recorded chunk times."""
    done = [r for r in requests_of(rec) if r["finished"]]
    serving = rec["summary"]["serving"]
    ttft = [(r["token_s"][0] - r["arrival_s"]) * 1000 for r in done]
    itl = [(b - a) * 1000 for r in done for a, b in pairwise(r["token_s"])]
    e2e = [(r["finish_s"] - r["arrival_s"]) * 1000 for r in done]
    for name, values in (("ttft_ms", ttft), ("itl_ms", itl), ("e2e_ms", e2e)):
        for q in (50, 99):
            assert serving[name][f"p{q}"] == pytest.approx(float(np.percentile(values, q)), rel=1e-6, abs=1e-6), name


@pytest.fixture(scope="module")
def engine_server():
    s = Server("--preset", "tiny", "--seed", "3")
    yield s
    s.stop()


@pytest.mark.parametrize("load", [["--request-rate", "20"], ["--concurrency", "3"]], ids=["open", "closed"])
def test_btune_engine_behind_the_api_honours_exact_lengths(engine_server, tmp_path, load):
    rec = record_of(btune("run", "serve", "--endpoint", engine_server.url + "/v1", "--model", engine_server.name,
                          "--num-requests", "8", "--prompt-len", "uniform:4,24", "--output-len", "uniform:2,12",
                          *load, "--out", str(tmp_path)))
    ep = endpoint_of(rec)
    assert ep["dropped"] == [] and ep["token_count"] == "usage"  # serve-api takes every optional field
    reqs = requests_of(rec)
    assert len(reqs) == 8 and all(r["finished"] for r in reqs)
    # exact lengths: the engine has no end-of-sequence stop, so usage says exactly what was asked
    assert [r["output_tokens"] for r in reqs] == [r["output_len"] for r in reqs]
    assert all(len(r["token_s"]) == r["output_len"] for r in reqs)  # one chunk a token
    serving = rec["summary"]["serving"]
    assert serving["requests"]["finished"] == 8 and serving["output_tokens"] == sum(r["output_len"] for r in reqs)
    check_latencies(rec)
    if load[0] == "--concurrency":
        by_client: dict[int, list[dict]] = {}
        for r in reqs:
            by_client.setdefault(r["client"], []).append(r)
        assert len(by_client) == 3
        for rs in by_client.values():  # a client's next request goes out when its previous one ended
            rs.sort(key=lambda r: r["arrival_s"])
            assert all(b["arrival_s"] >= a["finish_s"] for a, b in pairwise(rs))


@pytest.fixture(scope="module")
def transformers_server(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    port = free_port()
    log = tmp_path_factory.mktemp("tserve") / "server.log"
    with log.open("w") as out:
        cli = "from transformers.cli.transformers import main; main()"
        proc = subprocess.Popen([sys.executable, "-c", cli, "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu", str(TINY_MODEL)],
                                stdout=out, stderr=subprocess.STDOUT, env={**_env(), "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        import urllib.request

        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    wait_until(up, 180, "transformers serve to answer /v1/models")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("BTUNE_")}


@pytest.mark.parametrize("load", [["--request-rate", "4"], ["--concurrency", "2"]], ids=["open", "closed"])
def test_transformers_serve_is_load_tested_with_the_same_metrics(transformers_server, tmp_path, load):
    rec = record_of(btune("run", "serve", "--endpoint", transformers_server + "/v1", "--model", str(TINY_MODEL),
                          "--tokenizer", str(TINY_MODEL), "--num-requests", "6", "--prompt-len", "uniform:8,32",
                          "--output-len", "uniform:4,16", *load, "--out", str(tmp_path)))
    reqs = requests_of(rec)
    assert len(reqs) == 6 and all(r["finished"] for r in reqs), [r.get("error") for r in reqs]
    ep = endpoint_of(rec)
    # transformers serve ends a stream after its finish_reason chunk (no [DONE]) with usage in it; it refuses
    # some optional fields (5.24: ignore_eos, min_tokens), which the probe drops and the record names
    assert ep["token_count"] == "usage" and set(ep["dropped"]) <= {"ignore_eos", "min_tokens", "stream_options",
                                                                   "max_completion_tokens"}
    assert all(0 < r["output_tokens"] <= r["output_len"] for r in reqs)
    assert all(0 < len(r["token_s"]) <= r["output_tokens"] for r in reqs)  # a chunk may carry several tokens
    check_latencies(rec)
    assert Path(rec["config"]["options"]["tokenizer"]) == TINY_MODEL


def test_the_app_launches_an_endpoint_run_and_shows_its_failures(tmp_path):
    """The launch form's endpoint fields build the command line; the replay of an endpoint run whose server
    failed half the requests shows the serving panel with the failed count from the registry."""
    from test_endpoint import start_server
    from test_tui_support import make_app, run, until

    from tuner.launch import build_config
    from tuner.runs import load_record
    from tuner.tui.screens.launch import LaunchScreen
    from tuner.tui.screens.replay import ReplayScreen

    proc, url = start_server()
    try:
        res = btune("run", "serve", "--endpoint", url, "--model", "flaky", "--concurrency", "1", "--num-requests",
                    "4", "--output-len", "fixed:3", "--out", str(tmp_path))
    finally:
        proc.kill()
        proc.wait()
    rec = load_record(Path(res.stdout.strip().splitlines()[-1]))
    assert rec["summary"]["serving"]["failures"]["total"] == 2

    async def body() -> tuple[str, str, str]:
        app = make_app(tmp_path, python="python")
        async with app.run_test(size=(110, 40)) as pilot:
            screen = app.screen
            assert isinstance(screen, LaunchScreen)
            await until(pilot, lambda: screen.ready, 10, "the launch screen")
            screen.select_workload("serve")
            await until(pilot, lambda: screen.spec.name == "serve" and screen.ready, 20, "the serve form")
            screen.set_option("endpoint", url)
            screen.set_option("model", "flaky")
            await until(pilot, lambda: "--endpoint" in str(screen.query_one("#command").render()), 10, "endpoint")
            values, errors = screen.form.collect()
            assert not errors, errors
            command = str(screen.query_one("#command").render())
            expected = build_config("serve", values, python="python", machine=app.machine.machine).command_line
            await app.push_screen(ReplayScreen(rec, autoplay=False, at_end=True))
            await pilot.pause()
            panel = app.screen.query_one("#latency")
            return command, f"$ {expected}", panel.text.plain + " " + str(panel.border_subtitle)

    command, expected, shown = run(body())
    assert command == expected and f"--endpoint {url} --model flaky" in command
    assert "4 requests (2 failed)" in shown, shown
