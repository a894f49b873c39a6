"""A live mask judges connectivity on ``tx.graph``: algorithms that gossip must declare their W."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import coopjax
from coopjax import compress
from coopjax import mixing
from coopjax import topology
from coopjax.algorithms import _skeleton
from coopjax.algorithms._cooperative import CooperativeState


def _gossip(W, tau, **kw):
  m = W.shape[0]
  mix = mixing.Mix(W, m)
  return _skeleton.transformation(
    "my_gossip",
    optax.sgd(0.1),
    coopjax.Layout(m),
    state_cls=CooperativeState,
    on_mix=lambda k, X, extra, inputs: (mix(X), extra),
    **_skeleton.periodic(tau, mix.cost),
    **kw,
  )


def _mh_live(W, live):
  """NumPy: Metropolis–Hastings weights on the live subgraph, masked workers frozen."""
  A = (np.abs(W) > 1e-12) & ~np.eye(len(W), dtype=bool)
  G = (A | A.T) & live[:, None] & live[None, :]
  d = G.sum(0)
  M = np.where(G, 1.0 / (1 + np.maximum(d[:, None], d[None, :])), 0.0)
  M += np.diag(1 - M.sum(0))
  M[~live], M[:, ~live] = 0, 0
  M[~live, ~live] = 1
  return M


def test_choco_judges_connectivity_on_its_ring():
  tx = coopjax.with_live_mask(
    coopjax.choco(
      optax.sgd(0.1), tau=1, W=topology.ring(6), compressor=compress.identity(), gamma=0.5
    )
  )
  np.testing.assert_array_equal(tx.graph, (topology.ring(6) > 0) & ~np.eye(6, dtype=bool))
  state = tx.init(coopjax.replicate({"w": jnp.zeros(3)}, tx))
  with pytest.raises(ValueError, match=r"2 disconnected components \[\[0, 5\], \[2, 3\]\]"):
    coopjax.set_live(tx, state, [1, 0, 1, 1, 0, 1])


def test_custom_gossip_must_declare_its_graph():
  A = np.zeros((4, 4), bool)
  for i, j in [(0, 1), (1, 2), (2, 3), (0, 2)]:
    A[i, j] = A[j, i] = True
  W = topology.from_adjacency(A)
  X = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)}
  g = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)}
  live = np.array([True, True, True, False])

  undeclared = coopjax.with_live_mask(_gossip(W, 1))
  with pytest.raises(ValueError, match=r"between workers \[\(0, 1\).*pass graph=W"):
    undeclared.update(g, coopjax.set_live(undeclared, undeclared.init(X), live), X)

  tx = coopjax.with_live_mask(_gossip(W, 1, graph=W))
  with pytest.raises(ValueError, match=r"components \[\[1\], \[3\]\]"):
    coopjax.set_live(tx, tx.init(X), [False, True, False, True])
  u, _ = tx.update(g, coopjax.set_live(tx, tx.init(X), live), X)
  x, gw = np.asarray(X["w"], np.float64), np.asarray(g["w"], np.float64)
  expected = np.einsum("ji,jd->id", _mh_live(W, live), x - 0.1 * gw * live[:, None])
  np.testing.assert_allclose(optax.apply_updates(X, u)["w"], expected, atol=1e-6)
