"""Declarations of every workload (torch-free): what the CLI, the TUI and validation read."""

from workloads.options import WorkloadSpec
from workloads.specs.dense import DENSE

ALL: tuple[WorkloadSpec, ...] = (DENSE,)
