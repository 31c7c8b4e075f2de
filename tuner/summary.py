"""A run's summary, computed from its raw series and events (design.md, "Metric definitions").

Steps are merged across ranks by step index: the step time is the slowest rank's, the tokens are
the job's global tokens for that step as the workload reported them (tensor-parallel ranks share
tokens, so they are counted once). Warm-up and compile steps are excluded from steady state.
"""

from __future__ import annotations

from typing import Any

from tuner import hardware, power, quality, results
from tuner.memory import profile as memory_profile
from tuner.stats import describe, finite, trapezoid


def is_steady(step: dict[str, Any]) -> bool:
    """A step that counts in steady-state statistics: neither a warm-up step nor the first step (which
    holds compilation and allocator warm-up), whatever ``--warmup`` was."""
    return not step.get("warmup") and not step.get("first")


def replica_steps(step_series: dict[str, dict[str, list[Any]]]) -> list[dict[str, Any]]:
    """Data-parallel replicas: every rank's steps, each its own row (their tokens add)."""
    out: list[dict[str, Any]] = []
    for rank, cols in step_series.items():
        out += merged_steps({rank: cols})
    return sorted(out, key=lambda s: s["t_end"] if s["t_end"] is not None else 0.0)


#: Step fields a row keeps as the first rank reported them (what the engine's step did: MBU, decode-only steps).
_CARRIED = ("kv_tokens", "weight_passes", "prefill_tokens", "decode_batch")


def merged_steps(step_series: dict[str, dict[str, list[Any]]]) -> list[dict[str, Any]]:
    """One row per step index: ``step, t_start, t_end, step_ms, tokens, warmup, first`` (slowest rank's time)
    and the _CARRIED fields the workload sent."""
    rows: dict[int, dict[str, Any]] = {}
    for rank in sorted(step_series, key=lambda r: int(r) if r.lstrip("-").isdigit() else 0):
        cols = step_series[rank]
        n = len(cols.get("t", []))
        steps = cols.get("step") or list(range(n))
        ms = cols.get("step_ms") or [None] * n
        toks = cols.get("tokens") or [None] * n
        warm = cols.get("warmup") or [False] * n
        first = cols.get("first") or [False] * n
        ts = cols.get("t") or [None] * n
        extra = {k: cols[k] for k in _CARRIED if isinstance(cols.get(k), list) and len(cols[k]) == n}
        for i in range(n):
            if not isinstance(ms[i], (int, float)) or steps[i] is None:
                continue
            t_end = ts[i]
            t_start = t_end - ms[i] / 1000.0 if isinstance(t_end, (int, float)) else None
            row = rows.get(steps[i])
            if row is None:
                rows[steps[i]] = {"step": steps[i], "t_start": t_start, "t_end": t_end, "step_ms": float(ms[i]),
                                  "tokens": toks[i], "warmup": bool(warm[i]), "first": bool(first[i]),
                                  **{k: v[i] for k, v in extra.items()}}
            else:  # another rank of the same step: slowest time, tokens already counted
                if ms[i] > row["step_ms"]:
                    row["step_ms"] = float(ms[i])
                if t_start is not None and (row["t_start"] is None or t_start < row["t_start"]):
                    row["t_start"] = t_start
                if t_end is not None and (row["t_end"] is None or t_end > row["t_end"]):
                    row["t_end"] = t_end
                row["warmup"] = row["warmup"] or bool(warm[i])
                row["first"] = row["first"] or bool(first[i])
                if row["tokens"] is None:
                    row["tokens"] = toks[i]
    return [rows[k] for k in sorted(rows)]


