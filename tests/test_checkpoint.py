"""Checkpoint and resume: bit-identical continuation, sharding kept, atomic writes.

The reference for every resume test is the uninterrupted run itself: training
K steps straight and training K/2, saving, restoring in a fresh process and
training K/2 more must give the same bits in every leaf of X and of the
optimizer state (``np.array_equal``).

This file doubles as a small training script (``python tests/test_checkpoint.py
DIR --algos a,b --steps K``) that uses :mod:`coopjax.checkpoint` the way a
training CLI does: restore the latest checkpoint if there is one (arrays, RNG
key, data position), train to step K saving every N steps, save at exit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import coopjax
from coopjax import topology
from coopjax.training import checkpoint
from coopjax.training import data

M = 4
DIM = 5
LR = 0.05
NOISE = 0.01
HERE = os.path.dirname(os.path.abspath(__file__))


def _local():
  return optax.sgd(LR, momentum=0.9)


def _builders():
  """Every algorithm coopjax offers, by name (a missing one is an error, not a skip)."""
  ring = topology.ring(M)
  return {
    "sync_sgd": lambda: coopjax.sync_sgd(_local(), num_workers=M),
    "local_sgd": lambda: coopjax.local_sgd(_local(), tau=3, num_workers=M),
    "easgd": lambda: coopjax.easgd(_local(), tau=2, alpha=0.2, num_workers=M),
    "dpsgd": lambda: coopjax.dpsgd(_local(), W=ring),
    "time_varying": lambda: coopjax.time_varying(
      _local(), tau=2, schedule=[ring, topology.complete(M)]
    ),
    "delayed": lambda: coopjax.delayed(_local(), tau=2, W=ring),
    "slowmo": lambda: coopjax.slowmo(_local(), tau=2, num_workers=M, alpha=1.0, beta=0.5, lr=LR),
    "diloco": lambda: coopjax.diloco(
      _local(), outer=optax.sgd(0.7, momentum=0.9, nesterov=True), tau=2, num_workers=M
    ),
    "adacomm": lambda: coopjax.adacomm(
      _local(), tau0=3, num_workers=M, loss_estimate="worker_losses"
    ),
    "hierarchical": lambda: coopjax.hierarchical(_local(), tau1=2, tau2=4, groups=[[0, 1], [2, 3]]),
  }


BUILDERS = _builders()
ALGORITHMS = sorted(BUILDERS)


def _loss(params, batch):
  r = batch["x"] @ params["w"] + params["c"] - batch["y"]
  return 0.5 * jnp.mean(r**2)


def _problem():
  p = data.least_squares(num_examples=64, dim=DIM, seed=1)
  return p.x, p.y


def _batches(state=None):
  x, y = _problem()
  shards = data.split_iid(len(y), M, seed=2)
  return data.make_worker_batches(x, y, shards, 4, seed=3, keys=("x", "y"), state=state)


def init(name: str):
  """``(tx, state)`` for algorithm ``name``; X gets one auxiliary row if the algorithm needs it."""
  tx = BUILDERS[name]()
  params = {"w": jnp.linspace(-1.0, 1.0, DIM, dtype=jnp.float32), "c": jnp.zeros((), jnp.float32)}
  for num_aux in (0, 1, 2):
    X = coopjax.replicate(params, M, num_aux)
    try:
      opt_state = tx.init(X)
    except ValueError:
      continue
    return tx, {"X": X, "opt_state": opt_state, "rng": jax.random.key(11)}
  raise AssertionError(f"{name}: no X layout with 0..2 auxiliary rows is accepted by init")


def make_train_step(tx):
  step = coopjax.make_step(_loss, tx, num_workers=M, with_consensus=False, jit=False)

  @jax.jit
  def train_step(state, batch):
    rng, sub = jax.random.split(state["rng"])
    batch = dict(batch, x=batch["x"] + NOISE * jax.random.normal(sub, batch["x"].shape))
    X, opt_state, metrics = step(state["X"], state["opt_state"], batch)
    return {"X": X, "opt_state": opt_state, "rng": rng}, metrics

  return train_step


def run_straight(train_step, state, steps: int):
  """``steps`` steps from ``state`` on a fresh data stream, no checkpoints: the reference."""
  batches = _batches()
  for _ in range(steps):
    state, _ = train_step(state, next(batches))
  return state


def train(
  name: str,
  directory: str,
  steps: int,
  save_every: int = 1,
  sleep: float = 0.0,
  reference_steps: int = 0,
):
  """Trains ``name`` to ``steps``, resuming from ``directory`` if it holds a checkpoint.

  With ``reference_steps``, first writes ``reference.npz``: an uninterrupted run of that
  many steps from the initial state (same process, same compiled step).
  """
  tx, state = init(name)
  train_step = make_train_step(tx)
  os.makedirs(directory, exist_ok=True)
  if reference_steps:
    reference = run_straight(train_step, state, reference_steps)
    np.savez(os.path.join(directory, "reference.npz"), **flatten(reference))
  config = {"algorithm": name, "workers": M, "lr": LR}
  with checkpoint.CheckpointManager(
    directory, max_to_keep=2, save_interval_steps=save_every
  ) as mgr:
    start = mgr.latest_step()
    batches = _batches()
    if start is None:
      start = 0
    else:
      target = jax.eval_shape(lambda: init(name)[1])  # shapes only: no arrays are made
      state = mgr.restore(start, target=target)
      meta = mgr.meta(start)
      assert meta["config"] == config, meta
      batches.restore(meta["data"])
    for k in range(start + 1, steps + 1):
      state, _ = train_step(state, next(batches))
      jax.block_until_ready(state)
      meta = {"config": config, "data": batches.state}
      if mgr.save(k, state, meta=meta, force=k == steps):
        print(f"saved {k}", flush=True)
      if sleep:
        time.sleep(sleep)
  return state


def flatten(state) -> dict[str, np.ndarray]:
  """Leaves of X and opt_state (and raw RNG key data) by path, as NumPy arrays."""
  state = dict(state, rng=jax.random.key_data(state["rng"]))
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


_JIT_CACHE: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _shared_jit_cache(tmp_path_factory):
  """One persistent compilation cache for the scripts this module starts.

  The second process of a resume test then loads the compiled step instead of
  compiling it again (compilation dominates these tiny runs).
  """
  _JIT_CACHE[:] = [str(tmp_path_factory.mktemp("jit_cache"))]
  yield
  _JIT_CACHE.clear()


def _script_env():
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  # Small steps compile about twice as fast without LLVM optimisation; every process of a
  # comparison runs with the same flags, so the comparisons stay exact.
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  if _JIT_CACHE:
    env["JAX_COMPILATION_CACHE_DIR"] = _JIT_CACHE[0]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def _script(directory, algos, steps, **kw) -> list[str]:
  cmd = [sys.executable, os.path.abspath(__file__), directory, "--algos", ",".join(algos)]
  cmd += ["--steps", str(steps)]
  for k, v in kw.items():
    cmd += [f"--{k.replace('_', '-')}", str(v)]
  return cmd


def _run_script(directory, algos, steps, timeout=120, parallel=1, **kw):
  """Runs the script over ``algos`` in ``parallel`` concurrent processes; all must succeed."""
  groups = [algos[i::parallel] for i in range(parallel) if algos[i::parallel]]
  procs = [
    subprocess.Popen(
      _script(directory, g, steps, **kw),
      env=_script_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for g in groups
  ]
  try:
    for p in procs:
      _, err = p.communicate(timeout=timeout)
      assert p.returncode == 0, err[-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()


def _assert_same(a: dict, b: dict, label: str):
  assert a.keys() == b.keys(), (label, sorted(set(a) ^ set(b)))
  for key in a:
    assert a[key].dtype == b[key].dtype, (label, key)
    assert np.array_equal(a[key], b[key]), f"{label}: leaf {key} differs"


# ---------------------------------------------------------------------------
# tests


def test_every_algorithm_resumes_bit_identically_in_a_new_process(tmp_path):
  K = 8  # crosses several mixing steps of every algorithm (tau <= 4)
  # Process 1: the uninterrupted K-step reference, then K/2 steps and a checkpoint
  # (the algorithms split over two concurrent processes, for the two cores).
  _run_script(str(tmp_path), ALGORITHMS, K // 2, parallel=2, save_every=K // 2, reference=K)
  # Process 2: restores at K/2 and trains K/2 more.
  _run_script(str(tmp_path), ALGORITHMS, K, parallel=2, save_every=K // 2)
  for name in ALGORITHMS:
    straight = dict(np.load(tmp_path / name / "reference.npz"))
    resumed = dict(np.load(tmp_path / name / "final.npz"))
    _assert_same(straight, resumed, name)
    # The run did move: the reference is not the initial state.
    assert not np.array_equal(straight["['X']['w']"], flatten(init(name)[1])["['X']['w']"])


def test_restore_keeps_types_dtypes_keys_and_meta(tmp_path):
  tx, state = init("easgd")
  meta = {"config": {"tau": 2, "lr": 0.05, "name": "easgd"}, "data": data.IteratorState(3, 1)}
  with checkpoint.CheckpointManager(tmp_path, max_to_keep=2, save_interval_steps=3) as mgr:
    assert mgr.latest_step() is None
    assert not mgr.save(4, state, meta=meta)  # not due
    assert mgr.save(4, state, meta=meta, force=True)
    assert not mgr.save(4, state, meta=meta, force=True)  # already there
    for k in (6, 9, 12):
      assert mgr.save(k, state, meta=meta)
    assert mgr.all_steps() == [9, 12]  # max_to_keep
    out = mgr.restore(target=jax.eval_shape(lambda: state))
    assert mgr.meta(9) == {
      "config": meta["config"],
      "data": {"epoch": 3, "position": 1, "lags": [], "paused": []},
    }
  assert type(out["opt_state"]) is type(state["opt_state"])
  assert jax.tree.structure(out) == jax.tree.structure(state)
  assert out["rng"].dtype == state["rng"].dtype
  assert np.array_equal(jax.random.key_data(out["rng"]), jax.random.key_data(state["rng"]))
  _assert_same(flatten(state), flatten(out), "easgd")


def test_sharded_state_is_restored_with_its_sharding(tmp_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), (coopjax.WORKER_AXIS,))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(coopjax.WORKER_AXIS))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tx = coopjax.local_sgd(optax.adam(0.1), tau=2, num_workers=8)
  X = coopjax.replicate({"w": jnp.arange(6.0).reshape(2, 3)}, 8)
  X = jax.tree.map(lambda x: x + jnp.arange(8.0)[:, None, None], X)
  state = {"X": X, "opt_state": tx.init(X), "rng": jax.random.split(jax.random.key(0), 8)}
  state = jax.tree.map(lambda x: jax.device_put(x, rows if x.ndim else repl), state)
  with checkpoint.CheckpointManager(tmp_path) as mgr:
    mgr.save(1, state)
    out = mgr.restore(target=checkpoint.abstract_target(state))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(out), strict=True):
    assert b.sharding == a.sharding
    assert len(b.addressable_shards) == len(a.addressable_shards)
  assert out["X"]["w"].addressable_shards[3].data.shape == (1, 2, 3)
  assert np.array_equal(np.asarray(out["X"]["w"][3]), np.arange(6.0).reshape(2, 3) + 3)
  _assert_same(
    flatten(dict(state, rng=state["rng"][0])), flatten(dict(out, rng=out["rng"][0])), "sharded"
  )


def test_mismatched_target_or_missing_checkpoint_is_a_clear_error(tmp_path):
  _, state = init("local_sgd")
  with checkpoint.CheckpointManager(tmp_path) as mgr:
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
      mgr.restore(target=state)
    mgr.save(2, state)
    with pytest.raises(FileNotFoundError, match="available steps: \\[2\\]"):
      mgr.restore(3, target=state)
    raw = mgr.restore()  # no target: the saved tree, for inspection
    assert np.array_equal(raw["X"]["w"], state["X"]["w"])
    assert np.array_equal(raw["rng"], jax.random.key_data(state["rng"]))
    other = dict(state, X=coopjax.replicate({"w": jnp.zeros(DIM + 1), "c": jnp.zeros(())}, M))
    with pytest.raises(ValueError, match="does not match target"):
      mgr.restore(target=other)
    with pytest.raises(TypeError, match="cannot be stored as JSON"):
      mgr.save(3, state, meta={"f": object()}, force=True)
    with pytest.raises(TypeError, match="leaf of type"):
      mgr.save(3, dict(state, bad="text"), force=True)
    with pytest.raises(ValueError, match="step must be >= 0"):
      mgr.save(-1, state)
  with pytest.raises(ValueError, match="max_to_keep"):
    checkpoint.CheckpointManager(tmp_path, max_to_keep=0)


def test_fresh_manager_checks_shapes_without_orbax_warnings(tmp_path, caplog):
  """A resuming process (a new manager) gets the shape check and no "could not be restored"."""
  with checkpoint.CheckpointManager(tmp_path) as mgr:
    mgr.save(1, {"w": jnp.ones((8, 3))}, meta={"m": 8})
  with checkpoint.CheckpointManager(tmp_path) as mgr:
    assert mgr.meta() == {"m": 8}
    restored = mgr.restore(target=checkpoint.abstract_target({"w": jnp.zeros((8, 3))}))
    np.testing.assert_array_equal(restored["w"], np.ones((8, 3)))
    with pytest.raises(ValueError, match=r"holds 1 arrays with shapes \[\(8, 3\)\]"):
      mgr.restore(target=checkpoint.abstract_target({"w": jnp.zeros((6, 3))}))
  assert not [r for r in caplog.records if "could not be restored" in r.getMessage()]


def test_partial_save_leaves_previous_checkpoint_readable(tmp_path):
  _, state = init("local_sgd")
  with checkpoint.CheckpointManager(tmp_path) as mgr:
    mgr.save(5, state)
  # What a process killed half-way through writing step 7 leaves behind.
  partial = tmp_path / "7.orbax-checkpoint-tmp-1700000000"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\x00" * 100)
  with checkpoint.CheckpointManager(tmp_path) as mgr:
    assert mgr.latest_step() == 5
    assert not partial.exists()  # removed when the manager opened the directory
    _assert_same(flatten(state), flatten(mgr.restore(target=state)), "after partial")
    assert mgr.save(7, state)  # the step can be written again
    assert mgr.latest_step() == 7


def _kill_when(proc, pattern: str, timeout: float = 90.0) -> list[str]:
  """Reads ``proc``'s stdout until a line starts with ``pattern``, then SIGKILLs it."""
  lines, deadline = [], time.monotonic() + timeout
  try:
    for line in proc.stdout:
      lines.append(line.strip())
      if line.startswith(pattern) or time.monotonic() > deadline:
        break
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  return lines


