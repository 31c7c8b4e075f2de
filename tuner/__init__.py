"""btune: a tuning console for GPU model workloads."""

__version__ = "0.1.0"
