"""Two processes x 4 CPU devices (jax.distributed, gloo) give the same X as 8 devices in one."""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
import reference as ref

import coopjax
from coopjax import topology
from coopjax.parallel import sharding

M, TAU, LR = 16, 2, 0.05
STEPS = TAU + 1

WORKER = textwrap.dedent(
  """
  import os, sys
  import numpy as np
  sys.path.insert(0, {tests!r})
  import coopjax
  info = coopjax.distributed.initialize(
    "127.0.0.1:{port}", num_processes=2, process_id=int(sys.argv[1]), initialization_timeout=30
  )
  assert info.process_count == 2 and info.device_count == 8 and info.local_device_count == 4, info
  import jax, optax
  import reference as ref
  from coopjax import sharding, topology

  mesh = coopjax.worker_mesh()
  out = {{}}
  for name, tx, v in [
    ("ring", coopjax.cooperative(optax.sgd({lr}), tau={tau}, W=topology.ring({m})), 0),
    ("easgd", coopjax.easgd(optax.sgd({lr}), tau={tau}, alpha=0.05, num_workers={m}), 1),
  ]:
    A, b = ref.make_batches({steps}, {m})
    X = coopjax.shard(coopjax.replicate(ref.init_params(), {m}, v), mesh, v)
    state = sharding.init(tx, X, mesh, v)
    step = coopjax.make_step(ref.loss_fn, tx, mesh=mesh)
    for k in range({steps}):
      X, state, _ = step(X, state, coopjax.shard_batch((A[k], b[k]), mesh))
      jax.block_until_ready(X)
    out[name] = ref.flat(coopjax.unshard(X, mesh, v))
  if jax.process_index() == 0:
    np.savez(sys.argv[2], **out)
  """
)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def single_process(name):
  mesh = coopjax.worker_mesh(8)
  if name == "ring":
    tx, v = coopjax.cooperative(optax.sgd(LR), tau=TAU, W=topology.ring(M)), 0
  else:
    tx, v = coopjax.easgd(optax.sgd(LR), tau=TAU, alpha=0.05, num_workers=M), 1
  A, b = ref.make_batches(STEPS, M)
  X = coopjax.shard(coopjax.replicate(ref.init_params(), M, v), mesh, v)
  state = sharding.init(tx, X, mesh, v)
  step = coopjax.make_step(ref.loss_fn, tx, mesh=mesh)
  for k in range(STEPS):
    X, state, _ = step(X, state, coopjax.shard_batch((A[k], b[k]), mesh))
    jax.block_until_ready(X)
  return ref.flat(coopjax.unshard(X, mesh, v)), (A, b)


def test_two_processes_match_one_process(tmp_path):
  if not hasattr(jax.config, "jax_cpu_collectives_implementation"):
    pytest.skip("this jax has no jax_cpu_collectives_implementation option (gloo)")
  tests = os.path.dirname(os.path.abspath(__file__))
  port = free_port()
  script = tmp_path / "worker.py"
  script.write_text(
    WORKER.format(tests=tests, port=port, lr=LR, tau=TAU, m=M, steps=STEPS), encoding="utf-8"
  )
  out = tmp_path / "out.npz"
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
    [os.path.dirname(tests)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  )
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(i), str(out)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=75)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail("the two-process run did not finish in 75 s:\n" + "\n".join(logs))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  unavailable = ("not available", "unimplemented", "not built", "unknown", "unsupported")
  if any(
    p.returncode and "gloo" in log.lower() and any(u in log.lower() for u in unavailable)
    for p, log in zip(procs, logs, strict=True)
  ):
    pytest.skip("gloo CPU collectives are unavailable in this jaxlib:\n" + logs[-1][-2000:])
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log[-4000:]
  got = np.load(out)
  for name in ("ring", "easgd"):
    expected, (A, b) = single_process(name)
    np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-7)
    # ... and both equal the NumPy reference.
    W = topology.ring(M) if name == "ring" else topology.easgd(M, 0.05)
    x0 = ref.flat(coopjax.replicate(ref.init_params(), 1))[0]
    Xr, _ = ref.cooperative_reference(x0, W, TAU, LR, A, b, num_aux=W.shape[0] - M)
    np.testing.assert_allclose(got[name], Xr, rtol=2e-5, atol=2e-6)
