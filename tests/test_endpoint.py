"""`btune run serve --endpoint URL`: the load over HTTP to real aiohttp servers on 127.0.0.1 (this file run as a
program is the server), open and closed loop, failures as data, dropped fields, the API key kept out of every
record; and quick tests of the SSE parser, the payloads, the prompts and the refusals before launch.

Server behaviours, chosen by the request's model: ``good`` (exact lengths, usage when asked, keep-alive comments,
CRLF), ``strict`` (422 to stream_options and ignore_eos), ``flaky`` (500 to every other request), ``stall`` (one
chunk, then silence), ``malformed`` (one chunk, then data that is not JSON), ``mortal`` (the process kills
itself in the middle of its third stream).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from support import btune, free_port, record_of, refused, start_program_server

from tuner.serving import serving_summary
from workloads.client.payload import build_payload, content_of, usage_tokens
from workloads.client.prompts import Prompts, read_prompts
from workloads.client.sse import SSEError, SSEParser

SECRET = "sk-test-0123456789-do-not-record"
WORDS = ["[UNK]", "w", "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by"]


# -- the server (this file as a program) -------------------------------------------------------------------------

def serve(port: int) -> None:
    """Serve /v1/completions and /v1/chat/completions on 127.0.0.1:``port`` until killed."""
    import asyncio

    from aiohttp import web

    seen: dict[str, int] = {}

    async def handle(req: web.Request) -> web.StreamResponse:
        body = await req.json()
        model, chat = body["model"], req.path.endswith("/chat/completions")
        seen[model] = seen.get(model, 0) + 1
        if model == "strict" and ("stream_options" in body or "ignore_eos" in body):
            return web.json_response({"error": "extra fields not permitted"}, status=422)
        if model == "flaky" and seen[model] % 2 == 0:
            return web.Response(status=500, text="boom: the server failed this one")
        n = body.get("max_completion_tokens", body.get("max_tokens", 1))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        await resp.write(b": keep-alive\r\n\r\n")
        for i in range(n):
            piece = {"delta": {"content": " w"}} if chat else {"text": " w"}
            await resp.write(f"data: {json.dumps({'choices': [piece]})}\r\n\r\n".encode())
            if model == "stall" and i == 0:
                await asyncio.sleep(60)
            if model == "malformed":
                await resp.write(b"data: {not json\n\n")
            if model == "mortal" and seen[model] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            await asyncio.sleep(0.005)
        if "stream_options" in body:
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': n}})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    app.router.add_post("/v1/chat/completions", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


def start_server() -> tuple[subprocess.Popen, str]:
    """This file as a server on a free port; its base URL once it answers."""
    return start_program_server(__file__)


@pytest.fixture(scope="module")
def server():
    proc, url = start_server()
    yield url
    proc.kill()
    proc.wait()


def run(out: Path, url: str, model: str, *args: str, code: int | None = 0, env: dict | None = None) -> dict:
    res = btune("run", "serve", "--endpoint", url, "--model", model, "--out", str(out), *args, env=env,
                timeout=120)
    rec = record_of(res, code)
    rec["_res"] = res
    return rec


def requests_of(rec: dict) -> list[dict]:
    return sorted((e for e in rec["events"] if e["type"] == "request"), key=lambda r: r["rid"])


def meta_of(rec: dict) -> dict:
    return next(e for e in rec["events"] if e["type"] == "meta")


def assert_percentiles_recomputed(rec: dict) -> None:
    """TTFT, ITL and TPOT percentiles of the record equal numpy's over the recorded chunk timestamps."""
    done = [r for r in requests_of(rec) if r["status"] == "finished"]
    ttft = [(r["token_s"][0] - r["arrival_s"]) * 1000 for r in done]
    itl = [(b - a) * 1000 for r in done for a, b in zip(r["token_s"], r["token_s"][1:], strict=False)]
    tpot = [(r["finish_s"] - r["token_s"][0]) * 1000 / (r["output_tokens"] - 1) for r in done
            if r["output_tokens"] > 1]
    s = rec["summary"]["serving"]
    for key, xs in (("ttft_ms", ttft), ("itl_ms", itl), ("tpot_ms", tpot)):
        assert s[key]["n"] == len(xs) > 0, key
        for p in (50, 90, 99):
            assert s[key][f"p{p}"] == pytest.approx(float(np.percentile(xs, p)), rel=1e-9, abs=1e-9), (key, p)


