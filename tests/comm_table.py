"""The compiled collectives of every algorithm's sharded step, summarised per kind and branch.

``python tests/comm_table.py OUT.json`` writes the table; ``tests/data/comm_before.json`` was
written this way by the implementation that preceded the common mixing interface, and
``tests/test_comm.py`` checks that every algorithm still compiles to collectives of the same
kinds, in the same branches, moving the same bytes.
"""

import json
import os
import sys

if __name__ == "__main__":
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import numpy as np
import optax

import coopjax
from coopjax import topology

M, D = 16, 8


def _params():
  return {"w": np.zeros(5, np.float32), "c": np.zeros((), np.float32)}


def _loss(p, batch):
  a, b = batch
  return 0.5 * jax.numpy.mean((a @ p["w"] + p["c"] - b) ** 2)


def algorithms():
  """name -> (transformation, num_aux): the 16 algorithms at m = 16."""
  sgd = optax.sgd(0.1)
  groups = [list(range(g * 4, (g + 1) * 4)) for g in range(4)]
  period = topology.one_peer_exponential_period(M)
  return {
    "sync_sgd": (coopjax.sync_sgd(sgd, num_workers=M), 0),
    "local_sgd": (coopjax.local_sgd(sgd, tau=4, num_workers=M), 0),
    "easgd": (coopjax.easgd(sgd, tau=4, alpha=0.05, num_workers=M), 1),
    "dpsgd_ring": (coopjax.dpsgd(sgd, W=topology.ring(M)), 0),
    "cooperative_torus": (coopjax.cooperative(sgd, tau=2, W=topology.torus(4, 4)), 0),
    "elastic_averaging": (coopjax.elastic_averaging(sgd, W=topology.ring(M), alpha=0.05, tau=2), 1),
    "elastic_hierarchical": (
      coopjax.elastic_hierarchical(sgd, tau=2, groups=groups, alpha=0.05),
      4,
    ),
    "nonblocking_easgd": (coopjax.nonblocking_easgd(sgd, tau=4, alpha=0.05, num_workers=M), 1),
    "overlap_local_sgd": (coopjax.overlap_local_sgd(sgd, tau=4, alpha=0.5, num_workers=M), 1),
    "delayed": (coopjax.delayed(sgd, tau=4, W=topology.ring(M)), 0),
    "slowmo": (coopjax.slowmo(sgd, tau=4, num_workers=M, alpha=1.0, beta=0.5, lr=0.1), 0),
    "diloco": (coopjax.diloco(sgd, outer=optax.sgd(0.7, momentum=0.9), tau=4, num_workers=M), 0),
    "time_varying": (
      coopjax.time_varying(
        sgd, tau=2, schedule=[topology.one_peer_exponential(M, r) for r in range(period)]
      ),
      0,
    ),
    "matcha": (
      coopjax.matcha(sgd, graph=topology.ring(M), budget=0.5, num_workers=M, key=jax.random.key(0)),
      0,
    ),
    "adacomm": (coopjax.adacomm(sgd, tau0=4, num_workers=M, loss_estimate="worker_losses"), 0),
    "hierarchical": (coopjax.hierarchical(sgd, tau1=2, tau2=4, groups=groups), 0),
  }


def summary(tx, v: int, mesh) -> dict:
  """``{"kind|in_branch": total bytes}`` of the compiled sharded step."""
  X = coopjax.shard(coopjax.replicate(_params(), M, v), mesh, v)
  state = coopjax.sharding.init(tx, X, mesh, v)
  rng = np.random.default_rng(0)
  batch = (
    rng.normal(size=(M, 4, 5)).astype(np.float32),
    rng.normal(size=(M, 4)).astype(np.float32),
  )
  step = coopjax.make_step(_loss, tx, mesh=mesh)
  out: dict = {}
  for c in coopjax.comm_report(step, X, state, coopjax.shard_batch(batch, mesh)):
    key = f"{c.kind}|{c.in_branch}"
    out[key] = out.get(key, 0) + c.bytes
  return out


def table(names=None) -> dict:
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:D]), (coopjax.WORKER_AXIS,))
  algos = algorithms()
  return {n: summary(*algos[n], mesh) for n in (names or algos)}


if __name__ == "__main__":
  with open(sys.argv[1], "w") as f:
    json.dump(table(), f, indent=1, sort_keys=True)
