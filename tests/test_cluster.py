"""The emulated cluster: 2 nodes at 1 Gbit/s run local SGD exactly as one process does.

Needs root (network namespaces); skipped otherwise. Checks, on a real (emulated)
network: the parameters after a few local SGD steps equal the single-process
run's and a NumPy reference; a measured 4 MiB all-reduce takes between 0.85×
and 2.5× the α–β prediction at the link rate (the lower bound says the rate
limit holds, the upper bound leaves room for two shared cores); and teardown
leaves no namespace, ``/etc/netns`` entry, link or process behind, after a
clean run, a failing node, SIGTERM, and SIGKILL followed by ``cleanup``.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import optax
import pytest
import reference as ref

import coopjax
from coopjax import topology
from coopjax.parallel import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
sys.path.insert(0, ROOT)

from benchmarks import cluster  # noqa: E402

M, TAU, LR, STEPS = 2, 2, 0.05, 5
RATE = 1e9  # bit/s
ALLREDUCE_BYTES = 4 * 2**20
FACTOR = (0.85, 2.5)  # measured / predicted all-reduce time

pytestmark = pytest.mark.skipif(
  not hasattr(os, "geteuid") or os.geteuid() != 0,
  reason="the emulated cluster needs root (network namespaces, veth links, tc)",
)


@pytest.fixture(autouse=True, scope="module")
def no_stale_clusters():
  """Removes what crashed earlier runs left (their owner pids are gone); live runs are kept."""
  cluster.cleanup()


NODE = textwrap.dedent(
  f"""
  import sys, json
  import numpy as np
  sys.path[:0] = [{ROOT!r}, {TESTS!r}]
  from benchmarks.cluster import node
  node.join()
  import jax, optax, coopjax
  import reference as ref
  from coopjax import sharding

  mesh = coopjax.worker_mesh()
  tx = coopjax.local_sgd(optax.sgd({LR}), tau={TAU}, num_workers={M})
  A, b = ref.make_batches({STEPS}, {M})
  X = coopjax.shard(coopjax.replicate(ref.init_params(), {M}), mesh)
  state = sharding.init(tx, X, mesh)
  step = coopjax.make_step(ref.loss_fn, tx, mesh=mesh)
  X, state, _, _ = node.run_steps(
    step, X, state, lambda k: coopjax.shard_batch((A[k], b[k]), mesh), {STEPS}
  )
  X = ref.flat(coopjax.unshard(X, mesh))
  times = node.time_collective("all_reduce", {ALLREDUCE_BYTES}, mesh, reps=5)
  if jax.process_index() == 0:
    np.savez(sys.argv[1], X=X, times=np.asarray(times))
  """
)


def our_names(c):
  netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
  names = [line.split()[0] for line in netns.splitlines() if line.strip()]
  stem = c.switch[: -len("sw")]
  left = [n for n in names if n.startswith(stem)]
  if os.path.isdir("/etc/netns"):
    left += [n for n in os.listdir("/etc/netns") if n.startswith(stem)]
  return left


def root_links():
  out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
  return sorted(line.split(":")[1].strip() for line in out.splitlines())


def alive(pid):
  return cluster.emulate._alive(pid)


def single_process():
  mesh = coopjax.worker_mesh(M)
  tx = coopjax.local_sgd(optax.sgd(LR), tau=TAU, num_workers=M)
  A, b = ref.make_batches(STEPS, M)
  X = coopjax.shard(coopjax.replicate(ref.init_params(), M), mesh)
  state = sharding.init(tx, X, mesh)
  step = coopjax.make_step(ref.loss_fn, tx, mesh=mesh)
  for k in range(STEPS):
    X, state, _ = step(X, state, coopjax.shard_batch((A[k], b[k]), mesh))
    jax.block_until_ready(X)
  return ref.flat(coopjax.unshard(X, mesh)), (A, b)


def test_two_nodes_local_sgd_matches_one_process(tmp_path):
  script = tmp_path / "node.py"
  script.write_text(NODE, encoding="utf-8")
  out = tmp_path / "out.npz"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  links = root_links()
  c = cluster.Cluster(M, rate=RATE)
  with c:
    results = c.run([sys.executable, str(script), str(out)], env=env, timeout=90)
    pids = [p.pid for p in c._procs]
  logs = "\n".join(f"--- node {r.node} exit {r.returncode}\n{r.stdout[-3000:]}" for r in results)
  assert all(r.returncode == 0 for r in results), logs
  # Clean teardown: no namespace, /etc/netns entry, root-namespace link or process left.
  assert our_names(c) == []
  assert root_links() == links
  assert not any(alive(p) for p in pids)

  got = np.load(out)
  expect, (A, b) = single_process()
  np.testing.assert_array_equal(got["X"], expect)
  x0 = ref.flat(coopjax.replicate(ref.init_params(), 1))[0]
  numpy_X, _ = ref.cooperative_reference(x0, topology.complete(M), TAU, LR, A, b)
  np.testing.assert_allclose(got["X"], numpy_X, rtol=1e-5, atol=1e-6)
  assert np.abs(got["X"][0] - got["X"][1]).max() > 1e-3  # step 5: after the last mix, apart

  predicted = coopjax.netmodel.allreduce_time(
    ALLREDUCE_BYTES, M, coopjax.netmodel.NetworkModel(latency=0.0, bandwidth=RATE / 8)
  )
  measured = float(np.median(got["times"]))
  ratio = measured / predicted
  print(
    f"4 MiB all-reduce, 2 nodes at 1 Gbit/s: {measured * 1e3:.1f} ms measured, "
    f"{predicted * 1e3:.1f} ms predicted, ratio {ratio:.2f}"
  )
  assert FACTOR[0] <= ratio <= FACTOR[1], (measured, predicted, got["times"])


def test_failing_node_is_reported_and_torn_down():
  c = cluster.Cluster(2, rate="100mbit", tag="fail")
  with c:
    t = time.monotonic()
    results = c.run(
      [["sh", "-c", "exit 3"], ["sleep", "60"]], timeout=60, grace=1.0
    )  # node 1 would wait forever
    assert time.monotonic() - t < 20
  assert results[0].returncode == 3 and results[1].returncode == -signal.SIGKILL
  assert our_names(c) == []


def test_exception_inside_tears_down():
  c = cluster.Cluster(2, rate="100mbit", tag="exc")
  with pytest.raises(RuntimeError, match="boom"), c:
    proc = c.popen(0, ["sleep", "60"])
    raise RuntimeError("boom")
  assert our_names(c) == [] and proc.poll() is not None


ORCHESTRATOR = textwrap.dedent(
  f"""
  import sys
  sys.path.insert(0, {ROOT!r})
  from benchmarks.cluster import Cluster
  with Cluster(2, rate="100mbit", prefix="cjk-") as c:
    c.popen(0, ["sleep", "60"])
    c.popen(1, ["sleep", "60"])
    print("up", flush=True)
    c._procs[0].wait()
  """
)


def start_orchestrator():
  proc = subprocess.Popen(
    [sys.executable, "-c", ORCHESTRATOR],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  line = proc.stdout.readline()
  assert line.strip() == "up", line + proc.stdout.read()
  return proc


def names_of(pid):
  netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
  stem = f"cjk-{pid}-"
  return [line.split()[0] for line in netns.splitlines() if line.startswith(stem)] + [
    n
    for n in (os.listdir("/etc/netns") if os.path.isdir("/etc/netns") else [])
    if n.startswith(stem)
  ]


def test_sigterm_tears_down():
  proc = start_orchestrator()
  assert names_of(proc.pid)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=30)
  assert names_of(proc.pid) == []


def test_killed_run_is_refused_then_cleaned_up():
  proc = start_orchestrator()
  sleepers = subprocess.run(
    ["ip", "netns", "pids", f"cjk-{proc.pid}-n0"], capture_output=True, text=True
  ).stdout.split()
  assert sleepers
  proc.kill()  # SIGKILL: no chance to tear down
  proc.wait(timeout=10)
  left = names_of(proc.pid)
  assert len(left) == 2 + 1 + 2  # two nodes, the switch, two /etc/netns entries
  with pytest.raises(cluster.ClusterError, match="cleanup"):
    cluster.Cluster(2, prefix="cjk-").up()
  removed = cluster.cleanup(prefix="cjk-")
  assert {os.path.basename(n) for n in removed} >= set(left)
  assert names_of(proc.pid) == []
  time.sleep(0.2)
  assert not any(alive(int(p)) for p in sleepers)


def test_bad_arguments():
  with pytest.raises(ValueError, match="rate"):
    cluster.parse_rate("fast")
  assert cluster.parse_rate("100mbit") == 1e8 and cluster.parse_rate("1gbit") == 1e9
  with pytest.raises(ValueError, match="multiple"):
    cluster.Cluster(4, groups=3, group_rate="10mbit")
  with pytest.raises(ValueError, match="group_rate"):
    cluster.Cluster(4, groups=2)
  with pytest.raises(cluster.ClusterError, match="not up"):
    cluster.Cluster(2).popen(0, ["true"])