def first_event(events: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    """The lowest rank's first event of a type."""
    found = [e for e in events if e.get("type") == type_]
    return min(found, key=lambda e: e.get("rank", 0)) if found else None


MIG_REASON = "MIG: the board's energy counter covers every slice"


def _uuid_key(uuid: Any) -> str | None:
    """One spelling for NVML's ``GPU-9a48c30d-…`` and torch's bare ``9a48c30d-…``: lower case, no ``GPU-``."""
    if not isinstance(uuid, str) or not uuid.strip():
        return None
    key = uuid.strip().lower()
    return key[4:] if key.startswith("gpu-") else key


def _gpu_order(key: str) -> int:
    return int(key) if key.lstrip("-").isdigit() else 0


def _boards(energy: dict[str, Any], environment: dict[str, Any]) -> dict[str, tuple[str | None, bool]]:
    """Each GPU with an energy series: its UUID key (from its energy readings, else the recorded inventory)
    and whether the sampler saw MIG mode on."""
    inventory: dict[str, str | None] = {}
    for dev in environment.get("gpus") or []:
        if isinstance(dev, dict):
            inventory[str(dev.get("index"))] = _uuid_key(dev.get("uuid"))
    out: dict[str, tuple[str | None, bool]] = {}
    for gpu, cols in energy.items():
        uuid = next((k for k in map(_uuid_key, cols.get("uuid") or []) if k), None) or inventory.get(gpu)
        out[gpu] = (uuid, any(v is True for v in cols.get("mig") or []))
    return out


def _visible(value: str, boards: dict[str, tuple[str | None, bool]]) -> tuple[list[str], bool]:
    """The GPUs a CUDA_VISIBLE_DEVICES value names, read as CUDA does (up to the first entry it cannot
    use); indexes are taken as NVML's. Also whether it names a MIG slice."""
    keys: list[str] = []
    for entry in (e.strip() for e in value.split(",")):
        if entry.upper().startswith("MIG-"):
            return keys, True
        if entry.isdigit() and str(int(entry)) in boards:
            key = str(int(entry))
        elif entry.upper().startswith("GPU-"):
            prefix = _uuid_key(entry) or ""
            found = [g for g, (u, _) in boards.items() if u and u.startswith(prefix)]
            if len(found) != 1:
                break
            key = found[0]
        else:
            break
        if key not in keys:
            keys.append(key)
    return keys, False


def energy_gpus(energy: dict[str, Any], events: list[dict[str, Any]],
                environment: dict[str, Any] | None = None) -> tuple[list[str] | None, str | None]:
    """The GPUs whose energy is the run's: ``(series keys or None when no energy can be charged, note)``.

    The GPUs the workload opened (every rank's ``meta`` ``device_uuid``, matched to NVML's UUIDs, never
    by index); without one (an older record, a CPU run), those CUDA_VISIBLE_DEVICES named in the recorded
    environment; else every GPU, with a note. A GPU in MIG mode gives none (MIG_REASON).
    """
    env = environment if isinstance(environment, dict) else {}
    boards = _boards(energy, env)

    def counted(keys: list[str], note: str | None) -> tuple[list[str] | None, str | None]:
        if any(boards[k][1] for k in keys):
            return None, MIG_REASON
        return sorted(keys, key=_gpu_order), note

    wanted: dict[str, str] = {}  # UUID key -> as the workload wrote it
    for ev in events:
        key = _uuid_key(ev.get("device_uuid")) if ev.get("type") == "meta" else None
        if key:
            wanted.setdefault(key, ev["device_uuid"].strip())
    if wanted:
        by_uuid = {u: g for g, (u, _) in boards.items() if u}
        missing = [name for key, name in wanted.items() if key not in by_uuid]
        if missing and any(mig for _, mig in boards.values()):
            return None, MIG_REASON  # a MIG slice's UUID is not its board's
        if missing:
            return None, f"no NVML energy counter for the run's GPU {', '.join(missing)}; energy left out"
        return counted([by_uuid[k] for k in wanted], None)
    visible = (env.get("env") or {}).get("CUDA_VISIBLE_DEVICES") if isinstance(env.get("env"), dict) else None
    if isinstance(visible, str):
        keys, mig = _visible(visible, boards)
        if mig:
            return None, MIG_REASON
        if not keys:
            return None, f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU; no GPU energy is the run's"
        return counted(keys, f"no device UUID from the workload: counted the GPUs CUDA_VISIBLE_DEVICES={visible!r} "
                             "names (its indexes read as NVML's, true when the GPUs are alike)")
    return counted(list(boards), "no device UUID from the workload (an older record or a CPU run) and no "
                                 "CUDA_VISIBLE_DEVICES: counted every GPU NVML sampled")


def _energy(series: dict[str, Any], steady: list[dict[str, Any]], steps: list[dict[str, Any]],
            events: list[dict[str, Any]], environment: dict[str, Any] | None) -> dict[str, Any]:
    """Energy from the NVML counter of the run's GPUs, and joules per token over a window the counter
    brackets. The other GPUs' series stay in the record; they are left out here."""
    energy = series.get("energy") or {}
    if not energy:
        return {"energy_j": None, "joules_per_token": None, "energy_note": "no NVML energy counter"}
    keys, note = energy_gpus(energy, events, environment)
    if keys is None:
        return {"energy_j": None, "energy_j_per_gpu": {}, "joules_per_token": None, "energy_gpus": [],
                "energy_note": note}
    energy = {k: energy[k] for k in keys}
    per_gpu: dict[str, float] = {}
    for gpu, cols in energy.items():
        mj = [v for v in cols.get("mj", []) if isinstance(v, (int, float))]
        if len(mj) >= 2:
            per_gpu[gpu] = (mj[-1] - mj[0]) / 1000.0
    out: dict[str, Any] = {"energy_j": sum(per_gpu.values()) if per_gpu else None, "energy_j_per_gpu": per_gpu,
                           "energy_gpus": [_gpu_order(k) for k in keys]}
    if note:
        out["energy_note"] = note
    # The window is the span between counter readings that lie inside the steady steps.
    window = steady or steps
    if not window or window[0]["t_start"] is None:
        out["joules_per_token"] = None
        return out
    w0, w1 = window[0]["t_start"], window[-1]["t_end"]
    joules = 0.0
    span: tuple[float, float] | None = None
    for cols in energy.values():
        pts = [(t, v) for t, v in zip(cols.get("t", []), cols.get("mj", []), strict=False)
               if isinstance(v, (int, float)) and w0 - 1e-3 <= t <= w1 + 1e-3]
        if len(pts) < 2:
            continue
        joules += (pts[-1][1] - pts[0][1]) / 1000.0
        span = (pts[0][0], pts[-1][0]) if span is None else (max(span[0], pts[0][0]), min(span[1], pts[-1][0]))
    if span is None or span[1] <= span[0]:
        out["joules_per_token"] = None
        short = "run too short for two energy readings inside the steady window"
        out["energy_note"] = f"{note}; {short}" if note else short
        return out
    # Tokens in the span, each step prorated by the part of it that lies inside the span.
    tokens = 0.0
    for s in window:
        dur = s["t_end"] - s["t_start"]
        overlap = min(s["t_end"], span[1]) - max(s["t_start"], span[0])
        if dur > 0 and overlap > 0:
            tokens += (s["tokens"] or 0) * overlap / dur
    out["energy_window_s"] = span[1] - span[0]
    out["energy_window_j"] = joules
    out["joules_per_token"] = joules / tokens if tokens else None
    return out


def _gpu(series: dict[str, Any]) -> dict[str, Any]:
    gpus = series.get("gpu") or {}
    out: dict[str, Any] = {}
    for gpu, cols in gpus.items():
        ts = cols.get("t", [])
        power = cols.get("power_w", [])
        out[gpu] = {
            "power_w": describe(power),
            "energy_integrated_j": trapezoid(ts, power) if power else None,
            "mem_used_mb_max": max(finite(cols.get("mem_used_mb", [])), default=None),
            "mem_total_mb": max(finite(cols.get("mem_total_mb", [])), default=None),
            "proc_mem_mb_max": max(finite(cols.get("proc_mem_mb", [])), default=None),
            "util_gpu_mean": describe(cols.get("util_gpu", []))["mean"],
            "temp_c_max": max(finite(cols.get("temp_c", [])), default=None),
            "sm_clock_mhz_mean": describe(cols.get("sm_clock_mhz", []))["mean"],
        }
    return out


def _per_s(step_series: dict[str, dict[str, list[Any]]], replicas: int, steps: list[dict[str, Any]],
           amount: Any) -> float | None:
    """``amount(row)`` summed over the steady steps, per second of their time; data-parallel replicas run side
    by side, so their rates add (each rank's amount over its own busy time). None when any steady step has
    no amount."""
    groups = ([[s for s in merged_steps({r: step_series[r]}) if is_steady(s)] for r in step_series]
              if replicas > 1 else [[s for s in steps if is_steady(s)]])
    total = 0.0
    for rows in groups:
        secs = sum(s["step_ms"] for s in rows) / 1000.0
        amounts = [amount(s) for s in rows]
        if any(a is None for a in amounts):
            return None
        total += sum(amounts) / secs if secs > 0 else 0.0
    return total or None


def step_bytes(meta: dict[str, Any], row: dict[str, Any]) -> float | None:
    """The bytes one step must move (design.md, MBU): the weights once per forward pass (``weight_passes``,
    default 1) and each attended cached position once (``kv_tokens``, else the meta's fixed count); None
    when the workload reports no byte figures."""
    weights, per_token = meta.get("weight_bytes"), meta.get("kv_bytes_per_token")
    kv = row.get("kv_tokens", meta.get("kv_tokens_per_step"))
    if not all(isinstance(v, (int, float)) for v in (weights, per_token, kv)):
        return None
    passes = row.get("weight_passes", 1)
    return (passes if isinstance(passes, (int, float)) else 1) * weights + kv * per_token


def _mbu(meta: dict[str, Any], step_series: dict[str, Any], replicas: int,
         steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Memory-bandwidth utilisation: the bytes the steady steps must move per second, over the devices' peak
    HBM bandwidth."""
    n_dev = int(meta.get("n_devices") or 1)
    if not isinstance(meta.get("weight_bytes"), (int, float)):
        return hardware.mbu(None, meta.get("device_name"), n_dev,
                            "the workload reports no bytes per step (MBU is for decode and serving)")
    return hardware.mbu(_per_s(step_series, replicas, steps, lambda row: step_bytes(meta, row)),
                        meta.get("device_name"), n_dev, "a steady step without its attended positions")


def _engine(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Serving engine steps that only decoded (no prompt chunk): their time and batch."""
    decode = [s for s in steps if is_steady(s) and s.get("prefill_tokens") == 0]
    if not any("prefill_tokens" in s for s in steps):
        return None
    return {"decode_step_ms": describe(s["step_ms"] for s in decode),
            "decode_batch": describe(s.get("decode_batch") for s in decode)}


def summarize(series: dict[str, Any], events: list[dict[str, Any]], started: float, ended: float,
              environment: dict[str, Any] | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary object of a run record (``environment``: the record's, for CUDA_VISIBLE_DEVICES;
    ``options``: the run's, for the serving SLOs)."""
    meta = first_event(events, "meta") or {}
    step_series = series.get("step") or {}
    replicas = int(meta.get("replicas") or 1)
    steps = replica_steps(step_series) if replicas > 1 else merged_steps(step_series)
    steady = [s for s in steps if is_steady(s)]
    step_ms = [s["step_ms"] for s in steady]
    tok_s = [s["tokens"] / (s["step_ms"] / 1000.0) for s in steady if s["tokens"] and s["step_ms"] > 0]
    steady_tokens = sum(s["tokens"] or 0 for s in steady)
    throughput = _per_s(step_series, replicas, steps, lambda s: s["tokens"] or 0) if steady_tokens else None
    workload_summary = first_event(events, "summary")
    out: dict[str, Any] = {
        "steps": {"total": len(steps), "warmup": len(steps) - len(steady), "steady": len(steady)},
        "step_ms": describe(step_ms),
        "tokens_per_s": describe(tok_s),
        "throughput_tokens_per_s": throughput,
        "tokens_total": sum(s["tokens"] or 0 for s in steps),
        "warmup_step_ms": [s["step_ms"] for s in steps if not is_steady(s)],
        "first_step_ms": next((s["step_ms"] for s in steps if s.get("first")), None),
    }
    rank0 = (series.get("step") or {}).get("0", {})
    losses = finite(rank0.get("loss", []))
    if losses:
        out["loss_first"], out["loss_last"] = losses[0], losses[-1]
    peaks = finite(rank0.get("mem_peak_mb", []))
    if peaks:
        out["torch_mem_peak_mb"] = max(peaks)

    fpt = meta.get("flops_per_token")
    achieved = fpt * throughput if isinstance(fpt, (int, float)) and throughput else None
    out["tflops"] = achieved / 1e12 if achieved else None
    device_name = meta.get("device_name")
    n_dev = int(meta.get("n_devices") or 1)
    precision = str(meta.get("precision") or "bf16")
    out["mfu"] = {"bf16": hardware.mfu(achieved, device_name, "bf16", n_dev)}
    if precision == "fp8":
        out["mfu"]["fp8"] = hardware.mfu(achieved, device_name, "fp8", n_dev)
    out["mbu"] = _mbu(meta, step_series, replicas, steps)
    engine = _engine(steps)
    if engine is not None:
        out["engine"] = engine

    out.update(_energy(series, steady, steps, events, environment))
    out["gpu"] = _gpu(series)
    run_gpus = [str(g) for g in out["energy_gpus"]] if "energy_gpus" in out else None
    out["energy_integrated_j"] = power.integrated_total(series, run_gpus)
    out["phases"] = power.profile(series, events, started, ended, run_gpus, steps)
    host = series.get("host") or {}
    if host:
        out["host"] = {
            "proc_cpu_percent": describe(host.get("proc_cpu_percent", [])),
            "proc_rss_mb_max": max(finite(host.get("proc_rss_mb", [])), default=None),
            "cpu_percent_mean": describe(host.get("cpu_percent", []))["mean"],
        }
    out["notes"] = [e.get("message") for e in events if e.get("type") == "telemetry_note"]
    errors = [e for e in events if e.get("type") == "error"]
    if errors:
        out["errors"] = [{"rank": e.get("rank"), "kind": e.get("kind"), "message": e.get("message")} for e in errors]
    if workload_summary:
        out["workload"] = {k: v for k, v in workload_summary.items() if k not in ("v", "type", "t")}
        compile_s = out["workload"].get("compile_s")
        out["compile_s"] = compile_s if isinstance(compile_s, (int, float)) and compile_s >= 0 else None
    out["throughput_per_gpu"] = throughput / n_dev if throughput else None
    block = results.serving(events, options or {}, out.get("workload") or {})
    if block is not None:
        out["serving"] = block
    balance = results.experts(events)
    if balance is not None:
        out["experts"] = balance
    out["memory_profile"] = memory_profile(events)
    out.update(quality.block(series, meta))  # perplexity runs: mean NLL, perplexity, bits per byte
    return out
