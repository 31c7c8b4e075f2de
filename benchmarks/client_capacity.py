"""The endpoint load-test client's own capacity (issue 20): scheduled arrivals against actual send times, and CPU
per streamed token, against a minimal local streaming server.

The server (aiohttp, 127.0.0.1, its own process pinned to the last CPU) answers every ``/v1/completions`` at once
with ``--chunks`` SSE content chunks, a usage chunk and ``[DONE]``. Each client run is a fresh process pinned to
CPU 0 sending ``rate * --seconds`` requests (at most ``--max-requests``) at Poisson arrivals (the engine's seeded
``arrival_times``):

* ``btune``: the real client, ``workloads.client.load.EndpointLoad`` with ``OpenLoop`` (what ``btune run serve
  --endpoint URL --request-rate R`` builds, without the probe and the event stream). load.py is not changed: the
  send time comes from an aiohttp ``TraceConfig`` added to the session load.py builds (``_session`` wrapped here)
  and the request id from a context variable set in a subclass's ``_one``.
* ``aiohttp (minimal)`` and ``httpx (minimal)``: the same loop written twice, once per library: sleep until the
  next arrival, start a task that POSTs btune's payload and parses the stream with btune's SSE parser and
  ``json.loads``. The send time is aiohttp's ``on_request_chunk_sent`` and httpcore's
  ``http11.send_request_body.complete`` trace.

Lag = (the moment the request's body was written to the socket) - (its scheduled arrival), both on the load's
clock. CPU = the client process's user + system seconds (``resource.getrusage``) over the load, divided by the
content chunks received (one token each).

usage: python benchmarks/client_capacity.py [--rates 100,1000,5000] [--seconds 2] [--clients btune,aiohttp,httpx]
Prints markdown tables; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "bench"
PROMPT_LEN = 32
SEED = 0
#: Requests sent (and not measured) before each measured run, in the same process.
WARMUP = 200


def pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]


# -- the server -----------------------------------------------------------------------------------------------

def serve(cpu: int, chunks: int, port_q: Any) -> None:
    """A minimal OpenAI-compatible streaming server: every request gets ``chunks`` content chunks at once."""
    from aiohttp import web

    pin(cpu)
    def chunk(i: int) -> dict[str, Any]:
        return {"id": "c", "object": "text_completion", "model": MODEL,
                "choices": [{"index": 0, "text": f" tok{i}", "finish_reason": None}]}

    pieces = [f"data: {json.dumps(chunk(i))}\n\n".encode() for i in range(chunks)]
    usage = {"id": "c", "object": "text_completion", "model": MODEL, "choices": [],
             "usage": {"prompt_tokens": PROMPT_LEN, "completion_tokens": chunks, "total_tokens": PROMPT_LEN + chunks}}
    pieces.append(f"data: {json.dumps(usage)}\n\n".encode())
    pieces.append(b"data: [DONE]\n\n")

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for piece in pieces:
            await resp.write(piece)
        await resp.write_eof()
        return resp

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port_q.put(site._server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


# -- the clients ----------------------------------------------------------------------------------------------

def stats(lags: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(lags) * 1e3
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def run_btune(url: str, rate: float, n: int, chunks: int) -> dict[str, Any]:
    """The real client: EndpointLoad + OpenLoop, as ``btune run serve --endpoint`` builds them."""
    import aiohttp

    from workloads.client import load as load_mod
    from workloads.client.load import Endpoint, EndpointLoad
    from workloads.client.prompts import Prompts
    from workloads.engine.loadgen import LengthDist, OpenLoop

    rid_var: contextvars.ContextVar[int] = contextvars.ContextVar("rid", default=-1)
    sent: dict[int, float] = {}

    async def on_chunk_sent(session: Any, ctx: Any, params: Any) -> None:
        sent[rid_var.get()] = time.perf_counter()

    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(on_chunk_sent)
    plain = load_mod._session

    def traced(ep: Endpoint) -> aiohttp.ClientSession:
        s = plain(ep)
        s._trace_configs = [trace]  # the same session, with the send-time trace
        trace.freeze()
        return s

    class Timed(EndpointLoad):
        async def _one(self, session: Any, spec: Any, wake: asyncio.Event) -> None:
            rid_var.set(spec.rid)
            await super()._one(session, spec, wake)

    recs: list[dict] = []
    ep = Endpoint(url, MODEL, "completions", timeout=60.0)
    gen = OpenLoop(rate, 1.0, LengthDist.parse(f"fixed:{PROMPT_LEN}"), LengthDist.parse(f"fixed:{chunks}"), SEED,
                   num_requests=n)
    load = Timed(ep, gen, Prompts(SEED), recs.append)
    load_mod._session = traced
    try:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        res = load.run()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        load_mod._session = plain
    arrival = {r["rid"]: r["arrival_s"] for r in recs}
    lags = [sent[rid] - load._t0 - arrival[rid] for rid in arrival if rid in sent]
    finished = [r for r in recs if r["status"] == "finished"]
    errors = sorted({r.get("error", "") for r in recs if r["status"] != "finished"})
    return {"lags": lags, "n": len(recs), "finished": len(finished), "errors": errors,
            "tokens": sum(r["output_tokens"] for r in finished), "elapsed": res.end,
            "last_arrival": max(arrival.values()), "cpu": cpu_s(r0, r1)}


def cpu_s(r0: Any, r1: Any) -> float:
    return (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


async def _minimal(lib: str, url: str, rate: float, n: int, chunks: int) -> dict[str, Any]:
    """One loop, two libraries: sleep to each arrival, a task per request, btune's payload and SSE parser."""
    from workloads.client.payload import OPTIONAL, build_payload, content_of
    from workloads.client.prompts import Prompts
    from workloads.client.sse import SSEParser
    from workloads.engine.loadgen import arrival_times

    prompts = Prompts(SEED)
    sent: dict[int, float] = {}
    rid_var: contextvars.ContextVar[int] = contextvars.ContextVar("rid", default=-1)
    target = url.rstrip("/") + "/completions"
    fields = frozenset(OPTIONAL["completions"])
    if lib == "aiohttp":
        import aiohttp

        trace = aiohttp.TraceConfig()

        async def on_chunk_sent(session: Any, ctx: Any, params: Any) -> None:
            sent[rid_var.get()] = time.perf_counter()

        trace.on_request_chunk_sent.append(on_chunk_sent)
        client: Any = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                            timeout=aiohttp.ClientTimeout(total=None), trace_configs=[trace])
    else:
        import httpx

        async def on_trace(name: str, info: dict) -> None:
            if name == "http11.send_request_body.complete":
                sent[rid_var.get()] = time.perf_counter()

        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
                                   timeout=None)

    async def one(rid: int) -> tuple[int, str | None]:
        rid_var.set(rid)
        text, _ = prompts.get(rid, PROMPT_LEN)
        body = build_payload("completions", MODEL, text, chunks, fields)
        parser, tokens = SSEParser(), 0
        try:
            async with asyncio.timeout(60.0):
                if lib == "aiohttp":
                    async with client.post(target, json=body) as resp:
                        async for chunk in resp.content.iter_any():
                            for data in parser.feed(chunk):
                                if data.strip() == "[DONE]":
                                    return tokens, None
                                tokens += bool(content_of("completions", json.loads(data)))
                else:
                    async with client.stream("POST", target, json=body, extensions={"trace": on_trace}) as resp:
                        async for chunk in resp.aiter_raw():
                            for data in parser.feed(chunk):
                                if data.strip() == "[DONE]":
                                    return tokens, None
                                tokens += bool(content_of("completions", json.loads(data)))
            return tokens, "no [DONE]"
        except Exception as exc:  # counted as a failure by its type
            return tokens, type(exc).__name__

    async with client:
        times = arrival_times(rate, 1.0, SEED)
        arrivals = [next(times) for _ in range(n)]
        tasks = []
        t0 = time.perf_counter()
        for rid, at in enumerate(arrivals):
            wait = at - (time.perf_counter() - t0)
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(rid)))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    lags = [sent[rid] - t0 - at for rid, at in enumerate(arrivals) if rid in sent]
    errors = sorted({e for _, e in results if e})
    return {"lags": lags, "n": n, "finished": sum(e is None for _, e in results), "errors": errors,
            "tokens": sum(t for t, e in results if e is None), "elapsed": elapsed, "last_arrival": arrivals[-1]}


