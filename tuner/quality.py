"""What a model computes, not how fast: the perplexity block of a run's summary, and the quality gate.

The ``perplexity`` workload sends, per batch of windows, the tokens it scored, their summed negative
log-likelihood in nats (``nll_sum``) and the UTF-8 bytes they stand for (``scored_bytes``, when a tokenizer gives
them); its ``meta`` names the model (random weights or a checkpoint), the data (file sha256, token count, the
tokens' sha256) and the windows. ``block`` turns those raw sums into mean NLL, perplexity and bits per byte;
``gate`` says whether a candidate run's perplexity stays within a relative tolerance of a baseline's, and refuses
runs that did not score the same tokens of the same model.
"""

from __future__ import annotations

import math
from typing import Any

#: The gate's default tolerance: a relative change of perplexity of at most 0.5%.
MAX_DELTA = 0.005
_LN2 = math.log(2.0)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rows(series: dict[str, Any]) -> list[tuple[float, float, Any, Any]]:
    """Rank 0's scored steps, once per step index: (nll_sum, tokens, scored_bytes, windows)."""
    cols = (series.get("step") or {}).get("0") or {}
    n = len(cols.get("t") or [])
    out: dict[Any, tuple[float, float, Any, Any]] = {}
    for i in range(n):
        def col(name: str, i: int = i) -> Any:
            values = cols.get(name)
            return values[i] if isinstance(values, list) and len(values) == n else None

        nll, tokens = col("nll_sum"), col("tokens")
        if _num(nll) and _num(tokens) and tokens > 0:
            out.setdefault(col("step"), (float(nll), float(tokens), col("scored_bytes"), col("windows")))
    return list(out.values())


def model_of(meta: dict[str, Any]) -> dict[str, Any]:
    """The model a run scored, as the gate compares it: random weights (preset, seed and the kind of device whose
    generator drew them) or a checkpoint."""
    options = meta.get("options") if isinstance(meta.get("options"), dict) else {}
    if meta.get("weights") == "random":
        return {"weights": "random", "preset": options.get("preset"), "seed": options.get("seed"),
                "drawn_on": str(meta.get("device") or "?").split(":")[0]}
    ckpt = meta.get("checkpoint") if isinstance(meta.get("checkpoint"), dict) else {}
    return {"weights": "checkpoint", **{k: ckpt.get(k) for k in ("path", "model_type", "config_sha256", "n_params")}}