# -- slow: the real CLI against real servers ----------------------------------------------------------------------

@pytest.mark.slow
def test_open_loop_exact_lengths_usage_and_no_secret(server, tmp_path):
    rec = run(tmp_path, server, "good", "--request-rate", "200", "--num-requests", "6", "--prompt-len",
              "uniform:4,12", "--output-len", "uniform:2,8", "--api-key-env", "BTUNE_TEST_KEY",
              env={"BTUNE_TEST_KEY": SECRET})
    reqs = requests_of(rec)
    assert rec["status"] == "ok" and [r["rid"] for r in reqs] == list(range(6))
    assert all(r["status"] == "finished" and r["finished"] for r in reqs)
    for r in reqs:
        assert len(r["token_s"]) == r["output_tokens"] == r["output_len"]
        assert r["arrival_s"] <= r["first_token_s"] <= r["finish_s"]
    meta = meta_of(rec)
    assert meta["endpoint"]["dropped"] == [] and meta["endpoint"]["token_count"] == "usage"
    assert meta["plan"]["load"]["mode"] == "open" and meta["flops_per_token"] is None
    assert meta["options"]["api_key_env"] == "BTUNE_TEST_KEY"
    s = rec["summary"]["serving"]
    assert s["requests"]["finished"] == 6 and s["failures"] == {"total": 0, "by_reason": {}}
    assert_percentiles_recomputed(rec)
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert SECRET not in f.read_text(errors="replace"), f
    assert SECRET not in rec["_res"].stdout + rec["_res"].stderr


@pytest.mark.slow
def test_closed_loop_chat_drops_refused_fields_and_counts_with_the_tokenizer(server, tmp_path):
    tok = tmp_path / "tok"
    make_tokenizer(tok)
    rec = run(tmp_path, server, "strict", "--api", "chat", "--concurrency", "2", "--num-requests", "5",
              "--output-len", "uniform:2,6", "--tokenizer", str(tok))
    meta = meta_of(rec)
    assert meta["endpoint"]["dropped"] == ["stream_options", "ignore_eos"]
    assert meta["endpoint"]["token_count"] == "tokenizer"
    assert rec["summary"]["workload"]["endpoint"]["token_count"] == "tokenizer"
    reqs = requests_of(rec)
    assert [r["status"] for r in reqs] == ["finished"] * 5
    for r in reqs:  # the server sends one " w" per token asked: the tokenizer counts them
        assert r["output_tokens"] == r["output_len"] == len(r["token_s"])
    by_client: dict[int, list[dict]] = {}
    for r in reqs:
        by_client.setdefault(r["client"], []).append(r)
    assert sorted(by_client) == [0, 1]
    for rs in by_client.values():  # each client's next request follows its previous one's end
        for prev, nxt in pairwise(rs):
            assert nxt["arrival_s"] >= prev["finish_s"]
    assert_percentiles_recomputed(rec)


@pytest.mark.slow
def test_failures_are_data(server, tmp_path):
    flaky = run(tmp_path, server, "flaky", "--concurrency", "1", "--num-requests", "4", "--output-len", "fixed:3")
    reqs = requests_of(flaky)
    # the probe is the server's first request: the load's 1st and 3rd are its even ones
    assert [r["status"] for r in reqs] == ["failed", "finished", "failed", "finished"]
    assert all(r["error"].startswith("HTTP 500: boom") for r in reqs if r["status"] == "failed")
    s = flaky["summary"]["serving"]
    assert s["failures"] == {"total": 2, "by_reason": {"HTTP 500": 2}} and s["requests"]["finished"] == 2
    assert_percentiles_recomputed(flaky)
    shown = btune("show", str(flaky["path"]) if "path" in flaky else flaky["_res"].stdout.strip().splitlines()[-1])
    assert shown.returncode == 0 and "failed: HTTP 500" in shown.stdout, shown.stdout + shown.stderr

    stall = run(tmp_path, server, "stall", "--request-rate", "100", "--num-requests", "2", "--output-len",
                "fixed:3", "--request-timeout", "1")
    assert [(r["status"], r["error"].split(":")[0]) for r in requests_of(stall)] == [("failed", "timeout")] * 2
    assert all(len(r["token_s"]) == 1 for r in requests_of(stall))  # the chunk before the stall is kept

    bad = run(tmp_path, server, "malformed", "--request-rate", "100", "--num-requests", "2", "--output-len",
              "fixed:3")
    assert [r["status"] for r in requests_of(bad)] == ["failed"] * 2
    assert bad["summary"]["serving"]["failures"]["by_reason"] == {"malformed SSE": 2}


