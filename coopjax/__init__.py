"""coopjax: Cooperative SGD in JAX.

Communication-efficient distributed SGD, A(τ, W, v) of Wang & Joshi (JMLR 2021),
as optax gradient transformations over a stacked worker axis.
"""

from coopjax import checkpoint
from coopjax import collectives
from coopjax import data
from coopjax import diagnostics
from coopjax import distributed
from coopjax import mixing
from coopjax import models
from coopjax import netmodel
from coopjax import sharding
from coopjax import theory
from coopjax import topology
from coopjax.adaptive_period import AdaCommState
from coopjax.adaptive_period import adacomm
from coopjax.algorithms import CooperativeState
from coopjax.algorithms import cooperative
from coopjax.algorithms import dpsgd
from coopjax.algorithms import easgd
from coopjax.algorithms import elastic_averaging
from coopjax.algorithms import elastic_hierarchical
from coopjax.algorithms import local_sgd
from coopjax.algorithms import step_count
from coopjax.algorithms import sync_sgd
from coopjax.comm import comm_report
from coopjax.dynamic_topology import MatchaDesign
from coopjax.dynamic_topology import TimeVaryingState
from coopjax.dynamic_topology import matcha
from coopjax.dynamic_topology import matcha_design
from coopjax.dynamic_topology import time_varying
from coopjax.hierarchy import HierarchicalState
from coopjax.hierarchy import hierarchical
from coopjax.nonblocking import DelayedState
from coopjax.nonblocking import NonBlockingEASGDState
from coopjax.nonblocking import OverlapState
from coopjax.nonblocking import delayed
from coopjax.nonblocking import nonblocking_easgd
from coopjax.nonblocking import overlap_local_sgd
from coopjax.nonblocking import settle_easgd
from coopjax.nonblocking import settle_overlap
from coopjax.outer import DiLoCoState
from coopjax.outer import SlowMoState
from coopjax.outer import diloco
from coopjax.outer import slowmo
from coopjax.period import CommPattern
from coopjax.period import comm_pattern
from coopjax.period import make_period_step
from coopjax.sharding import shard
from coopjax.sharding import shard_batch
from coopjax.sharding import unshard
from coopjax.sharding import worker_mesh
from coopjax.step import make_step
from coopjax.workers import WORKER_AXIS
from coopjax.workers import average
from coopjax.workers import consensus_distance
from coopjax.workers import replicate
from coopjax.workers import stack
from coopjax.workers import worker

__version__ = "0.1.0"

__all__ = [
  "adacomm",
  "AdaCommState",
  "average",
  "checkpoint",
  "collectives",
  "comm_pattern",
  "comm_report",
  "CommPattern",
  "consensus_distance",
  "cooperative",
  "CooperativeState",
  "data",
  "delayed",
  "DelayedState",
  "diagnostics",
  "diloco",
  "DiLoCoState",
  "distributed",
  "dpsgd",
  "easgd",
  "elastic_averaging",
  "elastic_hierarchical",
  "hierarchical",
  "HierarchicalState",
  "local_sgd",
  "make_period_step",
  "make_step",
  "matcha",
  "matcha_design",
  "MatchaDesign",
  "mixing",
  "models",
  "netmodel",
  "nonblocking_easgd",
  "NonBlockingEASGDState",
  "overlap_local_sgd",
  "OverlapState",
  "replicate",
  "settle_easgd",
  "settle_overlap",
  "shard",
  "shard_batch",
  "sharding",
  "slowmo",
  "SlowMoState",
  "stack",
  "step_count",
  "sync_sgd",
  "theory",
  "time_varying",
  "TimeVaryingState",
  "topology",
  "unshard",
  "worker",
  "WORKER_AXIS",
  "worker_mesh",
]
