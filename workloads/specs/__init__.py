"""Declarations of every workload (torch-free): what the CLI, the TUI and validation read."""

from workloads.options import WorkloadSpec
from workloads.specs.dense import DENSE
from workloads.specs.moe import MOE
from workloads.specs.perplexity import PERPLEXITY
from workloads.specs.serve import SERVE
from workloads.specs.tp_validate import TP_VALIDATE

ALL: tuple[WorkloadSpec, ...] = (DENSE, TP_VALIDATE, MOE, SERVE, PERPLEXITY)