def block(series: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """``{"quality": {...}}`` for a perplexity run (``meta``: its first meta event), else ``{}``: mean NLL (nats per
    scored token), perplexity (e to that), tokens and windows scored, bits per byte (NLL in bits over the scored
    tokens' UTF-8 bytes, when every step gave them), whether every planned token was scored, the model, the data
    and the windows."""
    if meta.get("workload") != "perplexity" and not _rows(series):
        return {}
    rows = _rows(series)
    nll = sum(r[0] for r in rows)
    tokens = sum(r[1] for r in rows)
    mean = nll / tokens if tokens else None
    byte_counts = [r[2] for r in rows]
    n_bytes = sum(byte_counts) if rows and all(_num(b) for b in byte_counts) else None
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    windows = meta.get("windows") if isinstance(meta.get("windows"), dict) else {}
    planned = windows.get("tokens_scored")
    out: dict[str, Any] = {
        "mean_nll": mean,
        "perplexity": math.exp(mean) if mean is not None and mean < 700 else None,
        "tokens_scored": int(tokens),
        "windows_scored": sum(int(r[3]) for r in rows if _num(r[3])),
        "bits_per_byte": nll / _LN2 / n_bytes if n_bytes else None,
        "scored_bytes": n_bytes,
        "complete": _num(planned) and int(tokens) == planned,
        "model": model_of(meta),
        "data": {k: data.get(k) for k in ("path", "format", "sha256", "tokens", "tokens_sha256", "tokenizer")},
        "windows": {k: windows.get(k) for k in ("seq_len", "stride", "count", "tokens_scored")},
    }
    if n_bytes is None:
        out["bytes_note"] = data.get("bytes_note") or "bits per byte unknown: no byte counts from the workload"
    return {"quality": out}


def _short(sha: Any) -> str:
    return str(sha)[:12] if sha else "?"


def _window_text(w: dict[str, Any]) -> str:
    return f"seq-len {w.get('seq_len')} stride {w.get('stride')}"


def _model_text(m: dict[str, Any]) -> str:
    if m.get("weights") == "random":
        return f"random weights (preset {m.get('preset')}, seed {m.get('seed')}, drawn on {m.get('drawn_on')})"
    return f"checkpoint {m.get('path')} (config sha256 {_short(m.get('config_sha256'))})"


def refusal(base: dict[str, Any], cand: dict[str, Any]) -> str | None:
    """Why two perplexity blocks cannot be compared (not the same tokens, windows or model), or None."""
    da, db = base.get("data") or {}, cand.get("data") or {}
    if da.get("sha256") != db.get("sha256"):
        return f"the data differ (file sha256 {_short(da.get('sha256'))} vs {_short(db.get('sha256'))})"
    if da.get("tokens") != db.get("tokens") or da.get("tokens_sha256") != db.get("tokens_sha256"):
        return (f"the tokens differ ({da.get('tokens')} vs {db.get('tokens')} tokens, sha256 "
                f"{_short(da.get('tokens_sha256'))} vs {_short(db.get('tokens_sha256'))}: another tokenizer or "
                "--max-tokens)")
    wa, wb = base.get("windows") or {}, cand.get("windows") or {}
    if (wa.get("seq_len"), wa.get("stride")) != (wb.get("seq_len"), wb.get("stride")):
        return f"the windows differ ({_window_text(wa)} vs {_window_text(wb)})"
    if base.get("model") != cand.get("model"):
        return f"the models differ ({_model_text(base.get('model') or {})} vs {_model_text(cand.get('model') or {})})"
    if base.get("tokens_scored") != cand.get("tokens_scored") or not base.get("complete") \
            or not cand.get("complete"):
        return (f"not every token was scored ({base.get('tokens_scored')} and {cand.get('tokens_scored')} of "
                f"{wa.get('tokens_scored')}: a run cut short by --steps, --duration or a cancel)")
    return None


def gate(baseline_summary: dict[str, Any], candidate_summary: dict[str, Any],
         max_delta: float = MAX_DELTA) -> tuple[bool, str]:
    """The quality gate: ``(ok, one line)``. ``ok`` when both runs scored the same tokens of the same model in the
    same windows and the candidate's perplexity is within ``max_delta`` (relative) of the baseline's, either way;
    a refusal (different data, tokens, windows or model, a run cut short) is not ok."""
    base, cand = baseline_summary.get("quality"), candidate_summary.get("quality")
    if not isinstance(base, dict) or not isinstance(cand, dict):
        return False, "refused: not a perplexity run (no perplexity in its summary)"
    why = refusal(base, cand)
    if why is not None:
        return False, f"refused: {why}"
    pa, pb = base.get("perplexity"), cand.get("perplexity")
    if not _num(pa) or not _num(pb) or pa <= 0:
        return False, "refused: no perplexity (no tokens scored)"
    delta = pb / pa - 1
    ok = abs(delta) <= max_delta
    return ok, (f"perplexity {pb:.6g} vs {pa:.6g}: {delta * 100:+.3f}%, {'within' if ok else 'beyond'} "
                f"±{max_delta * 100:.3g}%")


def describe(summary: dict[str, Any]) -> list[str]:
    """What ``btune show`` says of a perplexity run before its figures: the model (random weights in so many
    words), the data and the windows."""
    q = summary.get("quality")
    if not isinstance(q, dict):
        return []
    m, d, w = q.get("model") or {}, q.get("data") or {}, q.get("windows") or {}
    if m.get("weights") == "random":
        model = (f"RANDOM WEIGHTS (preset {m.get('preset')}, seed {m.get('seed')}): an untrained model; its "
                 "perplexity measures no real model")
    else:
        model = (f"checkpoint {m.get('path')} ({m.get('model_type')}, {m.get('n_params')} parameters, config "
                 f"sha256 {_short(m.get('config_sha256'))})")
    tokenizer = f", tokenizer {d.get('tokenizer')}" if d.get("tokenizer") else ""
    lines = [f"model     {model}",
             f"data      {d.get('path')} ({d.get('format')}, {d.get('tokens')} tokens, sha256 "
             f"{_short(d.get('sha256'))}{tokenizer})",
             f"windows   {_window_text(w)}: {q.get('windows_scored')} of {w.get('count')} windows, "
             f"{q.get('tokens_scored')} of {w.get('tokens_scored')} tokens scored"]
    if q.get("bytes_note"):
        lines.append(f"note: {q['bytes_note']}")
    return lines
