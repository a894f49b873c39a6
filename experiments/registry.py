r"""Algorithm registry: a name and a config give the transformation and its communication.

Every entry of :data:`ALGORITHMS` maps a name to a builder
``build(config, local, lr, mix_mask) -> Algorithm``. The :class:`Algorithm`
holds the optax transformation, the number of auxiliary rows v of X, and a
host-side description of what each step communicates, so that the training
loop can price it with the α–β model of :mod:`coopjax.netmodel`:

.. math::

   T_{\text{mix}} = r\,\alpha + \nu\, B\, \beta, \qquad \text{bytes sent per worker} = \nu B,

with r the sequential message rounds, ν the model-sized payloads each worker
sends (:class:`coopjax.CommPattern`: ring all-reduce ``r = 2(m−1)``,
``ν = 2(m−1)/m``; neighbour exchange with Δ peers ``r = ν = Δ``), B the
model's bytes, α the latency and β = 1/bandwidth.

Config fields read (see ``experiments/configs/default.py``): ``num_workers``,
``tau``, ``alpha``, ``topology``, ``erdos_renyi_p``, ``order``,
``local_state_policy``, ``tau2``, ``num_groups``, ``slow_lr``,
``slow_momentum``, ``outer_optimizer``, ``matcha_budget``,
``anchor_momentum``, ``max_tau``, ``seed``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import numpy as np
import optax

import coopjax
from coopjax import topology

__all__ = [
  "Algorithm",
  "Comm",
  "ALGORITHMS",
  "ALIASES",
  "TOPOLOGIES",
  "build",
  "make_topology",
  "names",
]

PyTree = Any

#: Topology names accepted by ``config.topology``.
TOPOLOGIES = ("complete", "ring", "torus", "hypercube", "exponential", "erdos_renyi", "independent")


class Comm(NamedTuple):
  """One communication event: ``rounds`` latency terms and ``volume`` model-sized payloads."""

  rounds: float
  volume: float


NO_COMM = Comm(0.0, 0.0)


class Algorithm(NamedTuple):
  """A built algorithm.

  Attributes:
    name: registry name.
    tx: the coopjax optax transformation.
    num_aux: v, auxiliary rows of X (``coopjax.replicate(p, m, num_aux)``).
    comm: ``comm(k, opt_state) -> Comm``: what step k (counted from 1)
      communicates, ``opt_state`` being the state after step k; ``NO_COMM``
      when the step does not mix.
    overlap: whether a mix runs during the following local steps
      (non-blocking; :func:`coopjax.netmodel.modelled_wallclock` ``overlap=``).
    settle: ``settle(X, opt_state) -> X`` completing pending communication
      before evaluation (non-blocking algorithms), or None.
  """

  name: str
  tx: optax.GradientTransformation
  num_aux: int
  comm: Callable[[int, Any], Comm]
  overlap: bool = False
  settle: Callable[[PyTree, Any], PyTree] | None = None


def _all_reduce(m: int) -> Comm:
  return Comm(2.0 * (m - 1), 2.0 * (m - 1) / m) if m > 1 else NO_COMM


def _pattern_comm(pattern) -> Comm:
  return Comm(float(pattern.rounds), float(pattern.volume))


def _every(tau: int, comm: Comm) -> Callable[[int, Any], Comm]:
  return lambda k, _state: comm if k % tau == 0 else NO_COMM


def make_topology(name: str, m: int, *, p: float = 0.5, seed: int = 0) -> np.ndarray:
  """The m × m mixing matrix of a named topology (see :data:`TOPOLOGIES`)."""
  if name == "complete":
    return topology.complete(m)
  if name == "ring":
    return topology.ring(m)
  if name == "torus":
    rows = int(math.isqrt(m))
    while m % rows:
      rows -= 1
    if rows < 2:
      raise ValueError(f"topology 'torus' needs m = r·c with r, c >= 2; m={m} is prime or < 4.")
    return topology.torus(rows, m // rows)
  if name == "hypercube":
    return topology.hypercube(m)
  if name == "exponential":
    return topology.exponential(m)
  if name == "erdos_renyi":
    return topology.erdos_renyi(m, p, seed=seed)
  if name == "independent":
    return topology.independent(m)
  raise ValueError(f"unknown topology {name!r}; expected one of {TOPOLOGIES}.")


def _groups(m: int, num_groups: int) -> list[list[int]]:
  if num_groups < 1 or m % num_groups:
    raise ValueError(
      f"num_groups={num_groups} must be >= 1 and divide num_workers={m} (equal groups)."
    )
  size = m // num_groups
  return [list(range(g * size, (g + 1) * size)) for g in range(num_groups)]


def _coop_kwargs(fn, config, mix_mask) -> dict:
  """``order``, ``local_state_policy`` and ``mix_mask`` where ``fn`` accepts them."""
  params = inspect.signature(fn).parameters
  out = {}
  if "order" in params:
    out["order"] = config.order
  if "local_state_policy" in params:
    out["local_state_policy"] = config.local_state_policy
  if mix_mask is not None and "mix_mask" in params:
    out["mix_mask"] = mix_mask
  return out


def _sync(config, local, lr, mix_mask):
  m = config.num_workers
  tx = coopjax.sync_sgd(local, m, **_coop_kwargs(coopjax.cooperative, config, mix_mask))
  return Algorithm("sync_sgd", tx, 0, _every(1, _all_reduce(m)))


def _local_sgd(config, local, lr, mix_mask):
  m, tau = config.num_workers, config.tau
  tx = coopjax.local_sgd(local, tau, m, **_coop_kwargs(coopjax.cooperative, config, mix_mask))
  return Algorithm("local_sgd", tx, 0, _every(tau, _all_reduce(m)))


def _easgd(config, local, lr, mix_mask):
  m, tau = config.num_workers, config.tau
  kw = _coop_kwargs(coopjax.cooperative, config, mix_mask)
  tx = coopjax.easgd(local, tau, config.alpha, m, **kw)
  return Algorithm("easgd", tx, 1, _every(tau, _all_reduce(m)))


def _graph(config) -> np.ndarray:
  return make_topology(
    config.topology, config.num_workers, p=config.erdos_renyi_p, seed=config.seed
  )


def _dpsgd(config, local, lr, mix_mask):
  W = _graph(config)
  tx = coopjax.dpsgd(local, W, **_coop_kwargs(coopjax.cooperative, config, mix_mask))
  pattern = coopjax.comm_pattern(tx)
  return Algorithm("dpsgd", tx, 0, _every(1, _pattern_comm(pattern)))


def _cooperative(config, local, lr, mix_mask):
  W, tau = _graph(config), config.tau
  tx = coopjax.cooperative(local, tau, W, **_coop_kwargs(coopjax.cooperative, config, mix_mask))
  pattern = coopjax.comm_pattern(tx)
  return Algorithm("cooperative", tx, 0, _every(tau, _pattern_comm(pattern)))


def _elastic_averaging(config, local, lr, mix_mask):
  W, tau = _graph(config), config.tau
  kw = _coop_kwargs(coopjax.cooperative, config, mix_mask)
  tx = coopjax.elastic_averaging(local, W, config.alpha, tau, **kw)
  pattern = coopjax.comm_pattern(tx)
  return Algorithm("elastic_averaging", tx, 1, _every(tau, _pattern_comm(pattern)))


def _elastic_hierarchical(config, local, lr, mix_mask):
  m, tau = config.num_workers, config.tau
  groups = _groups(m, config.num_groups)
  kw = _coop_kwargs(coopjax.cooperative, config, mix_mask)
  tx = coopjax.elastic_hierarchical(local, tau, groups, config.alpha, **kw)
  # Each group's workers all-reduce their sum for their group's anchor; the
  # anchors then mix with W_aux (complete by default): one all-reduce over groups.
  size = len(groups[0])
  group, anchors = _all_reduce(size), _all_reduce(len(groups))
  comm = Comm(group.rounds + anchors.rounds, group.volume + anchors.volume)
  return Algorithm("elastic_hierarchical", tx, len(groups), _every(tau, comm))


def _nonblocking_easgd(config, local, lr, mix_mask):
  m, tau, a = config.num_workers, config.tau, config.alpha
  tx = coopjax.nonblocking_easgd(local, tau, a, m)
  return Algorithm(
    "nonblocking_easgd",
    tx,
    1,
    _every(tau, _all_reduce(m)),
    overlap=True,
    settle=lambda X, s: coopjax.settle_easgd(X, s, a),
  )


def _overlap_local_sgd(config, local, lr, mix_mask):
  m, tau, a, beta = config.num_workers, config.tau, config.alpha, config.anchor_momentum
  tx = coopjax.overlap_local_sgd(local, tau, a, m, anchor_momentum=beta, lr=lr)
  return Algorithm(
    "overlap_local_sgd",
    tx,
    1,
    _every(tau, _all_reduce(m)),
    overlap=True,
    settle=lambda X, s: coopjax.settle_overlap(X, s),
  )


def _delayed(config, local, lr, mix_mask):
  W, tau = _graph(config), config.tau
  tx = coopjax.delayed(local, tau, W)
  pattern = coopjax.comm_pattern(tx)
  return Algorithm("delayed", tx, 0, _every(tau, _pattern_comm(pattern)), overlap=True)


def _slowmo(config, local, lr, mix_mask):
  m, tau = config.num_workers, config.tau
  tx = coopjax.slowmo(local, tau, m, config.slow_lr, config.slow_momentum, lr)
  return Algorithm("slowmo", tx, 0, _every(tau, _all_reduce(m)))


def _diloco(config, local, lr, mix_mask):
  m, tau = config.num_workers, config.tau
  outer = optax.sgd(config.slow_lr, momentum=config.slow_momentum or None, nesterov=True)
  if config.outer_optimizer == "sgd":
    outer = optax.sgd(config.slow_lr, momentum=config.slow_momentum or None)
  elif config.outer_optimizer != "nesterov":
    raise ValueError(
      f"outer_optimizer must be 'nesterov' or 'sgd', got {config.outer_optimizer!r}."
    )
  tx = coopjax.diloco(local, outer, tau, m)
  return Algorithm("diloco", tx, 0, _every(tau, _all_reduce(m)))


def _time_varying(config, local, lr, mix_mask):
  m, tau = config.num_workers, config.tau
  period = topology.one_peer_exponential_period(m)
  schedule = [topology.one_peer_exponential(m, r) for r in range(period)]
  kw = _coop_kwargs(coopjax.time_varying, config, mix_mask)
  tx = coopjax.time_varying(local, tau, schedule, **kw)
  # One-peer exponential graph: every worker sends to one peer per mix.
  return Algorithm("time_varying", tx, 0, _every(tau, Comm(1.0, 1.0) if m > 1 else NO_COMM))


def _matcha(config, local, lr, mix_mask):
  from coopjax.algorithms._time_varying import matcha_flags

  m = config.num_workers
  graph = _graph(config)
  design = coopjax.matcha_design(graph, config.matcha_budget)
  key = jax.random.key(config.seed)
  kw = _coop_kwargs(coopjax.matcha, config, mix_mask)
  tx = coopjax.matcha(local, graph, config.matcha_budget, m, key, **kw)
  probabilities = np.asarray(design.probabilities)

  def comm(k, _state):
    # Each active matching is one exchange with one peer (Wang et al., 2019).
    active = float(np.sum(np.asarray(matcha_flags(key, k, probabilities))))
    return Comm(active, active)

  return Algorithm("matcha", tx, 0, comm)


def _adacomm(config, local, lr, mix_mask):
  m = config.num_workers
  lr_schedule = lr if callable(lr) else None
  kw = _coop_kwargs(coopjax.adacomm, config, mix_mask)
  tx = coopjax.adacomm(
    local, config.tau, m, lr_schedule=lr_schedule, max_tau=config.max_tau or None, **kw
  )
  reduce = _all_reduce(m)

  def comm(k, state):
    return reduce if int(state.last_mix) == k else NO_COMM

  return Algorithm("adacomm", tx, 0, comm)


def _hierarchical(config, local, lr, mix_mask):
  m, tau1, tau2 = config.num_workers, config.tau, config.tau2
  groups = _groups(m, config.num_groups)
  kw = _coop_kwargs(coopjax.hierarchical, config, mix_mask)
  tx = coopjax.hierarchical(local, tau1, tau2, groups, **kw)
  full, group = _all_reduce(m), _all_reduce(len(groups[0]))

  def comm(k, _state):
    if k % tau2 == 0:
      return full
    return group if k % tau1 == 0 else NO_COMM

  return Algorithm("hierarchical", tx, 0, comm)


#: name → builder(config, local, lr, mix_mask) -> Algorithm.
ALGORITHMS: dict[str, Callable[..., Algorithm]] = {
  "sync_sgd": _sync,
  "local_sgd": _local_sgd,
  "easgd": _easgd,
  "dpsgd": _dpsgd,
  "cooperative": _cooperative,
  "elastic_averaging": _elastic_averaging,
  "elastic_hierarchical": _elastic_hierarchical,
  "nonblocking_easgd": _nonblocking_easgd,
  "overlap_local_sgd": _overlap_local_sgd,
  "delayed": _delayed,
  "slowmo": _slowmo,
  "diloco": _diloco,
  "time_varying": _time_varying,
  "matcha": _matcha,
  "adacomm": _adacomm,
  "hierarchical": _hierarchical,
}

#: Short names accepted as well.
ALIASES = {"sync": "sync_sgd", "pasgd": "local_sgd", "periodic": "local_sgd", "d-psgd": "dpsgd"}


def names() -> tuple[str, ...]:
  """Registered algorithm names."""
  return tuple(ALGORITHMS)


def build(config, local: optax.GradientTransformation, lr, mix_mask=None) -> Algorithm:
  """Builds ``config.algorithm`` with ``local`` as each worker's optimizer.

  Args:
    config: the run's config (``ml_collections.ConfigDict``).
    local: the local optax optimizer.
    lr: the learning rate (a float or an optax schedule of the step count);
      algorithms whose outer update needs it (SlowMo, Overlap Local-SGD,
      AdaComm) receive it.
    mix_mask: optional pytree prefix of one model selecting the mixed leaves
      (e.g. :func:`coopjax.models.params_mask` to keep BatchNorm statistics
      local), passed to the algorithms that accept it.

  Returns:
    An :class:`Algorithm`.
  """
  name = ALIASES.get(config.algorithm, config.algorithm)
  if name not in ALGORITHMS:
    raise ValueError(
      f"unknown algorithm {config.algorithm!r}; expected one of {names()} "
      f"(or aliases {tuple(ALIASES)})."
    )
  return ALGORITHMS[name](config, local, lr, mix_mask)