@pytest.mark.slow
def test_server_killed_mid_run_and_drain(tmp_path):
    proc, url = start_server()
    try:
        rec = run(tmp_path, url, "mortal", "--concurrency", "1", "--num-requests", "5", "--output-len", "fixed:4")
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    statuses = [(r["status"], (r.get("error") or "").split(":")[0]) for r in requests_of(rec)]
    # the probe was the 1st request, the load's 1st the 2nd; the 3rd dies mid-stream; then nothing listens
    assert statuses[:2] == [("finished", ""), ("failed", "stream cut")]
    # then nothing listens: refused, or (the next one sent while the killed process's socket was still going
    # away, on a loaded machine) cut as well; the last is refused
    assert all(st == "failed" and why in ("connection refused", "stream cut") for st, why in statuses[2:])
    assert statuses[-1] == ("failed", "connection refused") and len(statuses) == 5
    assert rec["status"] == "ok" and rec["summary"]["serving"]["failures"]["total"] == 4


@pytest.mark.slow
def test_drain_timeout_leaves_requests_unfinished(server, tmp_path):
    rec = run(tmp_path, server, "stall", "--request-rate", "100", "--num-requests", "2", "--output-len",
              "fixed:3", "--drain-timeout", "0.5")
    reqs = requests_of(rec)
    assert [r["status"] for r in reqs] == ["unfinished"] * 2 and not any(r["finished"] for r in reqs)
    assert rec["summary"]["serving"]["requests"]["unfinished"] == 2


