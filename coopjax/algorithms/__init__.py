"""Cooperative algorithms: factories returning optax gradient transformations.

One private module per family: ``_cooperative`` (A(τ, W, v) and its special cases),
``_nonblocking`` (reductions overlapped with the next period), ``_outer`` (SlowMo,
DiLoCo), ``_streaming`` (Streaming DiLoCo), ``_choco`` (CHOCO-SGD, compressed gossip), ``_compressed``
(error-feedback averaging for local SGD, DiLoCo and SlowMo with a compressor),
``_time_varying`` (cycled schedules, MATCHA), ``_adacomm`` (adaptive period)
and ``_hierarchical`` (group and global averaging). Every public name is
re-exported here and from :mod:`coopjax`.
"""

from coopjax.algorithms._adacomm import AdaCommState
from coopjax.algorithms._adacomm import adacomm
from coopjax.algorithms._choco import ChocoState
from coopjax.algorithms._choco import choco
from coopjax.algorithms._compressed import ErrorFeedbackState
from coopjax.algorithms._cooperative import CooperativeState
from coopjax.algorithms._cooperative import cooperative
from coopjax.algorithms._cooperative import dpsgd
from coopjax.algorithms._cooperative import easgd
from coopjax.algorithms._cooperative import elastic_averaging
from coopjax.algorithms._cooperative import elastic_hierarchical
from coopjax.algorithms._cooperative import find_state
from coopjax.algorithms._cooperative import local_sgd
from coopjax.algorithms._cooperative import step_count
from coopjax.algorithms._cooperative import sync_sgd
from coopjax.algorithms._hierarchical import HierarchicalState
from coopjax.algorithms._hierarchical import global_mean
from coopjax.algorithms._hierarchical import hierarchical
from coopjax.algorithms._nonblocking import OVERLAP_STATES
from coopjax.algorithms._nonblocking import DelayedState
from coopjax.algorithms._nonblocking import EarlyReduction
from coopjax.algorithms._nonblocking import NonBlockingEASGDState
from coopjax.algorithms._nonblocking import OverlapState
from coopjax.algorithms._nonblocking import StreamingDiLoCoState
from coopjax.algorithms._nonblocking import delayed
from coopjax.algorithms._nonblocking import issued_early
from coopjax.algorithms._nonblocking import nonblocking_easgd
from coopjax.algorithms._nonblocking import overlap_local_sgd
from coopjax.algorithms._nonblocking import overlap_states
from coopjax.algorithms._nonblocking import settle_easgd
from coopjax.algorithms._nonblocking import settle_overlap
from coopjax.algorithms._outer import BASE_BUFFERS
from coopjax.algorithms._outer import DiLoCoState
from coopjax.algorithms._outer import SlowMoState
from coopjax.algorithms._outer import diloco
from coopjax.algorithms._outer import slowmo
from coopjax.algorithms._skeleton import CooperativeTransformation
from coopjax.algorithms._streaming import fragment_leaves
from coopjax.algorithms._streaming import streaming_diloco
from coopjax.algorithms._streaming import streaming_syncs
from coopjax.algorithms._time_varying import MatchaDesign
from coopjax.algorithms._time_varying import TimeVaryingState
from coopjax.algorithms._time_varying import matcha
from coopjax.algorithms._time_varying import matcha_design
from coopjax.algorithms._time_varying import matcha_flags
from coopjax.algorithms._time_varying import time_varying

__all__ = [
  "adacomm",
  "AdaCommState",
  "BASE_BUFFERS",
  "choco",
  "ChocoState",
  "cooperative",
  "CooperativeState",
  "CooperativeTransformation",
  "delayed",
  "DelayedState",
  "diloco",
  "DiLoCoState",
  "dpsgd",
  "EarlyReduction",
  "ErrorFeedbackState",
  "easgd",
  "elastic_averaging",
  "elastic_hierarchical",
  "find_state",
  "fragment_leaves",
  "global_mean",
  "hierarchical",
  "HierarchicalState",
  "issued_early",
  "local_sgd",
  "matcha",
  "matcha_design",
  "matcha_flags",
  "MatchaDesign",
  "nonblocking_easgd",
  "NonBlockingEASGDState",
  "overlap_local_sgd",
  "OVERLAP_STATES",
  "overlap_states",
  "OverlapState",
  "settle_easgd",
  "settle_overlap",
  "slowmo",
  "SlowMoState",
  "step_count",
  "streaming_diloco",
  "streaming_syncs",
  "StreamingDiLoCoState",
  "sync_sgd",
  "time_varying",
  "TimeVaryingState",
]