def test_sigkill_during_training_then_resume_matches_uninterrupted_run(tmp_path):
  K = 30
  proc = subprocess.Popen(
    _script(str(tmp_path), ["local_sgd"], K, sleep=0.05),
    env=_script_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  lines = _kill_when(proc, "saved 12")
  assert proc.returncode == -signal.SIGKILL, lines
  with checkpoint.CheckpointManager(tmp_path / "local_sgd") as mgr:
    killed_at = mgr.latest_step()
  assert killed_at is not None and 12 <= killed_at < K, (killed_at, lines)
  assert not (tmp_path / "local_sgd" / "final.npz").exists()
  _run_script(str(tmp_path), ["local_sgd"], K, reference=K)
  resumed = dict(np.load(tmp_path / "local_sgd" / "final.npz"))
  straight = dict(np.load(tmp_path / "local_sgd" / "reference.npz"))
  _assert_same(straight, resumed, "killed and resumed")


def test_sigkill_mid_save_keeps_a_readable_checkpoint(tmp_path):
  # Saves dominate this loop (4 MB per save), so the kill lands inside one.
  proc = subprocess.Popen(
    [sys.executable, os.path.abspath(__file__), str(tmp_path), "--save-loop"],
    env=_script_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  _kill_when(proc, "saved 3")
  time.sleep(0.0)
  target = {"a": jax.ShapeDtypeStruct((1 << 20,), jnp.float32)}
  with checkpoint.CheckpointManager(tmp_path) as mgr:
    last = mgr.latest_step()
    assert last is not None and last >= 3
    out = mgr.restore(target=target)
  assert np.array_equal(np.asarray(out["a"]), np.full(1 << 20, last, np.float32))


ROOT = os.path.dirname(HERE)
TRAIN = os.path.join(ROOT, "experiments", "train.py")


def _cli(workdir, *flags) -> list[str]:
  return [
    sys.executable,
    TRAIN,
    "--config",
    os.path.join(ROOT, "experiments", "configs", "default.py:runlocal"),
    "--workdir",
    str(workdir),
    "--config.num_steps=300",
    "--config.progress=False",
    *flags,
  ]


def test_cli_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
  env, run = _script_env(), dict(capture_output=True, text=True, timeout=180, cwd=ROOT)
  # The uninterrupted run: one checkpoint, at the end.
  out = subprocess.run(_cli(tmp_path / "straight", "--config.checkpoint_every=0"), env=env, **run)
  assert out.returncode == 0, out.stderr[-3000:]
  # The same run, checkpointing every 5 steps, SIGKILLed once step 50 is saved.
  ckpts = tmp_path / "killed" / "checkpoints"
  proc = subprocess.Popen(
    _cli(tmp_path / "killed", "--config.checkpoint_every=5"),
    env=env,
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.monotonic() + 120
  try:
    while time.monotonic() < deadline and proc.poll() is None:
      steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if ckpts.is_dir() else []
      steps = [d for d in steps if d >= 50]
      if steps:
        break
      time.sleep(0.02)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  with checkpoint.CheckpointManager(ckpts) as mgr:
    killed_at = mgr.latest_step()
  assert killed_at is not None and 50 <= killed_at < 300, killed_at
  out = subprocess.run(
    _cli(tmp_path / "killed", "--resume", "--config.checkpoint_every=0"), env=env, **run
  )
  assert out.returncode == 0, out.stderr[-3000:]
  finals = []
  for name in ("straight", "killed"):
    with checkpoint.CheckpointManager(tmp_path / name / "checkpoints") as mgr:
      assert mgr.latest_step() == 300
      flat, _ = jax.tree_util.tree_flatten_with_path(mgr.restore())  # raw saved arrays
      finals.append({jax.tree_util.keystr(p): np.asarray(x) for p, x in flat})
  _assert_same(finals[0], finals[1], f"CLI killed at {killed_at} and resumed")
  summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
  assert summary["steps"] == 300 and summary["stopped"] is None


# ---------------------------------------------------------------------------
# the training script


def _save_loop(directory: str):
  with checkpoint.CheckpointManager(directory, max_to_keep=2) as mgr:
    for k in range(1, 10_000):
      mgr.save(k, {"a": np.full(1 << 20, k, np.float32)})
      print(f"saved {k}", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("directory")
  parser.add_argument("--algos", default="local_sgd")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--save-every", type=int, default=1)
  parser.add_argument("--sleep", type=float, default=0.0)
  parser.add_argument("--reference", type=int, default=0)
  parser.add_argument("--save-loop", action="store_true")
  args = parser.parse_args(argv)
  if args.save_loop:
    return _save_loop(args.directory)
  for name in args.algos.split(","):
    directory = os.path.join(args.directory, name)
    state = train(name, directory, args.steps, args.save_every, args.sleep, args.reference)
    np.savez(os.path.join(directory, "final.npz"), **flatten(state))
    print(json.dumps({"algorithm": name, "steps": args.steps}), flush=True)


if __name__ == "__main__":
  jax.config.update("jax_numpy_rank_promotion", "raise")
  main()


def test_sharded_anchor_rows_restore_on_the_same_mesh_with_a_clear_hint(tmp_path):
  """EASGD sharded over 2 devices saves D·(m/D + v) = 6 rows; the unsharded target has m + v = 5.

  The error names the mesh recipe; following it and unsharding gives the saved
  workers and the anchor (the NumPy rows put in).
  """
  tx = coopjax.easgd(optax.sgd(0.1, momentum=0.9), tau=2, alpha=0.1, num_workers=M)
  rows = np.arange(5.0)[:, None] * np.ones(DIM)  # x_0..x_3, then z = 4
  X0 = {"w": jnp.asarray(rows, jnp.float32)}
  mesh = coopjax.worker_mesh(2)
  X = coopjax.shard(X0, mesh, tx)
  state = {"X": X, "opt_state": coopjax.sharding.init(tx, X, mesh)}
  assert X["w"].shape == (6, DIM)
  with checkpoint.CheckpointManager(tmp_path) as mgr:
    mgr.save(1, state)
    with pytest.raises(ValueError, match="sharded X with auxiliary rows"):
      mgr.restore(target=checkpoint.abstract_target({"X": X0, "opt_state": tx.init(X0)}))
    with pytest.raises(ValueError, match="does not match target") as err:  # other trailing shapes
      mgr.restore(target=checkpoint.abstract_target({"X": {"w": jnp.zeros((6, DIM + 1))}}))
    assert "leading (row) axis" not in str(err.value)
    target = {"X": coopjax.shard(X0, mesh, tx), "opt_state": coopjax.sharding.init(tx, X, mesh)}
    out = mgr.restore(target=checkpoint.abstract_target(target))
  np.testing.assert_array_equal(np.asarray(coopjax.unshard(out["X"], mesh, tx)["w"]), rows)
