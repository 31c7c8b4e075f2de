"""``btune bench``: continuous benchmarking (jobs from a TOML file, a SQLite history, regression detection).

config: the TOML file as frozen dataclasses, every job validated before any runs; history: the SQLite file;
detect: the baseline rule, the change-point rule and missing-data alerts; report: markdown and JSON;
run: one round from start to end.
"""

from __future__ import annotations


class BenchError(Exception):
    """A bench that cannot run as asked (bad config, unusable history); the message is one line."""
