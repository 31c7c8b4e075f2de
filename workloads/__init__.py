"""Workloads btune launches; each runs as `python -m workloads.NAME`."""
