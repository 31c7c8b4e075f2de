"""The search space: the knobs a workload declares tunable (``Option.tune``), narrowed or widened by ``--space``.

``--space NAME=V1,V2`` tunes NAME over those values, ``NAME=A..B`` over A, 2A, 4A, ... up to B (integers),
``NAME=V`` fixes it; options given on the command line are fixed and leave the space. A knob whose ``when``
does not hold under a setting (``--fp8-recipe`` with FP8 off) is dropped from that setting, so the settings are
distinct runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tuner.tune import TuneError
from workloads.options import Option, OptionError, Value, WorkloadSpec


@dataclass(frozen=True)
class Knob:
    """One tuned option (its dest name) and the values tried, in order."""

    name: str
    values: tuple[Value, ...]


def _range(opt: Option, text: str) -> tuple[Value, ...]:
    lo_txt, _, hi_txt = text.partition("..")
    if opt.type is not int:
        raise TuneError(f"--space {opt.dest}={text}: a range A..B is for integer options; list the values instead")
    lo, hi = opt.convert(lo_txt), opt.convert(hi_txt)
    assert isinstance(lo, int) and isinstance(hi, int)
    if lo < 1 or hi < lo:
        raise TuneError(f"--space {opt.dest}={text}: expected 1 <= A <= B (A, 2A, 4A, ... up to B)")
    out, v = [], lo
    while v <= hi:
        out.append(v)
        v *= 2
    return tuple(out)


def parse_space(spec: WorkloadSpec, texts: Sequence[str]) -> dict[str, tuple[Value, ...]]:
    """``--space`` items as ``{dest: values}``; TuneError (one line) for an unknown option or a bad value."""
    out: dict[str, tuple[Value, ...]] = {}
    for text in texts:
        name, sep, raw = text.partition("=")
        if not sep or not name.strip() or not raw.strip():
            raise TuneError(f"--space {text!r}: expected NAME=V1,V2 or NAME=A..B (e.g. batch_size=1..16)")
        try:
            opt = spec.option(name.strip().lstrip("-").replace("-", "_"))
            values = _range(opt, raw.strip()) if ".." in raw else tuple(opt.convert(v.strip()) for v in raw.split(","))
        except OptionError as exc:
            raise TuneError(f"--space {text}: {exc}") from None
        if opt.dest in out:
            raise TuneError(f"--space names {opt.dest} twice")
        out[opt.dest] = tuple(dict.fromkeys(values))  # order kept, repeats dropped
    return out


def declared(spec: WorkloadSpec) -> dict[str, tuple[Value, ...]]:
    """The knobs the workload declares tunable and their default values."""
    return {o.dest: o.tune for o in spec.all_options() if o.tune}


def build(spec: WorkloadSpec, fixed: Mapping[str, Any], given: Mapping[str, tuple[Value, ...]]) -> tuple[Knob, ...]:
    """The knobs to search: the declared ones not fixed on the command line, with ``given`` (``--space``) replacing
    or adding values; a knob with one value is not searched. TuneError when ``--space`` contradicts a fixed option
    or nothing is left to search."""
    clash = sorted(set(given) & set(fixed))
    if clash:
        raise TuneError(f"--space {clash[0]}: the option is also fixed on the command line "
                        f"(--{clash[0].replace('_', '-')} {fixed[clash[0]]}); give it in one place")
    space = {k: v for k, v in declared(spec).items() if k not in fixed}
    space.update(given)
    knobs = tuple(Knob(k, v) for k, v in space.items() if len(v) > 1 or (k in given and spec.option(k).when))
    if not any(len(k.values) > 1 for k in knobs):
        raise TuneError("empty space: no knob has two values to try (every tunable option is fixed or given one "
                        "value); widen it with --space NAME=V1,V2")
    return knobs


def fixed_by_space(spec: WorkloadSpec, knobs_given: Mapping[str, tuple[Value, ...]]) -> dict[str, Value]:
    """The ``--space`` items with one value: fixed options (but an option valid only under others' values, such as
    ``--fp8-recipe``, stays a one-value knob that a setting without FP8 drops)."""
    return {k: v[0] for k, v in knobs_given.items() if len(v) == 1 and not spec.option(k).when}


def applies(spec: WorkloadSpec, name: str, options: Mapping[str, Any]) -> bool:
    """Whether option ``name``'s ``when`` holds under ``options`` (defaults filled)."""
    opt = spec.option(name)
    merged = {**spec.defaults(), **options}
    return all(merged.get(other.replace("-", "_")) in allowed for other, allowed in opt.when)


def settings(spec: WorkloadSpec, fixed: Mapping[str, Any], knobs: Sequence[Knob]) -> list[dict[str, Value]]:
    """Every distinct setting (knob -> value) of the space: the product, each knob whose ``when`` does not hold
    under the rest dropped, duplicates removed, in product order."""
    out: dict[tuple[tuple[str, Value], ...], dict[str, Value]] = {}
    for combo in itertools.product(*(k.values for k in knobs)):
        setting = dict(zip((k.name for k in knobs), combo, strict=True))
        kept = {k: v for k, v in setting.items() if applies(spec, k, {**fixed, **setting})}
        out.setdefault(key(kept), kept)
    return list(out.values())


def key(setting: Mapping[str, Value]) -> tuple[tuple[str, Value], ...]:
    """A setting's identity (sorted items)."""
    return tuple(sorted(setting.items()))


def describe(setting: Mapping[str, Value]) -> str:
    """``batch_size=4 compile_mode=default`` (flags as their name or ``no-NAME``)."""
    parts = []
    for k, v in setting.items():
        if isinstance(v, bool):
            parts.append(k if v else f"no-{k}")
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts)
