"""Plain-text views of run records: one run (``btune show``) and several side by side (``btune compare``)."""

from __future__ import annotations

from typing import Any

from tuner import quality
from tuner.metrics import Figure, dig, figures, headline_figures, number
from tuner.stats import relative_delta, run_level

#: SI prefixes and their factors, largest first.
_PREFIXES = (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0), ("m", 1e-3), ("µ", 1e-6),
             ("n", 1e-9))
#: Units that take a prefix (the base unit: the prefixes it may take); other units are written as they are.
_SCALABLE = {"FLOP/s": "PTGMk", "B/s": "PTGMk", "J/tok": "kmµn", "J": "Mkmµ", "s": "mµn"}


def _split_unit(unit: str) -> tuple[str, float, str] | None:
    """``("T", 1e12, "FLOP/s")`` for ``TFLOP/s``; None for a unit that takes no prefix."""
    for base in sorted(_SCALABLE, key=len, reverse=True):
        if unit.endswith(base):
            prefix = unit[: -len(base)]
            factor = dict(_PREFIXES).get(prefix)
            if factor is not None:
                return prefix, factor, base
    return None


def scale(values: Any, unit: str) -> tuple[float, str]:
    """``(divisor, unit)`` to write ``values`` (one number or several, e.g. a table's row or column) in: the unit
    as given while the largest magnitude is in [1, 10,000), else the SI prefix that brings it to [1, 1,000)
    (``0.0002965 TFLOP/s`` is ``296.5 MFLOP/s``, ``160,200 J`` is ``160.2 kJ``, ``0.05 ms`` is ``50 µs``)."""
    split = _split_unit(unit)
    nums = [abs(v) for v in (values if isinstance(values, (list, tuple)) else [values])
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf") and v]
    if split is None or not nums:
        return 1.0, unit
    prefix, factor, base = split
    top = max(nums)
    if 1 <= top < 1e4:
        return 1.0, unit
    allowed = [(p, f) for p, f in _PREFIXES if p in _SCALABLE[base] or p == "" or p == prefix]
    in_base = top * factor
    pick = next(((p, f) for p, f in allowed if in_base / f >= 1), allowed[-1])
    return pick[1] / factor, pick[0] + base


def fmt(value: Any, unit: str = "", kind: str = "") -> str:
    """A number for a table, by kind: a count as an integer (``58``, however it is stored), a fraction with unit
    ``%`` as a percentage (``99.9%``, ``0.05%``), ``kind="percent"`` a value already in percent (``99.9%``),
    others with four or five significant digits, large numbers grouped, a tiny one with an exponent
    (``1.86e-05``; ``quantity`` gives a unit that takes one a prefix instead); None as a dash. The unit itself is
    not written (``quantity`` writes it)."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if unit == "%" or kind == "percent":
        pct = value * 100 if unit == "%" else value
        if pct == 0:
            return "0%"
        return f"{pct:.1f}%" if abs(pct) >= 1 else f"{pct:.2g}%"
    if kind == "count" or isinstance(value, int):
        return f"{round(value):,}"
    mag = abs(value)
    if mag >= 1e5:
        return f"{value:,.0f}"
    if mag >= 100:
        return f"{value:,.1f}"
    if mag >= 10:
        return f"{value:.2f}"
    if mag >= 1:
        return f"{value:.3f}"
    if mag >= 1e-3:
        return f"{value:.4g}"
    return f"{value:.3g}"


def quantity(value: Any, unit: str = "", kind: str = "") -> str:
    """``fmt`` with its unit, an SI prefix chosen by ``scale``: ``296.5 MFLOP/s``, ``58``, ``99.9%``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or unit == "%":
        return fmt(value, unit, kind)
    div, shown = scale(value, unit)
    text = fmt(value / div, shown, kind)
    return f"{text} {shown}" if shown else text


def figure_value(f: Figure) -> str:
    """A registry figure's value with its unit, written by its kind with the unit scaled (``296.5 MFLOP/s``,
    ``58``, ``99.9%``): what a panel shows after the figure's label."""
    return quantity(f.value, f.unit, f.kind)


def delta_text(d: float) -> str:
    """A relative difference: ``+3.2%``, and ``+2113%`` from 100% up."""
    return f"{d * 100:+.0f}%" if abs(d) >= 1 else f"{d * 100:+.1f}%"


def table(rows: list[list[str]], header: list[str], left: tuple[int, ...] = (0,)) -> str:
    """Columns padded to fit: those in ``left`` left-aligned (default: the first), the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for n, r in enumerate([header, *rows]):
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def key_options(rec: dict[str, Any]) -> str:
    """The options that differ from the workload's defaults, as ``k=v`` text."""
    opts = dig(rec, ("config", "options")) or {}
    defaults = dig(rec, ("config", "defaults")) or {}
    parts = ["random weights"] if opts.get("random_weights") is True else []  # said plainly (perplexity)
    parts += [f"{k}={v}" for k, v in opts.items()
              if k != "random_weights" and (k in ("preset",) or defaults.get(k, object()) != v)]
    return " ".join(parts)


def blocks(summary: dict[str, Any], workload: Any) -> str:
    """The registry's figures of one run, block by block (a block with no value is left out)."""
    out: list[str] = []
    by_block: dict[str, list[Figure]] = {}
    for f in figures(summary, workload):
        if number(f.value):
            by_block.setdefault(f.metric.block, []).append(f)
    for block, figs in by_block.items():
        rows = []
        for f in figs:
            div, unit = scale(f.value, f.unit)
            rows.append([f.label, fmt(f.value / div, unit, f.kind), unit if unit != "%" else ""])
        if block == "serving":
            fails = dig(summary, ("serving", "failures")) or {}
            if fails.get("total"):  # an endpoint's failed requests (the registry's row above), by reason
                rows += [[f"  failed: {why}", str(n), ""] for why, n in (fails.get("by_reason") or {}).items()]
            slo = dig(summary, ("serving", "slo")) or {}
            block += f" (SLOs: TTFT <= {fmt(slo.get('ttft_ms'))} ms, TPOT <= {fmt(slo.get('tpot_ms'))} ms)"
        if block == "engine steps":
            block += " (the engine's own steps, not requests)"
        out.append(table(rows, [block, "value", "unit"]))
    return "\n\n".join(out)


def _bytes(v: Any) -> str:
    """Bytes in the largest binary unit they reach (``1.234 GiB``, ``56.7 MiB``); a dash when unknown."""
    if not number(v):
        return "-"
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(v) >= factor:
            return f"{v / factor:.3f} {unit}" if unit == "GiB" else f"{v / factor:.1f} {unit}"
    return f"{v:.0f} B"


def curve_section(summary: dict[str, Any]) -> list[str]:
    """A rate sweep's or --find-max-rate's curve (``serving.curve``, tuner.serving): one row per load, and the
    max rate found; no lines without one."""
    points = dig(summary, ("serving", "curve"))
    if not isinstance(points, list) or not points:
        return []
    rows = []
    for p in (q for q in points if isinstance(q, dict)):
        rate = p.get("rate")
        rows.append([str(p.get("segment")), f"{fmt(rate)}/s" if number(rate) else "inf",
                     fmt(p.get("request_throughput")), fmt(p.get("output_tokens_per_s")),
                     fmt(p.get("good_fraction"), "%"), "yes" if p.get("passed") else "no",
                     fmt(dig(p, ("ttft_ms", "p50"))), fmt(dig(p, ("ttft_ms", "p99"))),
                     fmt(dig(p, ("tpot_ms", "p50"))), fmt(dig(p, ("tpot_ms", "p99"))),
                     fmt(p.get("failed"), kind="count"), fmt(p.get("unfinished"), kind="count")])
    header = ["load", "rate", "req/s", "out tok/s", "within SLOs", ">= 99%", "TTFT p50 ms", "TTFT p99 ms",
              "TPOT p50 ms", "TPOT p99 ms", "failed", "unfinished"]
    out = ["", table(rows, header, left=(0,))]
    serving = summary.get("serving") or {}
    if "max_rate" in serving:
        best = serving["max_rate"]
        out.append(f"max rate with >= 99% of requests within the SLOs: {fmt(best)} req/s" if number(best)
                   else "max rate: none (no rate tried kept 99% of requests within the SLOs)")
    return out


def memory_section(summary: dict[str, Any]) -> list[str]:
    """The memory profile (``--memory-profile``, tuner.memory): the window's peak beside torch's and the dry-run
    estimate, the top allocation sites at the peak, the snapshot; no lines for a run without one."""
    mp = summary.get("memory_profile")
    if not isinstance(mp, dict):
        return []
    window = mp.get("window")
    span = f"steps {window[0]}-{window[1]}" if isinstance(window, list) and len(window) == 2 else "steps ?"
    rank = f", rank {mp['rank']}" if mp.get("rank") else ""
    out = ["", f"Memory profile ({span}{rank})"]
    if mp.get("note"):
        out.append(f"  note: {mp['note']}")
    figures_ = [("peak of live allocations (trace replay)", mp.get("peak_bytes")),
                ("torch max_memory_allocated, same window", mp.get("max_memory_allocated")),
                ("torch peak over the whole run", mp.get("run_peak_bytes")),
                ("dry-run estimate", mp.get("estimate_bytes"))]
    rows = [[label, _bytes(v)] for label, v in figures_ if number(v)]
    peak, estimate = mp.get("peak_bytes"), mp.get("estimate_bytes")
    if number(peak) and number(estimate) and estimate:
        rows.append(["peak vs estimate", delta_text(peak / estimate - 1)])
    if rows:
        out.append(table(rows, ["figure", "value"], left=(0,)))
    sites = [x for x in mp.get("top_sites") or [] if isinstance(x, dict)]
    if sites:
        out.append("")
        out.append(table([[str(x.get("site")), _bytes(x.get("bytes")), fmt(x.get("blocks"), kind="count")]
                          for x in sites], ["allocation site (live at the peak)", "bytes", "blocks"]))
    if mp.get("snapshot"):
        out.append(f"snapshot  {mp['snapshot']}  (open it at https://pytorch.org/memory_viz)")
    return out


def show(rec: dict[str, Any], printed_notes: frozenset[str] = frozenset()) -> str:
    """A human summary of one run; ``printed_notes``: notes already printed (by the live status) left out."""
    s = rec["summary"]
    env = rec.get("environment", {})
    gpus = ", ".join(g.get("name", "?") for g in env.get("gpus", [])) or "none"
    workload = dig(rec, ("config", "workload"))
    lines = [
        f"run       {rec['id']}",
        f"status    {rec['status']} (exit {rec['exit_code']})",
        f"workload  {workload}  {key_options(rec)}" if workload != "command" else f"command   {command_text(rec)}",
        f"started   {rec['started']}   ended {rec['ended']}   ({quantity(s.get('duration_s'), 's')})",
        f"host      {env.get('host')}   GPUs: {gpus}   torch {dig(env, ('versions', 'torch'))}",
    ]
    lines += quality.describe(s)
    if workload != "command" or dig(s, ("steps", "total")):
        lines.append(f"steps     {dig(s, ('steps', 'total'))} total, {dig(s, ('steps', 'warmup'))} warm-up, "
                     f"{dig(s, ('steps', 'steady'))} steady")
    lines.append("")
    lines.append(blocks(s, workload))
    lines += curve_section(s)
    profile = phase_table(s)
    if profile:
        lines += ["", profile]
    stepped = bool(dig(s, ("steps", "total")))
    for precision in ("bf16", "fp8"):
        reason = dig(s, ("mfu", precision, "reason"))
        if (reason and stepped and dig(s, ("mfu", precision, "value")) is None
                and dig(rec, ("config", "workload")) != "serve"):
            lines.append(f"MFU ({precision}): n/a ({reason})")
    mbu = s.get("mbu") if isinstance(s.get("mbu"), dict) else {}
    if mbu.get("value") is None and mbu.get("achieved_tb_s") is not None:
        lines.append(f"MBU: n/a ({mbu.get('reason')})")
    for gpu, g in (s.get("gpu") or {}).items():
        lines.append(
            f"gpu {gpu}: power mean {quantity(dig(g, ('power_w', 'mean')), 'W')}, "
            f"max mem {quantity(g.get('mem_used_mb_max'), 'MiB', 'count')}, "
            f"util {fmt(g.get('util_gpu_mean'), kind='percent')}, "
            f"max temp {quantity(g.get('temp_c_max'), 'C', 'count')}"
        )
    wl = s.get("workload") or {}
    if "passed" in wl:
        bad = wl.get("mismatches") or []
        more = " ..." if len(bad) > 5 else ""
        detail = f" ({len(bad)} mismatched: {', '.join(bad[:5])}{more})" if bad else ""
        lines.append(f"validation: {'PASS' if wl['passed'] else 'FAIL'}{detail}")
        worst = max((t.get("max_rel") or 0.0 for t in wl.get("tensors") or []), default=None)
        if worst is not None:
            lines.append(f"  worst relative error {worst:.3e} (tolerance {wl.get('tolerance')})")
    lines += memory_section(s)
    for note in s.get("notes") or []:
        if note not in printed_notes:
            lines.append(f"note: {note}")
    output = rec.get("output") if isinstance(rec.get("output"), dict) else {}
    if workload == "command" and output.get("stdout_tail", "").strip():
        lines.append("stdout (last lines):")
        lines += [f"  | {ln}" for ln in output["stdout_tail"].strip().splitlines()[-5:]]
    not_kept = sum((output.get("lines_not_kept") or {}).values())
    if not_kept:
        lines.append(f"output: {not_kept} lines beyond the log rate were counted, not kept (tails are in the record)")
    err = rec.get("error")
    if err:
        lines.append(f"error: {err.get('message')}")
        tail = (err.get("stderr_tail") or "").strip().splitlines()[-8:]
        lines += [f"  | {ln}" for ln in tail]
    return "\n".join(lines)


def command_text(rec: dict[str, Any]) -> str:
    """A command run's argv as one copyable line (redacted as recorded), with its cwd and added variables."""
    import shlex

    opts = _options(rec)
    argv = opts.get("argv") if isinstance(opts.get("argv"), list) else dig(rec, ("config", "argv")) or []
    text = shlex.join(str(a) for a in argv)
    if opts.get("cwd"):
        text += f"   (in {opts['cwd']})"
    env = opts.get("env") if isinstance(opts.get("env"), dict) else {}
    if env:
        text += "   env: " + " ".join(f"{k}={v}" for k, v in env.items())
    if opts.get("parse"):
        text += f"   --parse {opts['parse']}"
    return text


def phase_table(summary: dict[str, Any]) -> str:
    """The power profile: one row per phase (energy from the counter, the power integral beside it); empty when
    the run has one phase and no energy."""
    rows_ = [p for p in summary.get("phases") or [] if isinstance(p, dict)]
    if not rows_ or (len(rows_) == 1 and rows_[0].get("energy_j") is None):
        return ""
    body = [[str(p.get("phase")), quantity(p.get("start_s"), "s"), quantity(p.get("duration_s"), "s"),
             quantity(p.get("energy_j"), "J"), quantity(p.get("energy_integrated_j"), "J"),
             quantity(p.get("power_w"), "W"), fmt(p.get("steps"), kind="count"), fmt(p.get("tokens"), kind="count"),
             quantity(p.get("joules_per_token"), "J/tok")] for p in rows_]
    return table(body, ["power profile (phase)", "from", "duration", "energy", "power integral", "mean power",
                        "steps", "tokens", "J/token"], left=(0,))


WIDTH = 120  #: tables fit this many columns unless told otherwise


def option_text(value: Any) -> str:
    """An option's value in a table: flags as on/off, None as ``unset``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "unset" if value is None else str(value)


def _options(rec: dict[str, Any]) -> dict[str, Any]:
    opts = dig(rec, ("config", "options"))
    return opts if isinstance(opts, dict) else {}


def differing_keys(recs: list[dict[str, Any]]) -> list[list[str]]:
    """Per run, the names of the options that tell it apart from the others of its workload: those whose value
    is not the same in every run of that workload here (declaration order). Empty for a workload with one run,
    or whose runs all have the same options."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(recs):
        groups.setdefault(str(dig(r, ("config", "workload"))), []).append(i)
    out: list[list[str]] = [[] for _ in recs]
    for members in groups.values():
        if len(members) < 2:
            continue
        names = list(dict.fromkeys(k for i in members for k in _options(recs[i])))
        keys = [k for k in names if len({option_text(_options(recs[i]).get(k)) for i in members}) > 1]
        for i in members:
            out[i] = keys
    return out


def differing_options(recs: list[dict[str, Any]]) -> list[str]:
    """Per run, ``k=v`` text of the options that differ between the runs of its workload (``differing_keys``);
    where none differ (one run of its workload, or repeats) the options set away from the defaults."""
    out = []
    for rec, keys in zip(recs, differing_keys(recs), strict=True):
        opts = _options(rec)
        out.append(" ".join(f"{k}={option_text(opts.get(k))}" for k in keys) if keys else key_options(rec))
    return out


def name_rows(recs: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """What names each run in a comparison, as rows (name, value per run): the workload where they differ, each
    option that differs between runs of a workload (blank for a run whose workload has not that option), and
    ``run`` (1, 2, ...) where that still leaves two runs alike (repeats)."""
    rows: list[tuple[str, list[str]]] = []
    if len({str(dig(r, ("config", "workload"))) for r in recs}) > 1:
        rows.append(("workload", [str(dig(r, ("config", "workload"))) for r in recs]))
    keys = differing_keys(recs)
    for k in dict.fromkeys(k for ks in keys for k in ks):
        rows.append((k, [option_text(_options(r).get(k)) if k in _options(r) else "" for r in recs]))
    names = [tuple(cells[i] for _, cells in rows) for i in range(len(recs))]
    if len(set(names)) < len(names):
        seen: dict[tuple[str, ...], int] = {}
        numbers = []
        for n in names:
            seen[n] = seen.get(n, 0) + 1
            numbers.append(str(seen[n]))
        rows.append(("run", numbers))
    return rows


def run_names(recs: list[dict[str, Any]], repeats: bool = True) -> list[str]:
    """Each run's name in a comparison: its ``name_rows`` cells as ``k=v`` text (``run 1`` when nothing differs);
    ``repeats=False``: a config's name, without the number that tells its repeats apart."""
    rows = [(k, cells) for k, cells in name_rows(recs) if repeats or k != "run"]
    out = []
    for i in range(len(recs)):
        parts = [f"{k}={cells[i]}" if k != "workload" else cells[i] for k, cells in rows if cells[i]]
        out.append(" ".join(parts) or f"run {i + 1}")
    return out


def row_label(fig: Figure, unit: str) -> str:
    """A figure's row name with its unit: ``step time p50 [ms]`` (a percentage or a bare number: no unit)."""
    return f"{fig.label} [{unit}]" if unit and unit != "%" else fig.label


def wrap_words(text: str, width: int, indent: str = "  ") -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` columns (continuations indented)."""
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = indent + word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines


def grid(head: list[list[str]], body: list[list[str]], width: int = WIDTH) -> tuple[str, int]:
    """Rows under a header of one or more rows: the first column left-aligned, the others right-aligned. Value
    columns that do not fit ``width`` wrap into further blocks, each repeating the first column. Returns the
    text and how many blocks it took."""
    rows = [*head, *body]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    blocks_: list[list[int]] = [[]]
    used = widths[0]
    for i in range(1, len(widths)):
        if blocks_[-1] and used + 2 + widths[i] > width:
            blocks_.append([])
            used = widths[0]
        blocks_[-1].append(i)
        used += 2 + widths[i]
    out: list[str] = []
    for n, cols in enumerate(blocks_):
        if n:
            out.append("")
            out.append(f"(continued: columns {cols[0]}-{cols[-1]} of {len(widths) - 1})" if len(cols) > 1
                       else f"(continued: column {cols[0]} of {len(widths) - 1})")
        for k, r in enumerate(rows):
            cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in cols]
            out.append("  ".join(cells).rstrip())
            if k == len(head) - 1:
                out.append("  ".join("-" * w for w in [widths[0], *(widths[i] for i in cols)]))
    return "\n".join(out), len(blocks_)


def compare(recs: list[dict[str, Any]], alpha: float = 0.05, width: int = WIDTH,
            max_ppl_delta: float = quality.MAX_DELTA) -> str:
    """Runs side by side (every registry figure any of them has), each column headed by the options that tell
    its run apart (run ids in a note below); deltas relative to the first; step-time differences tested
    against run-to-run noise; perplexity runs through the quality gate (``max_ppl_delta``) against the first.
    Columns that do not fit ``width`` wrap into further blocks."""
    names = name_rows(recs)
    head = [[k, *cells] for k, cells in names] or [["run", *(str(i + 1) for i in range(len(recs)))]]
    body = [["status", *(str(r["status"]) for r in recs)]]
    for fig, values in compared_rows(recs):
        div, unit = scale(values, fig.unit)
        cells = [fmt(values[0] / div if number(values[0]) else values[0], unit, fig.kind)]
        for v in values[1:]:
            d = relative_delta(values[0], v) if number(values[0]) and number(v) else None
            text = fmt(v / div if number(v) else v, unit, fig.kind)
            cells.append(text + (f" ({delta_text(d)})" if d is not None else ""))
        body.append([row_label(fig, unit), *cells])
    verdicts = run_level_verdicts(recs, alpha)
    body.append(["step time differs? (run-level)", "baseline", *(v["short"] for v in verdicts)])
    gates = gate_verdicts(recs, max_ppl_delta)
    if gates:
        body.append([f"perplexity gate (±{max_ppl_delta * 100:.3g}%)", "baseline",
                     *("pass" if ok else "refused" if msg.startswith("refused") else "FAIL" for ok, msg in gates)])
    text, _ = grid(head, body, width)
    notes = [f"step time differs?: the steady step time of each column's config against the first column's, "
             f"one p50 per run (repeats: --repeat N), Welch's t-test, α={alpha:g}, at least {MIN_EFFECT:.0%} "
             f"apart; with one run a side the noise is unknown."]
    labels = run_names(recs, repeats=False)
    detail = list(dict.fromkeys(f"{labels[i + 1]}: {v['text']}" for i, v in enumerate(verdicts)
                                if v["p"] is not None))
    if detail:
        notes.append("step time: " + "; ".join(detail) + ".")
    if gates:
        notes.append("perplexity gate: " + "; ".join(f"{labels[i + 1]}: {msg}" for i, (_, msg) in enumerate(gates))
                     + ".")
    notes.append("run ids, left to right: " + ", ".join(str(r["id"]) for r in recs) + ".")
    return "\n".join([text, "", *(ln for n in notes for ln in wrap_words(n, width))])


def gate_verdicts(recs: list[dict[str, Any]], max_delta: float = quality.MAX_DELTA) -> list[tuple[bool, str]]:
    """The quality gate (``tuner.quality.gate``) of each run after the first against the first, when the first is a
    perplexity run; empty otherwise."""
    if dig(recs[0], ("config", "workload")) != "perplexity":
        return []
    return [quality.gate(recs[0].get("summary") or {}, r.get("summary") or {}, max_delta) for r in recs[1:]]


def sweep_table(recs: list[dict[str, Any]], alpha: float = 0.05, width: int = WIDTH) -> str:
    """A sweep's runs, one row each, named by the options that differ between them, with the registry's
    headline figures (units on a second header line) and whether each config's step time differs from the
    first row's beyond run-to-run noise. Figure columns that do not fit ``width`` are left out, with a note."""
    names = name_rows(recs)
    verdicts = [{"short": "baseline", "text": "", "p": None}, *run_level_verdicts(recs, alpha)]
    lead = [["#", "", *(str(i + 1) for i in range(len(recs)))]]
    lead += [[k, "", *cells] for k, cells in names if k != "run"]
    if any(r["status"] != "ok" for r in recs):
        lead.append(["status", "", *(str(r["status"]) for r in recs)])
    figs: dict[str, tuple[Figure, list[Any]]] = {}
    for n, r in enumerate(recs):
        for f in headline_figures(r["summary"], dig(r, ("config", "workload"))):
            figs.setdefault(f.key, (f, [None] * len(recs)))[1][n] = f.value
    columns: list[list[str]] = []
    for fig, values in figs.values():
        if not any(number(v) for v in values):
            continue
        div, unit = scale(values, fig.unit)
        cells = [fmt(v / div if number(v) else v, unit, fig.kind) for v in values]
        columns.append([fig.short, f"[{unit}]" if unit and unit != "%" else "", *cells])
    tail = [["step vs #1", "", *(v["short"] for v in verdicts)]]

    def width_of(cols: list[list[str]]) -> int:
        return sum(max(len(c) for c in col) for col in cols) + 2 * (len(cols) - 1)

    dropped: list[str] = []
    while columns and width_of([*lead, *columns, *tail]) > width:
        dropped.insert(0, columns.pop()[0])
    cols = [*lead, *columns, *tail]
    widths = [max(len(c) for c in col) for col in cols]
    lines = []
    for k in range(len(recs) + 2):
        cells = [col[k].ljust(w) if i < len(lead) else col[k].rjust(w)
                 for i, (col, w) in enumerate(zip(cols, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if k == 1:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"step vs #1: each row's config against row 1's, one p50 per run (repeats: --repeat N), Welch's "
             f"t-test, α={alpha:g}, at least {MIN_EFFECT:.0%} apart; with one run a side the noise is unknown."]
    labels = run_names(recs, repeats=False)
    detail = list(dict.fromkeys(f"{labels[i]}: {v['text']}" for i, v in enumerate(verdicts) if v["p"] is not None))
    if detail:
        notes.append("step time: " + "; ".join(detail) + ".")
    if dropped:
        notes.append(f"left out to fit {width} columns: {', '.join(dropped)} (btune compare shows every figure).")
    notes.append("run ids: " + ", ".join(f"#{i + 1} {r['id']}" for i, r in enumerate(recs)) + ".")
    return "\n".join([*lines, "", *(ln for n in notes for ln in wrap_words(n, width))])


def _compared(recs: list[dict[str, Any]]) -> dict[str, tuple[Figure, list[Any]]]:
    """Each registry figure of any of the runs, with every run's value (None where a run has none)."""
    out: dict[str, tuple[Figure, list[Any]]] = {}
    for n, r in enumerate(recs):
        for f in figures(r["summary"], dig(r, ("config", "workload"))):
            if f.key not in out:
                out[f.key] = (f, [None] * len(recs))
            out[f.key][1][n] = f.value
    return out


def compared_rows(recs: list[dict[str, Any]]) -> list[tuple[Figure, list[Any]]]:
    """The figures compare shows: those at least one of the runs has a number for."""
    return [(f, v) for f, v in _compared(recs).values() if any(number(x) for x in v)]


MIN_EFFECT = 0.05  #: the smallest relative difference of run-level step times that compare calls real


def config_key(rec: dict[str, Any]) -> str:
    """What makes two runs repeats of one config: the workload and its options, the seed aside."""
    import orjson

    opts = {k: v for k, v in (dig(rec, ("config", "options")) or {}).items() if k != "seed"}
    return orjson.dumps([dig(rec, ("config", "workload")), opts], option=orjson.OPT_SORT_KEYS, default=str).decode()


def run_level_verdicts(recs: list[dict[str, Any]], alpha: float = 0.05,
                       min_effect: float = MIN_EFFECT) -> list[dict[str, Any]]:
    """For each run after the first: whether its config's steady step time (one p50 per run, over every run
    of that config among ``recs``) differs from the first run's config's beyond run-to-run noise.

    Each verdict has ``text``, ``short`` (a table cell), ``p`` (None when untested) and ``real`` (True, False,
    or None when the noise is unknown or the config is the baseline's own).
    """
    groups: dict[str, list[float]] = {}
    for r in recs:
        p50 = dig(r, ("summary", "step_ms", "p50"))
        groups.setdefault(config_key(r), [])
        if isinstance(p50, (int, float)) and r.get("status") in ("ok", "cancelled", "timeout"):
            groups[config_key(r)].append(float(p50))
    base_key = config_key(recs[0])
    out: list[dict[str, Any]] = []
    for r in recs[1:]:
        key = config_key(r)
        if key == base_key:
            out.append({"text": "same config as base", "short": "same config", "real": None, "p": None})
            continue
        res = run_level(groups[base_key], groups[key], alpha, min_effect)
        na, nb = res["n"]
        d = res["delta"]
        delta = delta_text(d) if d is not None else "-"
        if res["p"] is None:
            text, short = f"noise unknown: {na} vs {nb} runs (use --repeat)", f"noise unknown ({na} vs {nb})"
        elif res["real"]:
            text, short = f"real {delta} (p={res['p']:.2g}, {na} vs {nb} runs)", f"real {delta}"
        else:
            text, short = f"noise {delta} (p={res['p']:.2g}, {na} vs {nb} runs)", f"noise {delta}"
        out.append({"text": text, "short": short, "real": res["real"], "p": res["p"]})
    return out
