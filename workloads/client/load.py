"""The load against an endpoint: the engine's load generator, sent over HTTP with streaming, in its own thread
and asyncio loop (the caller's thread keeps signals and nothing it does delays an arrival).

Every request ends as one ``request`` record (``workloads.engine.request.timeline`` plus ``status`` and
``error``): finished ([DONE] received), failed (connection refused, timeout, HTTP 4xx/5xx with the first 200
characters of the body, a stream cut mid-way, malformed SSE, an empty answer) or unfinished (still running when
the drain ended). TTFT is the first chunk with content; every content chunk's arrival is in ``token_s``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from workloads.client.payload import OPTIONAL, REFUSED, build_payload, content_of, url_for, usage_tokens
from workloads.client.prompts import Prompts, count_tokens
from workloads.client.sse import SSEError, SSEParser
from workloads.engine.loadgen import LoadGenerator, RequestSpec
from workloads.engine.request import timeline


@dataclass(frozen=True)
class Endpoint:
    """Where and how to send: base URL, model, API (chat|completions), per-request timeout, the API key's value
    (never recorded) and the optional fields dropped after the probe."""

    url: str
    model: str
    api: str = "completions"
    timeout: float = 600.0
    api_key: str | None = field(default=None, repr=False)
    dropped: tuple[str, ...] = ()

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(f for f in OPTIONAL[self.api] if f not in self.dropped)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class LoadResult:
    """How the load ended: its end (s since it began), why sending stopped, whether any request reached the
    server, the first failure's error, and how output tokens were counted."""

    end: float = 0.0
    stopped: str = "done"  # done | duration | interrupted
    connected: bool = False
    first_error: str | None = None
    token_count: set[str] = field(default_factory=set)


class _Failed(Exception):
    """A request that failed; the message is its ``error`` ("reason: detail")."""


def _session(ep: Endpoint) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(headers=ep.headers(), connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=None))


def _connect_error(exc: aiohttp.ClientConnectorError) -> str:
    if isinstance(exc.os_error, ConnectionRefusedError):
        return "connection refused"
    return f"connection failed: {str(exc.os_error or exc)[:200]}"


#: Seconds the probe waits for a one-token answer's body once its status came (a stalled stream is the load's
#: requests' to report, under --request-timeout).
PROBE_BODY_S = 5.0


async def _probe_one(session: aiohttp.ClientSession, ep: Endpoint, fields: frozenset[str]) -> tuple[int | None, bool]:
    """The HTTP status of a one-token request with ``fields`` (None when it could not be sent), and whether its
    stream carried a ``usage`` token count."""
    body = build_payload(ep.api, ep.model, "Hello", 1, fields)
    raw = b""
    try:
        async with asyncio.timeout(ep.timeout):
            async with session.post(url_for(ep.url, ep.api), json=body) as resp:
                try:  # the status decides; a stream that stalls after it only costs PROBE_BODY_S
                    async with asyncio.timeout(min(ep.timeout, PROBE_BODY_S)):
                        raw = await resp.read()
                except TimeoutError:
                    pass
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None, False
    usage = False
    if resp.status < 400:
        parser = SSEParser()
        try:
            for data in [*parser.feed(raw), *parser.close()]:
                obj = json.loads(data) if data.strip() != "[DONE]" else None
                usage = usage or (isinstance(obj, dict) and usage_tokens(obj) is not None)
        except (SSEError, json.JSONDecodeError):
            pass  # the load's requests will say so
    return resp.status, usage


async def probe(ep: Endpoint) -> tuple[tuple[str, ...], bool]:
    """The optional fields the server refuses (400/422): one request with all of them, and only when that is
    refused, one request per field; and whether the server reported usage."""
    async with _session(ep) as session:
        status, usage = await _probe_one(session, ep, frozenset(OPTIONAL[ep.api]))
        if status not in REFUSED:
            return (), usage
        dropped: tuple[str, ...] = ()
        for f in OPTIONAL[ep.api]:
            if (await _probe_one(session, ep, frozenset({f})))[0] in REFUSED:
                dropped += (f,)
        if "stream_options" not in dropped:
            _, usage = await _probe_one(session, ep, frozenset(OPTIONAL[ep.api]) - set(dropped))
        return dropped, usage


