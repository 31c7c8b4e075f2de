"""The serving load test's declaration and its before-launch checks (torch-free)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from workloads.checkpoint_files import layers_refusal
from workloads.client.rates import MAX_RATE_STEPS, parse_rates
from workloads.engine.loadgen import LengthDist
from workloads.options import Machine, Option, WorkloadSpec
from workloads.specs.dense import (
    DENSE_MODEL_TYPES,
    TRAINING_ONLY,
    TRANSFORMER_KNOBS,
    checkpoint_checks,
    transformer_checks,
)

#: The engine knobs tuned by default (flash is left out: decoding sequences of different lengths needs a mask);
#: FP8 and TP only when --space names them.
SERVE_TUNE = {"attention-backend": ("auto", "efficient", "cudnn", "flex"), "compile-mode": ("none", "default")}

#: The cache rounds positions up to a multiple of this (scratch column, padded prefill chunks, flex blocks): the
#: model's position table must cover ``position_room``.
POSITION_ROOM = 128

#: Per-preset defaults used where --max-batch, --num-requests, --prompt-len, --output-len are left unset.
SERVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"max_batch": 8, "num_requests": 32, "prompt_len": "uniform:4,48", "output_len": "uniform:2,32"},
    "tiny-llama": {"max_batch": 8, "num_requests": 32, "prompt_len": "uniform:4,48", "output_len": "uniform:2,32"},
    "gpt-large": {"max_batch": 32, "num_requests": 256, "prompt_len": "uniform:128,1024",
                  "output_len": "uniform:32,256"},
    "llama-3.1-8b": {"max_batch": 32, "num_requests": 256, "prompt_len": "uniform:128,1024",
                     "output_len": "uniform:32,256"},
    "llama-3.1-70b": {"max_batch": 32, "num_requests": 256, "prompt_len": "uniform:128,1024",
                      "output_len": "uniform:32,256"},
}


def resolved(opts: Mapping[str, Any], key: str) -> Any:
    """An option's value, or the preset's default where it is unset (None, 0 or empty)."""
    value = opts.get(key)
    return value if value not in (None, 0, "") else SERVE_DEFAULTS[str(opts.get("preset") or "tiny")][key]


def lengths(opts: Mapping[str, Any]) -> tuple[LengthDist, LengthDist]:
    """The prompt and output length distributions (ValueError with the reason when malformed)."""
    return LengthDist.parse(resolved(opts, "prompt_len")), LengthDist.parse(resolved(opts, "output_len"))


def request_rates(opts: Mapping[str, Any]) -> list[float]:
    """--request-rate's rates in requests/s, in order (empty: closed loop); ValueError (one line) when malformed."""
    text = opts.get("request_rate")
    return [] if text in (None, "") else parse_rates(str(text))


def cache_len(opts: Mapping[str, Any], prompt: LengthDist, output: LengthDist) -> int:
    """KV-cache positions per sequence: --max-seq-len, or the longest prompt plus the longest output."""
    return int(opts.get("max_seq_len") or prompt.high + output.high)


