"""The common skeleton: warm-up, options accepted or refused, and self-description."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import coopjax
from coopjax import topology

LR = 0.05


def run(tx, x0, A, b, m, v=0):
  assert tx.layout == coopjax.Layout(m, v)
  X = coopjax.replicate(x0, m, v)
  state = tx.init(X)
  step = coopjax.make_step(ref.loss_fn, tx)
  for k in range(A.shape[0]):
    X, state, _ = step(X, state, (jnp.asarray(A[k]), jnp.asarray(b[k])))
  return X, state


def warmup_reference(x0, W, tau, warmup, A, b, num_aux=0):
  """Steps 1..w: every row set to the workers' mean after the step; then A(τ, W, v) from 1."""
  W = np.asarray(W, np.float64)
  n = W.shape[0]
  m = n - num_aux
  X = np.tile(np.asarray(x0, np.float64), (n, 1))
  for k in range(1, A.shape[0] + 1):
    G = np.zeros_like(X)
    for i in range(m):
      G[i] = ref.np_grad(X[i], A[k - 1, i], b[k - 1, i])
    X = X - LR * G
    if k <= warmup:
      X[:] = X[:m].mean(axis=0)
    elif (k - warmup) % tau == 0:
      X = W.T @ X
  return X


@pytest.mark.parametrize("name", ["local_sgd", "easgd", "dpsgd"])
def test_warmup_is_sync_sgd_then_the_algorithm(name):
  m, tau, warmup, steps = 4, 3, 2, 9
  A, b = ref.make_batches(steps, m, seed=5)
  x0 = ref.init_params()
  sgd = optax.sgd(LR)
  if name == "local_sgd":
    tx, W, v = (
      coopjax.local_sgd(sgd, tau=tau, num_workers=m, warmup_steps=warmup),
      topology.complete(m),
      0,
    )
  elif name == "easgd":
    tx, W, v = (
      coopjax.easgd(sgd, tau=tau, alpha=0.2, num_workers=m, warmup_steps=warmup),
      topology.easgd(m, 0.2),
      1,
    )
  else:
    tau = 1
    tx, W, v = coopjax.dpsgd(sgd, W=topology.ring(m), warmup_steps=warmup), topology.ring(m), 0
  X, state = run(tx, x0, A, b, m, v)
  expected = warmup_reference(ref.flat(coopjax.replicate(x0, 1))[0], W, tau, warmup, A, b, v)
  np.testing.assert_allclose(ref.flat(X), expected, rtol=1e-5, atol=1e-6)
  assert int(coopjax.step_count(state)) == steps


def test_warmup_restarts_diloco_from_the_synchronised_model():
  """After the warm-up DiLoCo's x_start is the synchronised model (else Δ spans the warm-up)."""
  m, warmup, steps = 4, 3, 3
  A, b = ref.make_batches(steps, m, seed=2)
  tx = coopjax.diloco(
    optax.sgd(LR), outer=optax.sgd(0.7, momentum=0.9), tau=4, num_workers=m, warmup_steps=warmup
  )
  X, state = run(tx, ref.init_params(), A, b, m)
  np.testing.assert_allclose(ref.flat(X), np.tile(ref.flat(X)[0], (m, 1)), rtol=0, atol=0)
  np.testing.assert_allclose(np.asarray(state.x_start["w"]), np.asarray(X["w"][0]), atol=0)


def test_options_that_do_not_apply_are_refused():
  sgd = optax.sgd(LR)
  with pytest.raises(ValueError, match="order='mix_then_step' is not defined for diloco"):
    coopjax.diloco(sgd, outer=optax.sgd(1.0), tau=2, num_workers=4, order="mix_then_step")
  with pytest.raises(ValueError, match="not defined for nonblocking_easgd"):
    coopjax.nonblocking_easgd(sgd, tau=2, alpha=0.1, num_workers=4, order="mix_then_step")
  with pytest.raises(ValueError, match="local_state_policy='mix' is not defined"):
    coopjax.overlap_local_sgd(sgd, tau=2, alpha=0.5, num_workers=4, local_state_policy="mix")
  with pytest.raises(ValueError, match="not defined for slowmo"):
    coopjax.slowmo(sgd, tau=2, num_workers=4, alpha=1.0, beta=0.5, lr=0.1, order="mix_then_step")
  with pytest.raises(ValueError, match="not defined for delayed"):
    coopjax.delayed(sgd, tau=2, W=topology.ring(4), order="mix_then_step")
  with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
    coopjax.local_sgd(sgd, tau=2, num_workers=4, warmup_steps=-1)


