"""An emulated cluster on one machine (network namespaces, veth links, tbf rates); see emulate.py."""

from benchmarks.cluster.emulate import PREFIX
from benchmarks.cluster.emulate import Cluster
from benchmarks.cluster.emulate import ClusterError
from benchmarks.cluster.emulate import NodeResult
from benchmarks.cluster.emulate import check_environment
from benchmarks.cluster.emulate import cleanup
from benchmarks.cluster.emulate import leftovers
from benchmarks.cluster.emulate import parse_rate

__all__ = [
  "PREFIX",
  "Cluster",
  "ClusterError",
  "NodeResult",
  "check_environment",
  "cleanup",
  "leftovers",
  "parse_rate",
]