def run_minimal(lib: str, url: str, rate: float, n: int, chunks: int) -> dict[str, Any]:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    out = asyncio.run(_minimal(lib, url, rate, n, chunks))
    out["cpu"] = cpu_s(r0, resource.getrusage(resource.RUSAGE_SELF))
    return out


def client_proc(cpu: int, client: str, url: str, rate: float, n: int, chunks: int, q: Any) -> None:
    pin(cpu)
    run = (lambda r, k: run_btune(url, r, k, chunks)) if client == "btune" else \
        (lambda r, k: run_minimal(client, url, r, k, chunks))
    run(min(rate, 500.0), WARMUP)  # imports, first calls, the server's first connections: not measured
    out = run(rate, n)
    lags = out.pop("lags")
    nan = float("nan")
    out.update(stats(lags) if lags else {"p50": nan, "p99": nan, "max": nan}, sent=len(lags))
    q.put(out)


def result(p: Any, q: Any) -> dict[str, Any]:
    """The client process's result; RuntimeError when it died without one."""
    import queue

    while True:
        try:
            r = q.get(timeout=1.0)
            p.join()
            return r
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"the client process ended (exit code {p.exitcode}) without a result") from None


# -- the tables -----------------------------------------------------------------------------------------------

NAMES = {"btune": "btune (EndpointLoad)", "aiohttp": "aiohttp (minimal)", "httpx": "httpx (minimal)"}