def test_compression_options_on_uncompressed_factories_name_the_alternatives():
  sgd, q = optax.sgd(LR), coopjax.compress.top_k(fraction=0.1)
  for factory in (
    lambda **kw: coopjax.sync_sgd(sgd, num_workers=4, **kw),
    lambda **kw: coopjax.easgd(sgd, tau=2, alpha=0.1, num_workers=4, **kw),
    lambda **kw: coopjax.dpsgd(sgd, W=topology.ring(4), **kw),
    lambda **kw: coopjax.elastic_averaging(sgd, W=topology.ring(4), alpha=0.1, **kw),
  ):
    with pytest.raises(TypeError, match=r"takes no compressor: .*coopjax\.choco.*local_sgd"):
      factory(compressor=q)
    with pytest.raises(TypeError, match="takes no error_decay"):
      factory(error_decay=0.5)
  with pytest.raises(TypeError, match="^easgd takes no compressor"):
    coopjax.easgd(sgd, tau=2, alpha=0.1, num_workers=4, compressor=q)


def test_every_uncompressed_factory_refuses_compressor_by_name():
  """Not Python's "unexpected keyword argument": the error names choco and error feedback."""
  sgd, q, ring = optax.sgd(LR), coopjax.compress.int4(), topology.ring(4)
  factories = {
    "cooperative": lambda **kw: coopjax.cooperative(sgd, tau=2, W=ring, **kw),
    "delayed": lambda **kw: coopjax.delayed(sgd, tau=2, W=ring, **kw),
    "nonblocking_easgd": lambda **kw: coopjax.nonblocking_easgd(
      sgd, tau=2, alpha=0.1, num_workers=4, **kw
    ),
    "overlap_local_sgd": lambda **kw: coopjax.overlap_local_sgd(
      sgd, tau=2, alpha=0.5, num_workers=4, **kw
    ),
    "hierarchical": lambda **kw: coopjax.hierarchical(
      sgd, tau1=2, tau2=4, groups=[[0, 1], [2, 3]], **kw
    ),
    "time_varying": lambda **kw: coopjax.time_varying(sgd, tau=1, schedule=[ring], **kw),
    "matcha": lambda **kw: coopjax.matcha(
      sgd, graph=ring, budget=0.5, num_workers=4, key=jax.random.key(0), **kw
    ),
    "adacomm": lambda **kw: coopjax.adacomm(
      sgd, tau0=2, num_workers=4, loss_fn=lambda p, b: 0.0, eval_batch=None, **kw
    ),
  }
  for name, factory in factories.items():
    with pytest.raises(TypeError, match=rf"^{name} takes no compressor: .*coopjax\.choco"):
      factory(compressor=q)
    with pytest.raises(TypeError, match=rf"^{name} takes no error_decay"):
      factory(error_decay=0.5)
  # matcha's own key= is its parameter, not a compression option.
  assert factories["matcha"]().layout.num_workers == 4


@pytest.mark.parametrize("name", ["diloco", "nonblocking_easgd", "delayed", "adacomm"])
def test_mix_mask_keeps_leaves_local_for_every_family(name):
  """``mix_mask`` is honoured by every family: the masked leaf equals independent SGD."""
  m, tau, steps = 4, 2, 4
  A, b = ref.make_batches(steps, m, seed=7)
  sgd = optax.sgd(LR)
  mask = {"w": True, "c": False}
  tx, v = {
    "diloco": (coopjax.diloco(sgd, outer=optax.sgd(1.0), tau=tau, num_workers=m, mix_mask=mask), 0),
    "nonblocking_easgd": (
      coopjax.nonblocking_easgd(sgd, tau=tau, alpha=0.2, num_workers=m, mix_mask=mask),
      1,
    ),
    "delayed": (coopjax.delayed(sgd, tau=tau, W=topology.complete(m), mix_mask=mask), 0),
    "adacomm": (
      coopjax.adacomm(sgd, tau0=tau, num_workers=m, mix_mask=mask, loss_estimate="worker_losses"),
      0,
    ),
  }[name]
  X, _ = run(tx, ref.init_params(), A, b, m, v)
  # The bias c of worker i follows its own SGD on the gradient at the (mixed) w.
  assert not np.allclose(np.asarray(X["c"][:m]), np.asarray(X["c"][0]))
  unmasked, _ = run(
    {
      "diloco": coopjax.diloco(sgd, outer=optax.sgd(1.0), tau=tau, num_workers=m),
      "nonblocking_easgd": coopjax.nonblocking_easgd(sgd, tau=tau, alpha=0.2, num_workers=m),
      "delayed": coopjax.delayed(sgd, tau=tau, W=topology.complete(m)),
      "adacomm": coopjax.adacomm(sgd, tau0=tau, num_workers=m, loss_estimate="worker_losses"),
    }[name],
    ref.init_params(),
    A,
    b,
    m,
    v,
  )
  assert not np.allclose(np.asarray(unmasked["c"]), np.asarray(X["c"]))


