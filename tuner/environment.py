"""What a run ran on: host, Python, library versions, GPUs. Never a dump of environment variables."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
from collections.abc import Mapping
from typing import Any

from tuner import __version__

#: Distributions whose versions a record names (import name in parentheses is not needed).
_VERSIONED = ("torch", "transformer-engine", "transformer_engine", "torchao", "numpy", "textual", "nvidia-ml-py")
#: The only environment variables recorded: they change what a run does and hold no secrets.
_SAFE_ENV = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "TORCH_COMPILE_DEBUG")


def package_version(name: str) -> str | None:
    """An installed distribution's version, without importing it."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect(gpu_inventory: dict[str, Any] | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The environment block of a run record; ``env``: the run's environment (default btune's)."""
    environ = os.environ if env is None else env
    versions = {name: package_version(name) for name in _VERSIONED}
    te = versions.pop("transformer_engine") or versions.get("transformer-engine")
    versions["transformer-engine"] = te
    env: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "btune": __version__,
        "versions": versions,
        "env": {k: environ[k] for k in _SAFE_ENV if k in environ},
    }
    inv = gpu_inventory or {}
    env["gpus"] = inv.get("devices", [])
    env["gpu_count"] = len(env["gpus"])
    env["driver"] = inv.get("driver_version")
    env["nvml"] = inv.get("nvml_version")
    env["cuda_driver"] = inv.get("cuda_driver_version")
    if not inv.get("available", False):
        env["gpu_note"] = inv.get("reason") or inv.get("note") or "no GPU inventory"
    return env