def position_room(n: int) -> int:
    """Positions the model's position table must cover for a cache of ``n`` positions per sequence."""
    return -(-(n + 16) // POSITION_ROOM) * POSITION_ROOM


def checkpoint_dims(opts: Mapping[str, Any]) -> dict[str, Any] | None:
    """--checkpoint's config.json in btune's terms (``checkpoint_files.dense_dims`` and its model_type), or None
    without one or when it cannot be read (``checkpoint_checks`` says why)."""
    from workloads.checkpoint_files import CheckpointError, dense_dims, read_config

    if not opts.get("checkpoint"):
        return None
    try:
        d = read_config(str(opts["checkpoint"]), DENSE_MODEL_TYPES)
    except CheckpointError:
        return None
    return {**dense_dims(d), "model_type": d["model_type"]}


def preset_values(opts: Mapping[str, Any]) -> dict[str, Any]:
    """What --max-batch, --num-requests (both it and --duration at 0), the length distributions, --max-seq-len
    and --layers left to the preset resolve to."""
    from workloads.models.config import PRESETS

    preset = str(opts.get("preset"))
    out: dict[str, Any] = {k: v for k, v in SERVE_DEFAULTS[preset].items()
                           if k != "num_requests" or not opts.get("duration")}
    out["layers"] = PRESETS[preset].n_layers
    try:
        out["max_seq_len"] = cache_len({**opts, "max_seq_len": 0}, *lengths(opts))
    except ValueError:
        pass
    return out


#: Options of btune's own engine, refused with --endpoint (a server's engine is its own).
ENGINE_ONLY = ("dtype", "fp8-mode", "fp8-recipe", "fp8-head", "attention-backend", "attention-window", "compile-mode",
               "tp", "replicas", "checkpoint", "layers", "max-batch", "max-prefill-tokens", "max-seq-len",
               "memory-profile", "steps")
#: Options that only mean something with --endpoint, and their defaults.
ENDPOINT_ONLY = {"model": "", "api": "completions", "tokenizer": "", "prompts": "", "request-timeout": 600.0,
                 "api-key-env": "", "find-max-rate": False, "max-rate-steps": MAX_RATE_STEPS}


def endpoint_checks(opts: Mapping[str, Any]) -> list[tuple[str, str]]:
    """--endpoint's URL and its companions; the engine's knobs refused with it, its own refused without it."""
    import os
    from pathlib import Path
    from urllib.parse import urlsplit

    url = str(opts.get("endpoint") or "")
    if not url:
        return [(k, f"--{k} applies to --endpoint (a server speaking the OpenAI API); give --endpoint URL")
                for k, default in ENDPOINT_ONLY.items() if opts.get(k.replace("-", "_"), default) != default][:1]
    out: list[tuple[str, str]] = []
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a malformed port raises here
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok:
        out.append(("endpoint", f"--endpoint {url!r}: not an http(s) URL (e.g. http://127.0.0.1:8000/v1)"))
    if not opts.get("model"):
        out.append(("model", "--endpoint needs --model NAME (the model the server serves)"))
    defaults = {o.dest: o.default for o in SERVE_OPTIONS}
    defaults["steps"] = 0
    for name in ENGINE_ONLY:
        dest = name.replace("-", "_")
        if dest in opts and opts[dest] != defaults.get(dest):
            out.append((name, f"--{name} applies to btune's engine, not to a server load-tested with --endpoint"))
    tok = str(opts.get("tokenizer") or "")
    if tok and not (Path(tok) / "tokenizer.json").is_file():
        out.append(("tokenizer", f"--tokenizer {tok}: no tokenizer.json in that directory"))
    prompts = str(opts.get("prompts") or "")
    if prompts and not Path(prompts).is_file():
        out.append(("prompts", f"--prompts {prompts}: no such file"))
    key = str(opts.get("api_key_env") or "")
    if key and key not in os.environ:
        out.append(("api-key-env", f"--api-key-env {key}: that environment variable is not set"))
    return out


def load_checks(opts: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Load and shape options that contradict each other or cannot fit, whatever the machine (with --endpoint:
    the load's options and ``endpoint_checks``; the server's limits are its own)."""
    from workloads.models.config import PRESETS

    out: list[tuple[str, str]] = endpoint_checks(opts)
    conc = opts.get("concurrency")
    rate = opts.get("request_rate") if opts.get("request_rate") not in (None, "") else None
    try:
        rates = request_rates(opts)
    except ValueError as exc:
        out.append(("request-rate", str(exc)))
        rates = []
    if rate is not None and conc is not None:
        out.append(("concurrency", "--request-rate (open loop) and --concurrency (closed loop) contradict each "
                                   "other; give one"))
    if len(rates) > 1 and not opts.get("endpoint"):
        out.append(("request-rate", f"--request-rate {rate}: several rates (a sweep) apply to --endpoint; btune's "
                                    "engine takes one rate"))
    if opts.get("find_max_rate") and opts.get("endpoint"):
        if conc is not None:
            out.append(("find-max-rate", "--find-max-rate searches open-loop request rates: drop --concurrency"))
        elif len(rates) > 1 or (rates and math.isinf(rates[0])):
            out.append(("find-max-rate", f"--find-max-rate starts at one finite --request-rate, not {rate}"))
        if opts.get("duration"):
            out.append(("find-max-rate", "--find-max-rate: each probe is a load of --num-requests; drop --duration"))
    burst = opts.get("burstiness", 1.0)
    if burst is not None and not (burst > 0 and math.isfinite(burst)):
        out.append(("burstiness", f"--burstiness {burst:g}: the gamma shape must be a finite number > 0"))
    elif burst not in (None, 1.0) and rate is None and not opts.get("find_max_rate"):
        out.append(("burstiness", "--burstiness shapes open-loop arrivals: it needs --request-rate"))
    try:
        prompt, output = lengths(opts)
    except ValueError as exc:
        out.append(("prompt-len", str(exc)))
        return out
    if opts.get("endpoint"):
        return out
    n = cache_len(opts, prompt, output)
    dims = checkpoint_dims(opts)
    if prompt.high + output.high > n:
        out.append(("max-seq-len", f"prompt up to {prompt.high} plus output up to {output.high} tokens is longer "
                                   f"than the KV cache (--max-seq-len {n})"))
    elif dims is not None:
        out += _checkpoint_fit(opts, dims, n)
    elif opts.get("checkpoint"):
        pass  # checkpoint_checks say why it cannot be read
    elif (cfg := PRESETS.get(str(opts.get("preset")))) is not None and n > cfg.max_seq_len:
        out.append(("max-seq-len", f"{n} positions per sequence exceed {cfg.name}'s context of {cfg.max_seq_len}"))
    return out


def _checkpoint_fit(opts: Mapping[str, Any], dims: Mapping[str, Any], n: int) -> list[tuple[str, str]]:
    """--layers and the cache's length against the checkpoint (its context; GPT-2's learned position table must
    also cover the cache's rounding, ``position_room``)."""
    out: list[tuple[str, str]] = []
    why = layers_refusal(opts.get("layers"), dims["layers"])
    if why:
        out.append(("layers", why))
    context = dims["context"]
    if n > context:
        out.append(("max-seq-len", f"{n} positions per sequence exceed the checkpoint's context of {context}"))
    elif dims["model_type"] == "gpt2" and position_room(n) > context:
        out.append(("max-seq-len", f"{n} positions per sequence: the serving cache rounds up to "
                                   f"{position_room(n)}, more than GPT-2's {context} learned positions; keep "
                                   f"prompt + output at or under {(context // POSITION_ROOM) * POSITION_ROOM - 16}"))
    return out


def serve_checks(opts: Mapping[str, Any], machine: Machine) -> list[tuple[str, str]]:
    """What the load test cannot run as asked on this machine, with the reason (one line each)."""
    from workloads.models.config import PRESETS

    out = load_checks(opts)
    if opts.get("endpoint"):
        return out
    backend = opts.get("attention_backend", "auto")
    if backend == "flash":
        out.append(("attention-backend", "--attention-backend flash: the flash kernel takes no mask, and decoding "
                                         "sequences of different lengths in one batch needs one; use auto, efficient, "
                                         "cudnn, math or flex"))
    if int(opts.get("tp") or 1) > 1 and opts.get("fp8_head"):
        out.append(("fp8-head", "--fp8-head: the LM head is split over the vocabulary with --tp and stays in the "
                                "compute dtype; drop one of them"))
    found = checkpoint_checks(opts)
    dims = checkpoint_dims(opts)
    if dims is not None:
        divides = {"attention heads": dims["heads"], "KV heads": dims["kv_heads"], "MLP width": dims["d_ff"],
                   "vocabulary": dims["vocab"]}
        divides = {k: v for k, v in divides.items() if v is not None}
    else:
        cfg = PRESETS.get(str(opts.get("preset")))
        divides = None if cfg is None else {"attention heads": cfg.n_heads, "KV heads": cfg.n_kv_heads,
                                            "MLP width": cfg.d_ff, "vocabulary": cfg.vocab_size}
    return out + found + transformer_checks({**opts, "mode": "decode"}, machine, divides)


#: --endpoint and its companions: load-test a server speaking the OpenAI API instead of btune's engine.
ENDPOINT_OPTIONS: tuple[Option, ...] = (
    Option("endpoint", str, "", "load-test a server speaking the OpenAI API at this base URL (e.g. "
           "http://127.0.0.1:8000/v1) instead of btune's engine (empty: the engine)", group="endpoint"),
    Option("model", str, "", "--endpoint: the model name sent in each request (required)", group="endpoint"),
    Option("api", str, "completions", "--endpoint: which API: /completions or /chat/completions",
           ("completions", "chat"), group="endpoint"),
    Option("tokenizer", str, "", "--endpoint: a local directory with tokenizer.json: exact prompt lengths, and "
           "output tokens counted when the server gives no usage", group="endpoint"),
    Option("prompts", str, "", "--endpoint: prompts from a ShareGPT JSON or JSONL ({\"prompt\"|\"text\": ...}) "
           "file, sampled with the seed (empty: synthetic prompts of --prompt-len)", group="endpoint"),
    Option("request-timeout", float, 600.0, "--endpoint: seconds one request may take before it fails", min=0.001,
           group="endpoint"),
    Option("api-key-env", str, "", "--endpoint: the environment variable holding the API key (sent as a Bearer "
           "token; never recorded)", group="endpoint"),
    Option("find-max-rate", bool, False, "--endpoint: search for the highest request rate at which 99% of "
           "requests meet --slo-ttft-ms and --slo-tpot-ms (from --request-rate or 1/s: double until a rate "
           "fails, then bisect), each probe a load of --num-requests", group="endpoint"),
    Option("max-rate-steps", int, MAX_RATE_STEPS, "--find-max-rate: loads in all, doubling and bisecting",
           min=1, max=64, group="endpoint"),
)

SERVE_OPTIONS: tuple[Option, ...] = (
        Option("layers", int, 0, "truncate the preset to N layers (0: all)", min=0, max=1024, group="shape"),
        Option("checkpoint", str, "", "a Hugging Face checkpoint directory (config.json + safetensors: llama, "
               "mistral, qwen2, gpt2) served instead of random weights (--preset then sets only the "
               "load defaults; --layers other than the checkpoint's is refused)", group="shape"),
        Option("max-batch", int, 0, "KV-cache slots: sequences decoded together (0: the preset's)", min=0,
               max=4096, group="shape", tune=(8, 16, 32, 64)),
        Option("max-seq-len", int, 0, "KV-cache positions per sequence (0: longest prompt + longest output)",
               min=0, max=1 << 20, group="shape"),
        Option("max-prefill-tokens", int, 2048, "prompt tokens prefilled per engine step (longer prompts are "
               "chunked over steps)", min=1, max=1 << 20, group="shape", tune=(512, 1024, 2048, 4096)),
        Option("prompt-len", str, "", "prompt lengths: fixed:N, uniform:A,B or normal:MEAN,STD (empty: the "
               "preset's)", group="load"),
        Option("output-len", str, "", "output lengths, same forms (empty: the preset's)", group="load"),
        Option("request-rate", str, None, "open loop: requests/s, gamma-distributed gaps (Poisson at "
               "burstiness 1; inf: all at once); with --endpoint a comma list (1,2,4,8) runs one load per rate, "
               "in order, and --find-max-rate starts its search here", group="load"),
        Option("burstiness", float, 1.0, "open loop: gamma shape of the gaps (<1 burstier, >1 more regular)",
               min=0, group="load"),
        Option("concurrency", int, None, "closed loop: clients each sending its next request when the last "
               "finishes (neither this nor --request-rate: --max-batch clients per replica)", min=1, max=1 << 20,
               group="load"),
        Option("num-requests", int, 0, "requests to send (0: until --duration; both 0: the preset's)", min=0,
               group="load"),
        Option("drain-timeout", float, 0.0, "seconds to wait for unfinished requests once sending stops (0: wait "
               "for all)", min=0, group="load"),
        Option("slo-ttft-ms", float, 2000.0, "goodput SLO on time to first token", min=0, group="load"),
        Option("slo-tpot-ms", float, 100.0, "goodput SLO on time per output token", min=0, group="load"),
        Option("replicas", int, 1, "model replicas, --tp processes each (torchrun, one per GPU): one request "
               "stream shared round-robin, reported once by rank 0", min=1, max=1024, group="parallel"),
        # tuned by default: the engine's knobs (FP8 and TP only when --space names them)
        *(dataclasses.replace(o, tune=SERVE_TUNE.get(o.name, ())) for o in TRANSFORMER_KNOBS
          if o.name not in TRAINING_ONLY),
        Option("dry-run", bool, False, "print the plan as JSON (config, cache, load, FLOPs) and exit"),
        *ENDPOINT_OPTIONS,
)

SERVE = WorkloadSpec(
    name="serve",
    module="workloads.serve",
    description="Inference serving load test: KV-cache engine with continuous batching and chunked prefill, "
                "or any server speaking the OpenAI API (--endpoint); open- or closed-loop load; TTFT, TPOT, ITL, "
                "E2E percentiles and goodput",
    presets=tuple(SERVE_DEFAULTS),
    default_preset="tiny",
    cpu_preset="tiny",
    options=SERVE_OPTIONS,
    checks=serve_checks,
    preset_values=preset_values,
)