def versions() -> str:
    from importlib.metadata import version

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    libs = []
    for name in ("aiohttp", "httpx", "httpcore", "anyio"):
        try:
            libs.append(f"{name} {version(name)}")
        except Exception:  # not installed
            libs.append(f"{name} (not installed)")
    return (f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, {', '.join(libs)}, "
            f"{platform.system()} {platform.release()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="100,1000,5000")
    ap.add_argument("--seconds", type=float, default=2.0, help="requests per run: rate * seconds")
    ap.add_argument("--min-requests", type=int, default=500, help="at least this many requests per run")
    ap.add_argument("--max-requests", type=int, default=10000)
    ap.add_argument("--chunks", type=int, default=4, help="content chunks (tokens) per answer")
    ap.add_argument("--clients", default="btune,aiohttp,httpx")
    ap.add_argument("--repeats", type=int, default=1, help="runs per row (each row printed)")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    clients = [c.strip() for c in args.clients.split(",")]
    avail = cpus()
    client_cpu, server_cpu = avail[0], avail[-1]
    ctx = mp.get_context("spawn")
    port_q = ctx.Queue()
    server = ctx.Process(target=serve, args=(server_cpu, args.chunks, port_q), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port_q.get(timeout=30)}/v1"
    print(f"machine: {versions()}; client on CPU {client_cpu}, server on CPU {server_cpu}; "
          f"{args.chunks} content chunks + usage + [DONE] per answer\n")
    rows: dict[str, list[str]] = {c: [] for c in clients}
    try:
        for rate in rates:
            n = min(max(int(rate * args.seconds), args.min_requests), args.max_requests)
            for client in clients:
                for _ in range(args.repeats):
                    q = ctx.Queue()
                    p = ctx.Process(target=client_proc, args=(client_cpu, client, url, rate, n, args.chunks, q))
                    p.start()
                    r = result(p, q)
                    fails = r["n"] - r["finished"]
                    why = f" ({'; '.join(e[:40] for e in r['errors'])})" if fails else ""
                    per_tok = r["cpu"] / r["tokens"] * 1e6 if r["tokens"] else float("nan")
                    row = (f"| {rate:,.0f} | {n:,} | {r['p50']:.3f} | {r['p99']:.3f} | {r['max']:.2f} | "
                           f"{(r['n'] - 1) / r['last_arrival']:,.0f} | {r['finished'] / r['elapsed']:,.0f} | "
                           f"{fails}{why} | {r['cpu']:.2f} | {r['cpu'] / r['elapsed'] * 100:.0f}% | "
                           f"{per_tok:.1f} |")
                    rows[client].append(row)
                    print(f"{NAMES[client]}: {row}", file=sys.stderr, flush=True)
    finally:
        server.terminate()
    head = ("| offered req/s | requests | lag p50 ms | lag p99 ms | lag max ms | scheduled req/s | achieved req/s | "
            "failures | client CPU s | client CPU busy | CPU µs / token |\n" + "|---" * 11 + "|")
    for client in clients:
        print(f"**{NAMES[client]}**\n\n{head}")
        print("\n".join(rows[client]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
