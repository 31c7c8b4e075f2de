"""serve --endpoint: btune's serving load sent over HTTP to a server speaking the OpenAI API.

The plan (the load, the SLOs and the server; no model), the run (probe the optional request fields, send the load,
one ``request`` event per request, the summary) and the loads one after another when the run is segmented (a
``--request-rate`` sweep, ``--find-max-rate``'s probes). Reached through ``workloads.serve`` (``--endpoint URL``);
the requests go through ``workloads.client``. Torch is never imported.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from dataclasses import replace
from typing import Any

from workloads.slo import GOOD_FRACTION
from workloads.specs.serve import lengths, load_checks, request_rates, resolved


def endpoint_plan(opts: dict[str, Any]) -> dict[str, Any]:
    """--endpoint's plan: the load (closed loop without --concurrency: the preset's --max-batch clients), the
    SLOs and the server; no model (the server's is unknown here). Torch-free."""
    prompt, output = lengths(opts)
    rates = request_rates(opts)
    search = bool(opts.get("find_max_rate"))
    rate = rates[0] if rates else 1.0 if search else None
    num = opts["num_requests"] or (0 if opts["duration"] else resolved(opts, "num_requests"))
    load = {"mode": "open" if rate is not None else "closed", "request_rate": rate,
            "burstiness": opts["burstiness"] if rate is not None else None,
            "concurrency": None if rate is not None else (opts["concurrency"] or resolved(opts, "max_batch")),
            "num_requests": num, "duration_s": opts["duration"], "drain_timeout_s": opts["drain_timeout"],
            "prompt_len": str(prompt), "output_len": str(output), "seed": opts["seed"]}
    if len(rates) > 1:  # a sweep: one load (segment) per rate, in order
        load["request_rates"] = rates
    if search:  # --find-max-rate: the rates are found as it goes
        load["find_max_rate"] = {"start": rate, "max_steps": opts["max_rate_steps"], "good_fraction": GOOD_FRACTION}
    return {"endpoint": {"url": opts["endpoint"], "model": opts["model"], "api": opts["api"]}, "load": load,
            "slo": {"ttft_ms": opts["slo_ttft_ms"], "tpot_ms": opts["slo_tpot_ms"]}, "dtype": None,
            "prompts": opts["prompts"] or "synthetic", "request_timeout_s": opts["request_timeout"]}


def run_endpoint(opts: dict[str, Any]) -> int:
    """The load against ``--endpoint``: probe the optional fields, send the load, one ``request`` event per
    request, the summary. Exit 1 when no request reached the server (an error event names why), 130 when
    interrupted, 2 on a bad option or file. Torch is never imported."""
    import asyncio

    from workloads.client.load import Endpoint, EndpointLoad, probe
    from workloads.client.prompts import Prompts, load_tokenizer
    from workloads.client.rates import RateSearch
    from workloads.engine.loadgen import from_load
    from workloads.protocol import Emitter

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # as Harness: the console's cancel is a SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)
    em = Emitter()

    def failed(message: str, code: int, kind: str) -> int:
        em.error(message, kind=kind)
        print(f"error: {message}", file=sys.stderr)
        em.close()
        return code

    problems = load_checks(opts)
    if problems:
        return failed(problems[0][1], 2, "config")
    em.phase("building", "prompts")
    try:
        p = endpoint_plan(opts)
        tokenizer = load_tokenizer(opts["tokenizer"]) if opts["tokenizer"] else None
        prompts = Prompts(opts["seed"], tokenizer, opts["prompts"])
        from_load(p["load"])  # the load's shape, checked before anything is sent
        search = RateSearch(p["load"]["request_rate"], opts["max_rate_steps"]) if opts["find_max_rate"] else None
    except ValueError as exc:
        return failed(str(exc), 2, "config")
    key = os.environ.get(opts["api_key_env"]) if opts["api_key_env"] else None
    ep = Endpoint(opts["endpoint"], opts["model"], opts["api"], opts["request_timeout"], key)
    em.phase("probing", "optional request fields")
    dropped, usage = asyncio.run(probe(ep))
    ep = replace(ep, dropped=dropped)
    block = {**p["endpoint"], "dropped": list(dropped),
             "token_count": "usage" if usage else "tokenizer" if tokenizer is not None else "chunks",
             "prompt_lengths": "exact (tokenizer)" if prompts.exact else "approximate (one word per token)",
             "prompts": prompts.source()}
    em.meta(workload="serve", options=opts, plan=p, device="endpoint", device_name=opts["endpoint"], n_devices=1,
            precision=None, flops_per_token=None, replicas=1, tp=1, endpoint=block)
    res = endpoint_loads(em, p, search, lambda gen, on_request: EndpointLoad(
        ep, gen, prompts, on_request, opts["drain_timeout"], tokenizer, on_draining=lambda: em.phase("draining")))
    interrupted = res.stopped == "interrupted"
    counted = sorted(res.token_count)
    extra = {"search": {"probes": [{"rate": r, "passed": ok} for r, ok in search.probes], "max_rate": search.best}
             } if search is not None else {}
    em.summary(load_duration_s=res.end, slo=p["slo"], interrupted=interrupted, **extra,
               endpoint={**block, "token_count": counted[0] if len(counted) == 1 else counted or block["token_count"],
                         "stopped": res.stopped, "reached": res.connected})
    if not res.connected:
        why = (res.first_error or "no request was sent").split(":", 1)[0]
        return failed(f"{opts['endpoint']}: {why} (no request reached the server)", 1, "error")
    em.close()
    return 130 if interrupted else 0


def endpoint_loads(em: Any, p: dict[str, Any], search: Any, make_load: Any) -> Any:
    """The load, or one load per segment (a --request-rate sweep, --find-max-rate's probes) one after another.

    ``make_load(gen, on_request)`` builds a segment's load around its generator and its request hook (the load
    calls the hook once per request, from inside its ``run()``). A segment's request events carry ``segment``, its
    offered ``rate`` (null: all at once) and, when searching, ``search``; their times are seconds since the first
    segment began and their ids follow on. A probe passes by ``workloads.slo.passes`` (the console's goodput
    predicate). The first Ctrl+C stops sending (no further segment), a second ends the drain. Returns the loads'
    results merged (``end``: since the first began)."""
    from workloads.client.load import LoadResult
    from workloads.client.rates import rate_text
    from workloads.engine.loadgen import from_load
    from workloads.slo import passes

    load, slo = p["load"], p["slo"]
    sweep = load.get("request_rates")
    segmented = search is not None or sweep is not None
    rates: Any = iter(search.next, None) if search is not None else iter(sweep or [load["request_rate"]])
    total = search.steps if search is not None else len(sweep or [0])
    out = LoadResult()
    origin: list[float] = []  # the first segment's start (perf_counter)
    current: Any = None
    first_rid = 0

    def interrupt(*_: Any) -> None:
        (current.abort if current.stop.is_set() else current.stop).set()

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        for k, rate in enumerate(rates):
            records: list[dict[str, Any]] = []
            this: list[Any] = []  # the segment's load, set as soon as it is built (before it runs)

            def on_request(rec: dict[str, Any], k: int = k, rate: Any = rate, first_rid: int = first_rid,
                           records: list[dict[str, Any]] = records, this: list[Any] = this) -> None:
                started_at = this[0].started_at
                if not origin:  # the first load's start is the run's clock origin
                    origin.append(started_at)
                if segmented:
                    dt = started_at - origin[0]
                    rec.update(rid=rec["rid"] + first_rid, segment=k, rate=rate if math.isfinite(rate) else None,
                               arrival_s=rec["arrival_s"] + dt, token_s=[t + dt for t in rec["token_s"]],
                               **{f: rec[f] + dt for f in ("first_token_s", "finish_s") if rec.get(f) is not None})
                    if search is not None:
                        rec["search"] = True
                records.append(rec)
                em.emit("request", **rec)

            current = make_load(from_load({**load, "request_rate": rate} if segmented else load), on_request)
            this.append(current)
            if segmented:
                em.phase("measuring", f"rate {rate_text(rate)}/s", k + 1, total)
            else:
                em.phase("measuring")
            res = current.run()
            if not origin:
                origin.append(current.started_at)
            first_rid = max((r["rid"] + 1 for r in records), default=first_rid)
            out.end = current.started_at - origin[0] + res.end
            out.connected = out.connected or res.connected
            out.first_error = out.first_error or res.first_error
            out.token_count |= res.token_count
            out.stopped = res.stopped
            if search is not None:
                search.report(rate, passes(records, slo["ttft_ms"], slo["tpot_ms"]))
            if res.stopped == "interrupted" or not res.connected:
                break
    finally:
        signal.signal(signal.SIGINT, previous)
    return out
