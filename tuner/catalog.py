"""The workload registry: every declared workload, looked up by name with one-line errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from workloads.options import Option, OptionError, WorkloadSpec, parse_args, to_argv, validate
from workloads.options import build_parser as build_parser_for
from workloads.specs import ALL

WORKLOADS: dict[str, WorkloadSpec] = {spec.name: spec for spec in ALL}


def get(name: str) -> WorkloadSpec:
    """The workload named ``name``; OptionError naming the allowed ones otherwise."""
    try:
        return WORKLOADS[name]
    except KeyError:
        raise OptionError(f"unknown workload {name!r}; available: {', '.join(WORKLOADS)}") from None


def preset_value(spec: WorkloadSpec, opt: Option, values: Mapping[str, Any] | None = None) -> Any:
    """What ``opt`` left at its default resolves to under the preset in ``values`` (default: the workload's
    default preset), where its default means "the preset's"; None where it does not depend on the preset."""
    return spec.preset_defaults(values).get(opt.dest)


def default_text(spec: WorkloadSpec, opt: Option, values: Mapping[str, Any] | None = None) -> str:
    """``default 3``; for a default that means "the preset's", also what it resolves to:
    ``default 0 → 8 (preset tiny)``."""
    default = "unset" if opt.default is None else ("off" if opt.default is False else str(opt.default))
    resolved = preset_value(spec, opt, values)
    if resolved is None or resolved == opt.default:
        return f"default {default}"
    preset = (values or {}).get("preset") or spec.default_preset or spec.presets[0]
    return f"default {default} → {resolved} (preset {preset})"


__all__ = [
    "WORKLOADS", "Option", "OptionError", "WorkloadSpec", "build_parser_for", "default_text", "get", "parse_args",
    "preset_value", "to_argv", "validate",
]
