"""btune serve-api: the serving engine behind an OpenAI-compatible API, driven over real HTTP with aiohttp.

One server per module on a preset (random weights: the word code, `` t<id>`` per token), checked against greedy
decoding by full recompute of the same seeded model; one on tests/data/tiny_model, whose text goes through its
tokenizer.json."""

from __future__ import annotations

import asyncio
import json
import queue
import re
import signal
import socket
import threading
from typing import Any

import pytest
from support import ROOT, refused, start_btune, wait_until

TINY_MODEL = ROOT / "tests" / "data" / "tiny_model"
READY = re.compile(r"btune serve-api: listening on http://127\.0\.0\.1:(\d+)/v1 \(model (\S+)\)")


# -- quick: what needs no server ---------------------------------------------------------------------------
def test_bad_options_are_refused_in_one_line(capsys):
    assert "--port" in refused(capsys, ["serve-api", "--port", "x"])
    assert "--bogus" in refused(capsys, ["serve-api", "--bogus"])
    assert "context of 256" in refused(capsys, ["serve-api", "--max-seq-len", "1000"])
    assert "--checkpoint" in refused(capsys, ["serve-api", "--checkpoint", str(TINY_MODEL / "missing")])


def test_word_code_and_incremental_decoding():
    from tokenizers import Tokenizer

    from workloads.api_server.text import TokenizerCodec, WordCodec

    code = WordCodec(512)
    ids = code.encode("t5 hello t511 t512 hello")
    assert ids[0] == 5 and ids[2] == 511 and ids[1] == ids[4] and ids[3] != 512 and all(0 <= i < 512 for i in ids)
    assert "".join(code.decoder().push(t) for t in (3, 4)) == " t3 t4"
    codec = TokenizerCodec(TINY_MODEL / "tokenizer.json")
    text = "Once upon a time, héllo wörld 日本 🙂"
    ids = codec.encode(text)
    decoder = codec.decoder()
    pieces = [decoder.push(t, k == len(ids) - 1) for k, t in enumerate(ids)]
    assert "".join(pieces) == Tokenizer.from_file(str(TINY_MODEL / "tokenizer.json")).decode(ids)
    assert "" in pieces, "a token ending inside a character waits for the rest of it"