def test_every_factory_describes_itself():
  m, sgd = 8, optax.sgd(LR)
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
  cases = {
    "sync_sgd": (coopjax.sync_sgd(sgd, num_workers=m), 0, 1),
    "local_sgd": (coopjax.local_sgd(sgd, tau=4, num_workers=m), 0, 4),
    "easgd": (coopjax.easgd(sgd, tau=4, alpha=0.1, num_workers=m), 1, 4),
    "dpsgd": (coopjax.dpsgd(sgd, W=topology.ring(m)), 0, 1),
    "elastic_hierarchical": (
      coopjax.elastic_hierarchical(sgd, tau=2, groups=groups, alpha=0.1),
      2,
      2,
    ),
    "nonblocking_easgd": (coopjax.nonblocking_easgd(sgd, tau=4, alpha=0.1, num_workers=m), 1, 4),
    "overlap_local_sgd": (coopjax.overlap_local_sgd(sgd, tau=4, alpha=0.5, num_workers=m), 1, 4),
    "delayed": (coopjax.delayed(sgd, tau=4, W=topology.ring(m)), 0, 4),
    "slowmo": (coopjax.slowmo(sgd, tau=4, num_workers=m, alpha=1.0, beta=0.5, lr=0.1), 0, 4),
    "diloco": (coopjax.diloco(sgd, outer=optax.sgd(0.7), tau=4, num_workers=m), 0, 4),
    "hierarchical": (coopjax.hierarchical(sgd, tau1=2, tau2=4, groups=groups), 0, 2),
    "adacomm": (coopjax.adacomm(sgd, tau0=4, num_workers=m, loss_estimate="worker_losses"), 0, 4),
  }
  for name, (tx, v, period) in cases.items():
    assert tx.name == name
    assert tx.layout == coopjax.Layout(m, v), name
    assert tx.period == period, name
    assert tx.overlaps == (name in ("nonblocking_easgd", "overlap_local_sgd", "delayed")), name
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
  # settle: the pending reduction of non-blocking EASGD completes to blocking EASGD's anchor.
  A, b = ref.make_batches(4, m, seed=1)
  nb = coopjax.nonblocking_easgd(sgd, tau=2, alpha=0.1, num_workers=m)
  X, state = run(nb, ref.init_params(), A, b, m, 1)
  bl, _ = run(coopjax.easgd(sgd, tau=2, alpha=0.1, num_workers=m), ref.init_params(), A, b, m, 1)
  np.testing.assert_allclose(ref.flat(nb.settle(X, state)), ref.flat(bl), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(
    ref.flat(coopjax.local_sgd(sgd, tau=2, num_workers=m).settle(X, state)), ref.flat(X)
  )


def test_priced_costs_equal_the_collective_formulas():
  """netmodel.mix_time of a transformation's MixCost equals the α–β formula of its collective."""
  m, B = 8, 4e6
  net = coopjax.netmodel.NetworkModel(latency=1e-4, bandwidth=1.25e8)
  sgd = optax.sgd(LR)
  ring = coopjax.dpsgd(sgd, W=topology.ring(m)).mix_cost
  assert coopjax.netmodel.mix_time(ring, B, net) == pytest.approx(
    coopjax.netmodel.neighbor_exchange_time(B, 2, net)
  )
  local = coopjax.local_sgd(sgd, tau=4, num_workers=m).mix_cost
  assert coopjax.netmodel.mix_time(local, B, net) == pytest.approx(
    coopjax.netmodel.allreduce_time(B, m, net)
  )
