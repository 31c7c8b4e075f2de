"""``python -m workloads.api_server [options]``: build the model and its engine, warm it up, then serve the
OpenAI-compatible API on --host:--port until SIGINT or SIGTERM (exit 0). Prints one line when ready:
``btune serve-api: listening on http://HOST:PORT/v1 (model NAME)``. A bad option or a model that cannot be built:
one line on stderr, exit 2."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from workloads.api_server.spec import API_SERVER, cache_len, served_name, server_checks
from workloads.options import run_main

PREFIX = "btune serve-api"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(opts: dict[str, Any]) -> int:
    problems = server_checks(opts)
    if problems:
        print(f"error: {problems[0][1]}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM during start-up ends it as Ctrl+C does: quietly, exit 0
    try:
        return _start(opts)
    except KeyboardInterrupt:
        return 0


def _start(opts: dict[str, Any]) -> int:
    import torch

    from workloads.api_server.text import codec_for
    from workloads.api_server.worker import EngineThread, build_engine
    from workloads.harness import SETUP_ERRORS, resolve_device, resolve_dtype

    try:
        device = resolve_device(opts["device"])
        dtype = resolve_dtype(opts["dtype"], device)
        engine = build_engine(opts, device, dtype)
        # compiled: compile and capture every decode bucket before listening
        engine.warmup(3 if opts["compile_mode"] != "none" else 1)
        codec = codec_for(opts["checkpoint"], engine.model.cfg.vocab_size)
    except torch.OutOfMemoryError as exc:
        print(f"error: out of memory building the engine: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 3
    except (*SETUP_ERRORS, OSError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    n = cache_len(opts)
    worker = EngineThread(engine, opts["max_batch"], opts["max_prefill_tokens"], n)
    worker.start()
    try:
        return asyncio.run(_serve(opts, worker, codec, n, engine.model.cfg.vocab_size))
    finally:
        worker.stop()


async def _serve(opts: dict[str, Any], worker: Any, codec: Any, n: int, vocab: int) -> int:
    from aiohttp import web

    from workloads.api_server.http import Api

    name = served_name(opts)
    runner = web.AppRunner(Api(worker, codec, name, n, vocab).app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, opts["host"], opts["port"], shutdown_timeout=5.0)
        try:
            await site.start()
        except OSError as exc:
            print(f"error: cannot listen on {opts['host']}:{opts['port']}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        host, port = runner.addresses[0][:2]
        host = f"[{host}]" if ":" in host else host
        print(f"{PREFIX}: listening on http://{host}:{port}/v1 (model {name})", flush=True)
        await stop.wait()
        await loop.run_in_executor(None, worker.stop)  # in-flight requests end with an error event
        return 0
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    return run_main(API_SERVER, argv, run)


if __name__ == "__main__":
    sys.exit(main())