class EndpointLoad:
    """One load: ``run()`` sends ``gen``'s requests and calls ``on_request(record)`` once per request (from the
    load's thread)."""

    def __init__(self, ep: Endpoint, gen: LoadGenerator, prompts: Prompts, on_request: Callable[[dict], None],
                 drain_timeout: float = 0.0, tokenizer: Any = None,
                 on_draining: Callable[[], None] = lambda: None) -> None:
        self.ep, self.gen, self.prompts, self.on_request = ep, gen, prompts, on_request
        self.drain_timeout, self.tokenizer, self.on_draining = drain_timeout, tokenizer, on_draining
        self.stop = threading.Event()  # set by the caller (Ctrl+C): stop sending
        self.abort = threading.Event()  # set by the caller (a second Ctrl+C): end the drain
        self.result = LoadResult()
        self._t0 = 0.0

    def run(self) -> LoadResult:
        """The whole load in a thread of its own; waits for it (the caller's signal handlers keep running)."""
        error: list[BaseException] = []

        def body() -> None:
            try:
                asyncio.run(self._main())
            except BaseException as exc:  # handed to the caller's thread
                error.append(exc)

        thread = threading.Thread(target=body, name="btune-endpoint-load", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
        if error:
            raise error[0]
        return self.result

    @property
    def started_at(self) -> float:
        """When the load began (``time.perf_counter()``); a record's times are seconds since then."""
        return self._t0

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    async def _main(self) -> None:
        wake = asyncio.Event()
        tasks: set[asyncio.Task] = set()
        gen, res = self.gen, self.result
        async with _session(self.ep) as session:
            self._t0 = time.perf_counter()
            while True:
                if self.stop.is_set():
                    res.stopped = "interrupted"
                    break
                now = self._now()
                for spec in gen.due(now):
                    tasks.add(asyncio.create_task(self._one(session, spec, wake)))
                if gen.issuing_over(now):
                    if gen.duration and now >= gen.duration:
                        res.stopped = "duration"
                    break
                nxt = gen.next_arrival()
                wait = 0.05 if nxt is None else min(max(nxt - self._now(), 0.0), 0.05)
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), wait)
                except TimeoutError:
                    pass
            pending = {t for t in tasks if not t.done()}
            if pending:
                self.on_draining()
                deadline = self._now() + self.drain_timeout if self.drain_timeout else None
                while pending and not self.abort.is_set():
                    if deadline is not None and self._now() >= deadline:
                        break
                    step = 0.1 if deadline is None else min(0.1, max(deadline - self._now(), 0.0))
                    _, pending = await asyncio.wait(pending, timeout=step)
                for t in pending:
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            res.end = self._now()

    async def _one(self, session: aiohttp.ClientSession, spec: RequestSpec, wake: asyncio.Event) -> None:
        """Send one request and report its record; a closed-loop client's next request follows its end."""
        ep = self.ep
        text, prompt_len = self.prompts.get(spec.rid, spec.prompt_len)
        body = build_payload(ep.api, ep.model, text, spec.output_len, ep.fields)
        times: list[float] = []
        parts: list[str] = []
        usage: list[int] = []
        status, error, finish = "finished", None, None
        try:
            try:
                async with asyncio.timeout(ep.timeout):
                    await self._stream(session, body, times, parts, usage)
            except TimeoutError:
                raise _Failed(f"timeout: no end within {ep.timeout:g} s") from None
            except aiohttp.ClientConnectorError as exc:
                raise _Failed(_connect_error(exc)) from None
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                    ConnectionResetError) as exc:
                raise _Failed(f"stream cut: {str(exc)[:200] or type(exc).__name__}") from None
            except aiohttp.ClientError as exc:
                raise _Failed(f"client error: {str(exc)[:200] or type(exc).__name__}") from None
            finish = self._now()
            if not parts:
                raise _Failed("empty answer: the stream carried no content")
        except _Failed as exc:
            status, error, finish = "failed", str(exc), self._now()
            if self.result.first_error is None:
                self.result.first_error = error
        except asyncio.CancelledError:  # the drain ended
            status, finish = "unfinished", None
        if status == "finished":
            n, how = self._count(usage, parts, times)
            self.result.token_count.add(how)
        else:
            n = len(times)
        rec = timeline(spec.rid, spec.arrival, times, finish, prompt_len, spec.output_len, client=spec.client,
                       output_tokens=n)
        rec.update(finished=status == "finished", status=status, **({"error": error} if error else {}))
        self.on_request(rec)
        if status != "unfinished":
            self.gen.on_finish(spec, self._now())
            wake.set()

    async def _stream(self, session: aiohttp.ClientSession, body: dict[str, Any], times: list[float],
                      parts: list[str], usage: list[int]) -> None:
        """POST ``body`` and read its SSE stream to [DONE] (or to its end after a chunk with a finish_reason, as
        transformers serve ends its streams), noting each content chunk's time and text."""
        api = self.ep.api
        async with session.post(url_for(self.ep.url, api), json=body) as resp:
            self.result.connected = True
            if resp.status >= 400:
                detail = (await resp.text(errors="replace"))[:200].replace("\n", " ")
                raise _Failed(f"HTTP {resp.status}: {detail}")
            parser = SSEParser()
            ended = False  # a choice said why it stopped (finish_reason)
            async for chunk in resp.content.iter_any():
                t = self._now()
                try:
                    events = parser.feed(chunk)
                except SSEError as exc:
                    raise _Failed(f"malformed SSE: {exc}") from None
                for data in events:
                    if data.strip() == "[DONE]":
                        return
                    try:
                        obj = json.loads(data)
                    except json.JSONDecodeError:
                        raise _Failed(f"malformed SSE: data is not JSON: {data[:80]!r}") from None
                    if not isinstance(obj, dict):
                        raise _Failed(f"malformed SSE: data is not a JSON object: {data[:80]!r}")
                    if obj.get("error"):
                        raise _Failed(f"server error: {json.dumps(obj['error'])[:200]}")
                    n = usage_tokens(obj)
                    if n is not None:
                        usage.append(n)
                    text = content_of(api, obj)
                    if text:
                        times.append(t)
                        parts.append(text)
                    choices = obj.get("choices")
                    if isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason")
                                                         for c in choices):
                        ended = True
            if not ended:
                raise _Failed("stream cut: the stream ended before [DONE]")

    def _count(self, usage: list[int], parts: list[str], times: list[float]) -> tuple[int, str]:
        """Output tokens, and how they were counted: the server's usage, the tokenizer, or content chunks."""
        if usage:
            return usage[-1], "usage"
        if self.tokenizer is not None:
            return count_tokens(self.tokenizer, "".join(parts)), "tokenizer"
        return len(times), "chunks"