# -- the servers --------------------------------------------------------------------------------------------
class Server:
    """``btune serve-api ARGS`` running, its stdout lines collected by a thread, its port read from the ready line."""

    def __init__(self, *args: str) -> None:
        self.proc = start_btune("serve-api", "--port", "0", *args)
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

        def ready() -> re.Match | None:
            while not self.lines.empty():
                line = self.lines.get()
                self.out.append(line)
                if m := READY.fullmatch(line.strip()):
                    return m
            assert self.proc.poll() is None, f"the server ended: {self.out} {self.proc.stderr.read()}"
            return None

        m = wait_until(ready, 240, "the server's ready line")
        self.port, self.name = int(m.group(1)), m.group(2)
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str]:
        """Send ``sig``; the exit status and stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=60)
        return rc, self.proc.stderr.read()


@pytest.fixture(scope="module")
def server():
    s = Server("--preset", "tiny", "--seed", "3")
    yield s
    rc, err = s.stop(signal.SIGTERM)
    assert rc == 0 and "Traceback" not in err, err


def call(coro_fn: Any, *args: Any) -> Any:
    """``coro_fn(session, *args)`` with a fresh aiohttp client session."""
    import aiohttp

    async def main() -> Any:
        async with aiohttp.ClientSession() as session:
            return await coro_fn(session, *args)

    return asyncio.run(main())


async def stream(session: Any, url: str, body: dict) -> list[Any]:
    """The decoded ``data:`` events of a streamed request (``[DONE]`` as the string)."""
    async with session.post(url, json={**body, "stream": True}) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        events = []
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
        return events


async def post(session: Any, url: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json()


async def get(session: Any, url: str) -> Any:
    async with session.get(url) as resp:
        assert resp.status == 200
        return await resp.json()


def greedy(prompts: list[list[int]], n: int, seed: int = 3) -> list[list[int]]:
    """The reference: the tiny preset seeded as the server seeds it, every token by a full recompute."""
    import torch
    from test_serve_engine import greedy_by_recompute

    from workloads.models.attention import AttentionKernel
    from workloads.models.config import PRESETS
    from workloads.models.transformer import Transformer

    torch.manual_seed(seed)
    model = Transformer(PRESETS["tiny"], AttentionKernel("auto")).eval()
    return [greedy_by_recompute(model, torch.tensor(p), n) for p in prompts]


def word_ids(text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]


@pytest.mark.slow
def test_models_and_a_streamed_completion_are_greedy_tokens(server):
    models = call(get, f"{server.url}/v1/models")
    assert [m["id"] for m in models["data"]] == ["tiny"] == [server.name]
    events = call(stream, f"{server.url}/v1/completions",
                  {"model": "tiny", "prompt": "t5 t17 t300 t42", "max_tokens": 12, "temperature": 0.7,
                   "min_tokens": 12, "ignore_eos": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    content = [e for e in events[:-1] if e["choices"]]
    assert len(content) == 12 and all(e["object"] == "text_completion" for e in content)
    assert [e["choices"][0]["finish_reason"] for e in content] == [None] * 11 + ["length"]
    assert events[-2]["usage"] == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}
    tokens = [i for e in content for i in word_ids(e["choices"][0]["text"])]
    assert tokens == greedy([[5, 17, 300, 42]], 12)[0]


@pytest.mark.slow
def test_eight_concurrent_streams_all_complete_with_their_greedy_tokens(server):
    prompts = [[7 + k, 100 + 3 * k] * (1 + k) for k in range(8)]

    async def many(session: Any) -> list[list[Any]]:
        return await asyncio.gather(*(stream(session, f"{server.url}/v1/completions",
                                             {"prompt": prompts[k], "max_tokens": 6 + k}) for k in range(8)))

    results = call(many)
    want = greedy(prompts, 13)
    for k, events in enumerate(results):
        assert events[-1] == "[DONE]" and len(events) == 6 + k + 1, k
        assert [i for e in events[:-1] for i in word_ids(e["choices"][0]["text"])] == want[k][:6 + k], k


@pytest.mark.slow
def test_chat_completions_whole_and_streamed(server):
    body = {"model": "tiny", "messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": [{"type": "text", "text": "hello there"}]}]}
    status, whole = call(post, f"{server.url}/v1/chat/completions", {**body, "max_completion_tokens": 5})
    assert status == 200 and whole["object"] == "chat.completion"
    message = whole["choices"][0]["message"]
    assert message["role"] == "assistant" and len(word_ids(message["content"])) == 5
    assert whole["usage"]["completion_tokens"] == 5 and whole["choices"][0]["finish_reason"] == "length"
    events = call(stream, f"{server.url}/v1/chat/completions", {**body, "max_tokens": 5})
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[-1] == "[DONE]"
    streamed = "".join(e["choices"][0]["delta"]["content"] for e in events[1:-1])
    assert streamed == message["content"], "greedy: the same tokens whole or streamed"


@pytest.mark.slow
def test_bad_requests_get_400_with_an_error_body_and_the_server_keeps_serving(server):
    url = f"{server.url}/v1/completions"
    bad = [b"{not json", {"model": "gpt-4", "prompt": "t1"}, {"prompt": "t1", "max_tokens": 240},
           {"prompt": "t1", "n": 2}, {"prompt": ["t1", "t2"]}, {"prompt": ""}, {"prompt": "t1", "max_tokens": 0},
           {"prompt": "t1", "stop": ["x"]}, [1, 2]]
    for body in bad:
        status, err = call(post, url, body)
        assert status == 400 and err["error"]["message"] and err["error"]["type"] == "invalid_request_error", body
    status, err = call(post, f"{server.url}/v1/chat/completions", {"messages": []})
    assert status == 400 and err["error"]["param"] == "messages"
    status, ok = call(post, url, {"prompt": "t1 t2", "max_tokens": 3})
    assert status == 200 and len(word_ids(ok["choices"][0]["text"])) == 3


@pytest.mark.slow
def test_a_client_that_goes_away_frees_its_slot(server):
    before = call(get, f"{server.url}/health")["cancelled"]

    async def leave(session: Any) -> int:
        async with session.post(f"{server.url}/v1/completions",
                                json={"prompt": "t9", "max_tokens": 230, "stream": True}) as resp:
            got = 0
            async for raw in resp.content:
                got += raw.startswith(b"data: ")
                if got == 2:
                    break  # leaving the block closes the connection mid-stream
            return got

    assert call(leave) == 2
    health = wait_until(lambda: (h := call(get, f"{server.url}/health"))["cancelled"] > before and h, 60,
                        "the request cancelled")
    assert health["running"] == 0 and health["waiting"] == 0


@pytest.mark.slow
def test_it_listens_on_loopback_only(server):
    import psutil

    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(server.proc.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN}
    assert listening == {("127.0.0.1", server.port)}
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.2", server.port))


@pytest.mark.slow
def test_a_checkpoint_serves_text_through_its_tokenizer_and_sigint_ends_it():
    import torch
    from test_serve_engine import greedy_by_recompute
    from tokenizers import Tokenizer

    from workloads import checkpoint as ck

    s = Server("--checkpoint", str(TINY_MODEL), "--max-seq-len", "112")
    try:
        assert s.name == "tiny_model" and call(get, f"{s.url}/v1/models")["data"][0]["id"] == "tiny_model"
        prompt = "Once upon a time there was a"
        status, whole = call(post, f"{s.url}/v1/completions", {"prompt": prompt, "max_tokens": 24})
        events = call(stream, f"{s.url}/v1/completions", {"prompt": prompt, "max_tokens": 24})
    finally:
        rc, err = s.stop(signal.SIGINT)
    assert rc == 0 and "Traceback" not in err, err
    tok = Tokenizer.from_file(str(TINY_MODEL / "tokenizer.json"))
    ids = tok.encode(prompt).ids
    model = ck.load(str(TINY_MODEL), "cpu", torch.float32)[0]
    want = tok.decode(greedy_by_recompute(model, torch.tensor(ids), 24))
    assert status == 200 and whole["choices"][0]["text"] == want and whole["usage"]["prompt_tokens"] == len(ids)
    assert len(events) == 25 and "".join(e["choices"][0]["text"] for e in events[:-1]) == want
    assert want.strip(), "the trained model writes text"
