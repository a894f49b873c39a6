"""coopjax: Cooperative SGD in JAX.

Communication-efficient distributed SGD, A(τ, W, v) of Wang & Joshi (JMLR 2021),
as optax gradient transformations over a stacked worker axis.
"""

from coopjax import compress
from coopjax import cost
from coopjax import diagnostics
from coopjax import elastic
from coopjax import evaluation
from coopjax import live
from coopjax import mixing
from coopjax import theory
from coopjax import topology
from coopjax.algorithms import AdaCommState
from coopjax.algorithms import ChocoState
from coopjax.algorithms import CooperativeState
from coopjax.algorithms import CooperativeTransformation
from coopjax.algorithms import DelayedState
from coopjax.algorithms import DiLoCoState
from coopjax.algorithms import ErrorFeedbackState
from coopjax.algorithms import HierarchicalState
from coopjax.algorithms import MatchaDesign
from coopjax.algorithms import NonBlockingEASGDState
from coopjax.algorithms import OverlapState
from coopjax.algorithms import SlowMoState
from coopjax.algorithms import StreamingDiLoCoState
from coopjax.algorithms import TimeVaryingState
from coopjax.algorithms import adacomm
from coopjax.algorithms import choco
from coopjax.algorithms import cooperative
from coopjax.algorithms import delayed
from coopjax.algorithms import diloco
from coopjax.algorithms import dpsgd
from coopjax.algorithms import easgd
from coopjax.algorithms import elastic_averaging
from coopjax.algorithms import elastic_hierarchical
from coopjax.algorithms import hierarchical
from coopjax.algorithms import local_sgd
from coopjax.algorithms import matcha
from coopjax.algorithms import matcha_design
from coopjax.algorithms import nonblocking_easgd
from coopjax.algorithms import overlap_local_sgd
from coopjax.algorithms import settle_easgd
from coopjax.algorithms import settle_overlap
from coopjax.algorithms import slowmo
from coopjax.algorithms import step_count
from coopjax.algorithms import streaming_diloco
from coopjax.algorithms import sync_sgd
from coopjax.algorithms import time_varying
from coopjax.cost import netmodel
from coopjax.cost.pattern import CommPattern
from coopjax.cost.pattern import comm_pattern
from coopjax.cost.report import comm_report
from coopjax.diagnostics import consensus_distance
from coopjax.evaluation import evaluation_model
from coopjax.live import LiveMaskState
from coopjax.live import rejoin
from coopjax.live import set_live
from coopjax.live import with_live_mask
from coopjax.parallel import collectives
from coopjax.parallel import distributed
from coopjax.parallel import sharding
from coopjax.parallel.sharding import shard
from coopjax.parallel.sharding import shard_batch
from coopjax.parallel.sharding import unshard
from coopjax.parallel.sharding import worker_mesh
from coopjax.period import make_period_step
from coopjax.step import make_step
from coopjax.training import checkpoint
from coopjax.training import data
from coopjax.training import models
from coopjax.workers import WORKER_AXIS
from coopjax.workers import Layout
from coopjax.workers import average
from coopjax.workers import layout_of
from coopjax.workers import replicate
from coopjax.workers import stack
from coopjax.workers import worker

__version__ = "0.1.0"

__all__ = [
  "adacomm",
  "AdaCommState",
  "average",
  "checkpoint",
  "choco",
  "ChocoState",
  "collectives",
  "comm_pattern",
  "compress",
  "comm_report",
  "CommPattern",
  "consensus_distance",
  "cost",
  "cooperative",
  "CooperativeState",
  "CooperativeTransformation",
  "data",
  "delayed",
  "DelayedState",
  "diagnostics",
  "diloco",
  "DiLoCoState",
  "distributed",
  "dpsgd",
  "easgd",
  "elastic",
  "elastic_averaging",
  "elastic_hierarchical",
  "ErrorFeedbackState",
  "evaluation",
  "evaluation_model",
  "hierarchical",
  "Layout",
  "layout_of",
  "HierarchicalState",
  "live",
  "LiveMaskState",
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
  "rejoin",
  "replicate",
  "set_live",
  "settle_easgd",
  "settle_overlap",
  "shard",
  "shard_batch",
  "sharding",
  "slowmo",
  "SlowMoState",
  "stack",
  "step_count",
  "streaming_diloco",
  "StreamingDiLoCoState",
  "sync_sgd",
  "theory",
  "time_varying",
  "TimeVaryingState",
  "topology",
  "unshard",
  "worker",
  "with_live_mask",
  "WORKER_AXIS",
  "worker_mesh",
]
