"""The serving engine behind ``workloads.serve``: load generator, requests, scheduler, KV-cache engine, metrics.

Torch-free modules: ``loadgen``, ``request``, ``scheduler``, ``metrics``, ``driver``. Torch: ``cache``,
``forward``, ``engine``.
"""