@pytest.mark.slow
def test_unreachable_endpoint_is_one_line_and_a_valid_record(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    rec = run(tmp_path, url, "m", "--request-rate", "100", "--num-requests", "3", code=1)
    res = rec["_res"]
    want = f"{url}: connection refused (no request reached the server)"
    # the workload's one line as the console relays it live, then the console's verdict quoting it
    errors = [line for line in res.stdout.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {want}", f"error: exit status 1: {want}"], res.stdout
    assert "Traceback" not in res.stderr + res.stdout
    assert rec["status"] == "failed" and rec["error"]["message"] == f"exit status 1: {want}"
    assert [r["status"] for r in requests_of(rec)] == ["failed"] * 3


# -- quick: the parts ---------------------------------------------------------------------------------------------

def make_tokenizer(directory: Path) -> None:
    """A word-level tokenizer.json made here (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[UNK]"])  # decoded prompts leave it out
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))


def test_sse_parser_tolerates_comments_crlf_multiline_and_split_chunks():
    stream = b': hi\r\n\r\ndata: {"a":1}\r\n\r\ndata: line1\ndata: line2\n\nevent: x\nid: 3\ndata:[DONE]\r\r'
    for cut in range(len(stream) + 1):  # every split point, CRLF split across chunks included
        p = SSEParser()
        got = p.feed(stream[:cut]) + p.feed(stream[cut:]) + p.close()
        assert got == ['{"a":1}', "line1\nline2", "[DONE]"], cut
    p = SSEParser()
    assert p.feed("data: é".encode()[:-1]) == [] and p.feed("é".encode()[-1:] + b"\n\n") == ["é"]


@pytest.mark.parametrize("bad", [b"hello there\n\n", b"data: ok\n\xff\xfe\n\n"])
def test_sse_parser_reports_malformed_streams(bad):
    with pytest.raises(SSEError):
        SSEParser().feed(bad)


def test_payloads_ask_exact_lengths_and_drop_refused_fields():
    every = frozenset({"stream_options", "ignore_eos", "min_tokens", "max_completion_tokens"})
    assert build_payload("completions", "m", "hi", 7, every) == {
        "model": "m", "stream": True, "prompt": "hi", "max_tokens": 7, "ignore_eos": True, "min_tokens": 7,
        "stream_options": {"include_usage": True}}
    chat = build_payload("chat", "m", "hi", 5, every)
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and chat["max_completion_tokens"] == 5
    bare = build_payload("chat", "m", "hi", 5, frozenset())
    assert bare == {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    assert content_of("chat", {"choices": [{"delta": {"content": "x"}}]}) == "x"
    assert content_of("chat", {"choices": [{"delta": {"role": "assistant"}}]}) == ""
    assert content_of("completions", {"choices": [{"text": "y"}]}) == "y"
    assert usage_tokens({"choices": [], "usage": {"completion_tokens": 4}}) == 4 and usage_tokens({}) is None


def test_prompts_synthetic_exact_with_a_tokenizer_and_sampled_from_files(tmp_path):
    from workloads.client.prompts import count_tokens, load_tokenizer

    make_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    exact = Prompts(7, tok)
    for rid, n in ((0, 5), (1, 17), (2, 1)):
        text, got = exact.get(rid, n)
        assert got == n == count_tokens(tok, text)
        assert exact.get(rid, n) == (text, got)  # seeded by (seed, rid)
    words, n = Prompts(7).get(3, 9)
    assert n == 9 and len(words.split()) == 9 and Prompts(7).get(3, 9)[0] == words != Prompts(8).get(3, 9)[0]
    share = tmp_path / "share.json"
    share.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"q{i} a b"},
                                                    {"from": "gpt", "value": "answer"}]} for i in range(5)]))
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "one two"}\n\n{"text": "three"}\n')
    assert read_prompts(str(share)) == [f"q{i} a b" for i in range(5)]
    assert read_prompts(str(jsonl)) == ["one two", "three"]
    p = Prompts(1, file=str(share))
    assert p.get(4, 100) == p.get(4, 3) and p.get(4, 100)[1] == 3 and p.source() == "file"
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_prompts(str(tmp_path / "bad.jsonl"))


def test_serving_summary_counts_failures_by_reason():
    def rec(rid: int, status: str, error: str | None = None) -> dict:
        done = status == "finished"
        return {"rid": rid, "finished": done, "status": status, "error": error, "arrival_s": 0.0,
                "finish_s": 1.0 if status != "unfinished" else None, "token_s": [0.5, 1.0] if done else [],
                "ttft_ms": 500.0 if done else None, "tpot_ms": 500.0 if done else None,
                "e2e_ms": 1000.0 if done else None, "output_tokens": 2 if done else 0, "prompt_len": 3}

    s = serving_summary([rec(0, "finished"), rec(1, "failed", "HTTP 500: boom"), rec(2, "failed", "timeout: 1 s"),
                         rec(3, "failed", "HTTP 500: x"), rec(4, "unfinished")], 2.0, 2000, 1000)
    assert s["requests"] == {"total": 5, "finished": 1, "unfinished": 1, "unfinished_started": 0, "good": 1}
    assert s["failures"] == {"total": 3, "by_reason": {"HTTP 500": 2, "timeout": 1}}


@pytest.mark.parametrize(("args", "words"), [
    (["--endpoint", "http://127.0.0.1:8000/v1", "--model", "m", "--dtype", "bf16"], "--dtype applies to btune's"),
    (["--endpoint", "http://127.0.0.1:8000/v1", "--model", "m", "--tp", "2"], "--tp applies to btune's engine"),
    (["--endpoint", "127.0.0.1:8000", "--model", "m"], "not an http(s) URL"),
    (["--endpoint", "http://127.0.0.1:99999/v1", "--model", "m"], "not an http(s) URL"),
    (["--endpoint", "http://127.0.0.1:8000/v1"], "needs --model"),
    (["--model", "m"], "--model applies to --endpoint"),
    (["--endpoint", "http://h/v1", "--model", "m", "--api-key-env", "BTUNE_SURELY_UNSET_VAR"], "is not set"),
])
def test_endpoint_refusals_before_launch(capsys, args, words):
    line = refused(capsys, ["run", "serve", *args])
    assert words in line, line


if __name__ == "__main__":
    serve(int(sys.argv[1]))
