"""The workload registry: every declared workload, looked up by name with one-line errors."""

from __future__ import annotations

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


__all__ = [
    "WORKLOADS", "Option", "OptionError", "WorkloadSpec", "build_parser_for", "get", "parse_args", "to_argv",
    "validate",
]
