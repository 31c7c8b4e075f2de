"""``--dry-run``: print a workload's plan as JSON, with whether its memory estimate fits the GPU; allocates nothing."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

PlanFn = Callable[[dict[str, Any], str], dict[str, Any]]


def print_plan(opts: dict[str, Any], plan: PlanFn) -> int:
    """Resolve the device without touching the model, print ``plan(opts, device_type)``; 2 on a bad shape."""
    device_type, device_bytes, name = opts["device"], None, None
    try:
        import torch

        if device_type in ("auto", "cuda") and torch.cuda.is_available():
            device_type = "cuda"
            _free, device_bytes = torch.cuda.mem_get_info()
            name = torch.cuda.get_device_name()
        elif device_type == "auto":
            device_type = "cpu"
    except ImportError:
        device_type = "cpu" if device_type == "auto" else device_type
    try:
        p = plan(opts, device_type)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if device_bytes and "memory_estimate_bytes" in p:
        need = p["memory_estimate_bytes"]["total"]
        p["device"] = {"name": name, "memory_bytes": device_bytes, "fits": need < 0.95 * device_bytes,
                       "note": f"estimate {need / 2**30:.1f} GiB of {device_bytes / 2**30:.1f} GiB"}
    print(json.dumps(p, indent=2))
    return 0
