r"""Diagnostics of a run: how far the models are apart, and which worker diverged.

How far apart: :func:`consensus_distance`, ``‖X(I − J)‖²_F`` over the mixed
leaves, also inside a sharded step. Divergence detection: which worker went
non-finite, at which step, and what to do.

A NaN or Inf in one worker's loss, gradient or model spreads to every model it
is mixed with: after step k with :math:`k \bmod \tau = 0`,

.. math::

   x_i^{(k+1)} = \sum_j W_{ji}\,\bigl(x_j^{(k)} - \eta g_j^{(k)}\bigr)

is non-finite for every i with :math:`W_{ji} \ne 0`. So the culprit is named
from the *inputs* of the step, which are per worker:

.. math::

   \text{nonfinite\_workers}_i = \lnot\,\text{finite}(\ell_i)
   \lor \lnot\,\text{finite}(g_i) \lor \lnot\,\text{finite}(x_i^{(k)}),
   \qquad i = 1..m,

and the outcome from the rows of :math:`X_{k+1}` (``nonfinite_rows``, length
m + v), which also catches an optimizer that overflows from finite gradients.
Each flag is a reduction within one row, so on a worker-sharded X it is
computed where the row lives; only the ``[m]`` and ``[m + v]`` booleans leave
the devices.

``coopjax.make_step(..., check_finite=True)`` adds both flags to the metrics;
:func:`check_finite` on the host raises :class:`DivergenceError` naming the
workers and the step. :data:`POLICIES` are what a training loop does then:

* ``"stop"`` (default): raise, stop cleanly; the last checkpoint was written
  before the bad step, so it is the last good state.
* ``"quarantine"``: mask the failing worker out inside the step and go on
  with the others (``coopjax.make_step(..., on_nonfinite="quarantine")`` on a
  transformation built with :func:`coopjax.with_live_mask`; see
  :mod:`coopjax.live`).
* ``"skip"``: discard the step (keep the previous X and optimizer state, so the
  step counter k does not advance) and go on with the next batch. Wrap the
  step with :func:`skip_nonfinite` so the choice happens inside the jitted
  step and works with donated buffers.

  >>> import jax.numpy as jnp, optax, coopjax
  >>> from coopjax import diagnostics
  >>> tx = coopjax.local_sgd(optax.sgd(0.1), tau=2, num_workers=3)
  >>> X = coopjax.replicate({"w": jnp.zeros(2)}, 3)
  >>> loss = lambda p, b: jnp.mean((b @ p["w"] - 1.0) ** 2)
  >>> step = coopjax.make_step(loss, tx, check_finite=True)
  >>> batch = jnp.ones((3, 4, 2)).at[1, 0, 0].set(jnp.nan)  # worker 1 reads a NaN
  >>> X, state, metrics = step(X, tx.init(X), batch)
  >>> metrics["nonfinite_workers"].tolist()
  [False, True, False]
  >>> diagnostics.check_finite(metrics)
  Traceback (most recent call last):
  ...
  coopjax.diagnostics.DivergenceError: non-finite values at step 1 on worker(s) [1] ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from coopjax import mixing
from coopjax.parallel import context
from coopjax.workers import num_rows
from coopjax.workers import sum_rows

PyTree = Any

__all__ = [
  "POLICIES",
  "DivergenceError",
  "check_policy",
  "nonfinite_rows",
  "finite_metrics",
  "check_finite",
  "skip_nonfinite",
  "consensus_distance",
]

POLICIES = ("stop", "skip", "quarantine")
"""What to do on a non-finite step: stop the run, skip the step, or quarantine the worker."""


class DivergenceError(FloatingPointError):
  """A worker's loss, gradient or model became NaN or infinite.

  Attributes:
    step: the step k at which it happened (None if unknown).
    workers: indices of the workers whose loss, gradient or model was non-finite.
    rows: rows of X (workers then auxiliaries) non-finite after the step.

  Examples:
    >>> import numpy as np
    >>> metrics = {"nonfinite_workers": np.array([False, True]), "step": np.array(7)}
    >>> try:
    ...   check_finite(metrics)
    ... except DivergenceError as e:
    ...   print(e.step, e.workers, e.rows)
    7 [1] []
  """

  def __init__(self, message: str, step: int | None, workers: list[int], rows: list[int]):
    super().__init__(message)
    self.step = step
    self.workers = workers
    self.rows = rows


def check_policy(policy) -> str:
  """Validates a divergence policy name (``"stop"`` or ``"skip"``).

  Examples:
    >>> check_policy("skip")
    'skip'
    >>> check_policy("retry")
    Traceback (most recent call last):
    ...
    ValueError: on-divergence policy must be one of ('stop', 'skip', 'quarantine'), got 'retry': ...
  """
  if policy not in POLICIES:
    raise ValueError(
      f"on-divergence policy must be one of {POLICIES}, got {policy!r}: 'stop' ends the run "
      "keeping the last good checkpoint, 'skip' discards the step and continues, 'quarantine' "
      "masks the failing worker out and the others go on (coopjax.with_live_mask)."
    )
  return policy


def nonfinite_rows(tree: PyTree, num_rows: int | None = None) -> jax.Array:
  """Per-row flag: True where any entry of any floating leaf is NaN or infinite.

  Args:
    tree: a pytree whose leaves share a leading (row) axis, e.g. X or the gradients.
    num_rows: only the first ``num_rows`` rows (default all).

  Returns:
    Boolean ``[rows]``. Integer leaves (counters) are ignored.

  Examples:
    >>> import jax.numpy as jnp
    >>> X = {"w": jnp.array([[0.0, 1.0], [jnp.nan, 0.0], [1.0, jnp.inf]]),
    ...      "count": jnp.zeros(3, jnp.int32)}
    >>> nonfinite_rows(X).tolist()
    [False, True, True]
    >>> nonfinite_rows(X, num_rows=2).tolist()
    [False, True]
  """
  flags = []
  for x in jax.tree.leaves(tree):
    x = jnp.asarray(x)
    if x.ndim == 0:
      raise ValueError(
        f"nonfinite_rows needs a leading row axis on every leaf, got a scalar {x.dtype} leaf."
      )
    if num_rows is not None:
      x = x[:num_rows]
    if jnp.issubdtype(x.dtype, jnp.inexact):
      flags.append(jnp.any(~jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1))
  if not flags:
    raise ValueError("nonfinite_rows found no floating-point leaves to check.")
  return jnp.any(jnp.stack(flags), axis=0)


def finite_metrics(losses, grads: PyTree, X_before: PyTree, X_after: PyTree) -> dict:
  """The step's divergence flags (jit-safe; row-local reductions).

  Args:
    losses: per-worker losses ``[m]`` at step k.
    grads: per-worker gradients (leading axis m).
    X_before: ``X_k`` (leading axis ``m + v``; its first m rows are checked).
    X_after: ``X_{k+1}``.

  Returns:
    ``{"nonfinite_workers": bool [m], "nonfinite_rows": bool [m + v]}``.

  Examples:
    Three workers and an anchor (row 3); worker 2's loss is infinite and the
    update spread it to the anchor:

    >>> import jax.numpy as jnp
    >>> losses = jnp.array([0.5, 0.4, jnp.inf])
    >>> grads = jnp.zeros((3, 2))
    >>> X_before = jnp.zeros((4, 2))
    >>> X_after = X_before.at[2:].set(jnp.nan)
    >>> flags = finite_metrics(losses, grads, X_before, X_after)
    >>> flags["nonfinite_workers"].tolist(), flags["nonfinite_rows"].tolist()
    ([False, False, True], [False, False, True, True])
  """
  losses = jnp.asarray(losses)
  m = losses.shape[0]
  workers = ~jnp.isfinite(losses)
  workers = workers | nonfinite_rows(grads, m) | nonfinite_rows(X_before, m)
  return {"nonfinite_workers": workers, "nonfinite_rows": nonfinite_rows(X_after)}


def _indices(flags) -> list[int]:
  return [int(i) for i in np.flatnonzero(np.asarray(flags))]


def check_finite(metrics: dict, step: int | None = None, policy: str = "stop") -> list[int]:
  """Host-side check of a step's flags; raises under ``"stop"``.

  Args:
    metrics: the step's metrics with ``nonfinite_workers`` (from
      ``make_step(..., check_finite=True)``) and optionally ``nonfinite_rows``.
    step: k for the message (default ``metrics["step"]``).
    policy: ``"stop"`` raises; ``"skip"`` returns the culprit workers (the step
      itself must be discarded by :func:`skip_nonfinite`).

  Returns:
    Indices of the non-finite workers (empty when all is well).

  Raises:
    DivergenceError: under ``"stop"``, naming the workers and the step.
    KeyError: the metrics carry no divergence flags.

  Examples:
    >>> import numpy as np
    >>> check_finite({"nonfinite_workers": np.array([False, False])})
    []
    >>> bad = {"nonfinite_workers": np.array([False, True]), "step": np.array(3)}
    >>> check_finite(bad, policy="skip")
    [1]
    >>> check_finite(bad)
    Traceback (most recent call last):
    ...
    coopjax.diagnostics.DivergenceError: non-finite values at step 3 on worker(s) [1] ...
  """
  policy = check_policy(policy)
  if "nonfinite_workers" not in metrics:
    raise KeyError(
      "metrics have no 'nonfinite_workers'; build the step with "
      "coopjax.make_step(..., check_finite=True)."
    )
  workers = _indices(metrics["nonfinite_workers"])
  rows = _indices(metrics["nonfinite_rows"]) if "nonfinite_rows" in metrics else []
  if not workers and not rows:
    return []
  if step is None and "step" in metrics:
    step = int(np.asarray(metrics["step"]))
  if policy == "skip":
    return workers
  m = int(np.shape(metrics["nonfinite_workers"])[0])
  where = (
    f"on worker(s) {workers} (loss, gradient or model)"
    if workers
    else "in the update (losses and gradients were finite)"
  )
  after = (
    f"; after the step, rows {rows} of X (workers 0..{m - 1}, then auxiliaries)" if rows else ""
  )
  raise DivergenceError(
    f"non-finite values at step {step} {where}{after} are NaN/Inf. Lower the learning rate, "
    "check those workers' data, or resume from the last checkpoint.",
    step,
    workers,
    rows,
  )


def skip_nonfinite(step_fn: Callable, *, jit: bool = True, donate: bool = False) -> Callable:
  """Wraps a step so that a non-finite step is discarded inside the step.

  ``step_fn`` must come from ``make_step(..., check_finite=True, jit=False)``.
  When any flag is set, the returned X and optimizer state are the inputs
  (:math:`X_{k+1} = X_k`, the counter does not advance) and
  ``metrics["skipped"]`` is True; the caller moves on to the next batch.

  Args:
    step_fn: the raw step ``(X, opt_state, batch) -> (X, opt_state, metrics)``.
    jit: wrap in ``jax.jit``.
    donate: donate X and opt_state (safe: the kept copy is selected inside).

  Returns:
    The guarded step.

  Examples:
    Worker 1 reads a NaN: the step is discarded, X and the step counter stay:

    >>> import jax.numpy as jnp, optax, coopjax
    >>> tx = coopjax.local_sgd(optax.sgd(0.1), tau=2, num_workers=3)
    >>> loss = lambda p, b: jnp.mean((b @ p["w"] - 1.0) ** 2)
    >>> step = skip_nonfinite(coopjax.make_step(loss, tx, check_finite=True, jit=False))
    >>> X = coopjax.replicate({"w": jnp.zeros(2)}, 3)
    >>> batch = jnp.ones((3, 4, 2)).at[1, 0, 0].set(jnp.nan)
    >>> new_X, _, metrics = step(X, tx.init(X), batch)
    >>> bool(metrics["skipped"]), new_X["w"].tolist()
    (True, [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
  """
  if not callable(step_fn):
    raise TypeError(f"step_fn must be a step function, got {type(step_fn).__name__}.")

  def guarded(X, opt_state, batch):
    new_X, new_state, metrics = step_fn(X, opt_state, batch)
    if "nonfinite_workers" not in metrics:
      raise ValueError(
        "skip_nonfinite needs the step's divergence flags: build it with "
        "coopjax.make_step(..., check_finite=True, jit=False)."
      )
    bad = jnp.any(metrics["nonfinite_workers"])
    if "nonfinite_rows" in metrics:
      bad = bad | jnp.any(metrics["nonfinite_rows"])
    X, opt_state = jax.lax.cond(bad, lambda: (X, opt_state), lambda: (new_X, new_state))
    return X, opt_state, dict(metrics, skipped=bad)

  if not jit:
    return guarded
  return jax.jit(guarded, donate_argnums=(0, 1) if donate else ())


def _counted_leaves(X: PyTree, mask) -> list:
  """The leaves of X that ``mask`` selects (see :func:`consensus_distance`)."""
  if hasattr(mask, "init") and hasattr(mask, "update"):  # a transformation: what it mixes
    mask = getattr(mask, "mix_mask", None)
  if mask is None or mask is True:
    return jax.tree.leaves(X)
  for leaf in jax.tree.leaves(mask):
    if not isinstance(leaf, (bool, np.bool_)):
      raise TypeError(
        f"the consensus mask must hold booleans (True = count the leaf), got {leaf!r} of type "
        f"{type(leaf).__name__}."
      )
  try:
    chosen = jax.tree.map(lambda keep, sub: sub if keep else None, mask, X)
  except (ValueError, TypeError):
    raise ValueError(
      "the mask must be a pytree prefix of X with booleans (True = a mixed leaf), e.g. "
      f"{{'params': True, 'batch_stats': False}}; X has structure {jax.tree.structure(X)} but "
      f"the mask has {jax.tree.structure(mask)}. Fix the transformation's mix_mask or pass "
      "consensus_mask= to coopjax.make_step."
    ) from None
  return jax.tree.leaves(chosen)


def consensus_distance(X: PyTree, mask=None) -> jax.Array:
  r"""Consensus distance :math:`\|X (I - J)\|_F^2 = \sum_i \|x_i - u\|^2`.

  .. math::

     u = \frac{1}{m + v} \sum_{i=1}^{m+v} x_i, \qquad
     \|X (I - J)\|_F^2 = \sum_{i=1}^{m+v} \|x_i - u\|^2,

  summed over the leaves that ``mask`` selects; zero iff those rows are equal.
  Under a live mask (:func:`coopjax.with_live_mask`, quarantine) the masked
  workers' rows are left out: u and the sum run over the live workers and the
  auxiliary rows (EASGD's anchor).
  The sums over rows go through :func:`coopjax.mixing.worker_sum`, so the same
  function serves a plain X and, inside a sharded step, this device's rows
  (two all-reduces).

  Args:
    X: stacked models, leading axis ``m + v``.
    mask: which leaves count. None or True: all. A coopjax transformation: the
      leaves it mixes (its ``mix_mask``; all when it has none), so that
      leaves kept per worker (BatchNorm statistics) do not count. Or a pytree
      prefix of X with booleans (True = count).

  Returns:
    A float32 scalar.

  Examples:
    >>> import jax.numpy as jnp, coopjax
    >>> X = {"w": jnp.array([[0.0, 0.0], [2.0, 0.0]]), "stats": jnp.array([[1.0], [5.0]])}
    >>> float(coopjax.consensus_distance(X))
    10.0
    >>> float(coopjax.consensus_distance(X, {"w": True, "stats": False}))
    2.0
  """
  leaves = _counted_leaves(X, mask)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  n = num_rows(leaves, "X")  # m + v, also inside a sharded step
  ctx = context.current()
  live = context.current_live()
  # the worker rows, reduced over the (live) workers; the auxiliary rows after them stay local
  if ctx is not None:
    split = ctx.block
  else:
    split = n if live is None else live.live.shape[0]
  leaves = [x.astype(jnp.promote_types(x.dtype, jnp.float32)) for x in leaves]
  heads = [x[:split] for x in leaves]
  tails = [x[split:] for x in leaves]
  sums = mixing.worker_sum(heads)  # over the live workers only under a live mask
  count = n if live is None else jnp.sum(live.live.astype(jnp.int32)) + tails[0].shape[0]
  means = [
    (s + sum_rows(z) if z.shape[0] else s) / jnp.asarray(count, s.dtype)
    for s, z in zip(sums, tails, strict=True)
  ]

  def row_sq(x, u):  # ‖x_i − u‖² per row
    return jnp.sum(jnp.square(x - u[None]), axis=tuple(range(1, x.ndim)))

  per_row = sum(row_sq(x, u) for x, u in zip(heads, means, strict=True))
  total = mixing.worker_sum(per_row)
  for z, u in zip(tails, means, strict=True):
    if z.shape[0]:
      total = total + jnp.sum(row_sq(z, u))
  return total
