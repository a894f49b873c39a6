r"""Multi-host runs: one process per host, one mesh over every host's devices.

:func:`initialize` wraps ``jax.distributed.initialize``. Call it first in every
process, before anything touches a device; then ``jax.devices()`` lists the
devices of all processes, ``coopjax.worker_mesh()`` spans them, and the
sharded step (``coopjax.make_step(..., mesh=mesh)``) runs unchanged: each
process feeds the batches of its own workers' devices and the collectives
cross hosts (NCCL on GPUs, ICI/DCN on TPUs, gloo on CPUs).

On GPU clusters and TPU pods under a supported launcher (SLURM, Open MPI,
Cloud TPU) the arguments are detected and may be left out. On CPUs the
cross-process collectives need gloo, which is selected here unless
``cpu_collectives=None``. See ``docs/devices.md`` for launch recipes.

Every process must build the same X, batches and optimizer state (same seeds);
:func:`coopjax.shard` and :func:`coopjax.shard_batch` place each process's
part, and :func:`coopjax.unshard` gathers the rows from all processes.

:func:`resilient_loop` keeps a run going when a process dies: each step runs
inside JAX's failure detection, and on a failure the survivors drop the dead
process's workers, rebuild the algorithm for the m′ workers left and go on
(``docs/elastic.md``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from coopjax import elastic
from coopjax import live as live_lib
from coopjax.algorithms import step_count
from coopjax.parallel import sharding
from coopjax.step import make_step
from coopjax.training.data import IteratorState
from coopjax.training.data import WorkerBatches

__all__ = [
  "Failure",
  "LoopResult",
  "ProcessInfo",
  "initialize",
  "process_info",
  "drop_devices",
  "resilient_loop",
  "shutdown",
]


class ProcessInfo(NamedTuple):
  """Where this process sits in a multi-process run.

  Attributes:
    process_index: this process's id, ``0 .. process_count − 1``.
    process_count: the number of processes.
    local_device_count: devices attached to this process.
    device_count: devices of all processes together.

  Examples:
    The second of two hosts with four devices each:

    >>> info = ProcessInfo(process_index=1, process_count=2, local_device_count=4, device_count=8)
    >>> info.device_count // info.process_count
    4
  """

  process_index: int
  process_count: int
  local_device_count: int
  device_count: int


def process_info() -> ProcessInfo:
  """The :class:`ProcessInfo` of the running process (initializes the backends).

  Examples:
    A single process (no :func:`initialize`) sees only its own devices:

    >>> import jax
    >>> info = process_info()
    >>> info.process_index, info.process_count
    (0, 1)
    >>> info.local_device_count == info.device_count == len(jax.devices())
    True
  """
  return ProcessInfo(
    jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count()
  )


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: int | Sequence[int] | None = None,
  *,
  cpu_collectives: str | None = "gloo",
  num_cpu_devices: int | None = None,
  heartbeat_timeout_seconds: int | None = None,
  shutdown_timeout_seconds: int | None = None,
  initialization_timeout: int | None = None,
  recoverable: bool = False,
  **kwargs: Any,
) -> ProcessInfo:
  """Joins this process to a multi-process JAX run (``jax.distributed.initialize``).

  Args:
    coordinator_address: ``"host:port"`` of process 0's coordinator service,
      reachable from every process (auto-detected under SLURM, Open MPI, TPU).
    num_processes: the number of processes.
    process_id: this process's id in ``0 .. num_processes − 1``.
    local_device_ids: the local GPUs this process drives (default: all visible).
    cpu_collectives: CPU cross-process collectives implementation
      (``"gloo"``, or ``"mpi"`` when JAX was built with it); set before the
      backends start. ``None`` leaves the setting alone.
    num_cpu_devices: devices per process on the CPU platform (testing several
      devices per host without accelerators); None leaves the default.
    heartbeat_timeout_seconds: how long the coordinator waits for a process's
      heartbeat before declaring it dead; then every surviving process aborts
      (non-zero exit, "another task died"). None keeps JAX's default (100 s).
      See ``docs/reliability.md``.
    shutdown_timeout_seconds: how long ``jax.distributed.shutdown`` (run at
      exit) waits for the other processes (JAX default 300 s).
    initialization_timeout: how long to wait for all processes to join (JAX
      default 300 s).
    recoverable: keep the other processes running when one dies
      (``jax_enable_recoverability``, set before joining), for
      :func:`resilient_loop`. Process 0 hosts the coordination service: its
      death still ends the run.
    **kwargs: passed to ``jax.distributed.initialize``.

  Returns:
    The :class:`ProcessInfo` after joining.

  Raises:
    ValueError: on an inconsistent ``num_processes`` / ``process_id``.

  Examples:
    A two-host run calls, first thing in each process (``process_id`` 0 on the
    host that runs the coordinator, 1 on the other)::

      info = coopjax.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)
      mesh = coopjax.worker_mesh()  # spans the devices of both hosts

    That cannot run inside one process whose devices are already in use, but
    the arguments are checked before anything starts:

    >>> initialize("localhost:1234", num_processes=2, process_id=2)
    Traceback (most recent call last):
    ...
    ValueError: process_id must be an integer in [0, num_processes=2), got 2.
  """
  if num_processes is not None and (not isinstance(num_processes, int) or num_processes < 1):
    raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}.")
  if process_id is not None and (
    not isinstance(process_id, int)
    or process_id < 0
    or (num_processes is not None and process_id >= num_processes)
  ):
    raise ValueError(
      f"process_id must be an integer in [0, num_processes={num_processes}), got {process_id!r}."
    )
  if not isinstance(recoverable, bool):
    raise TypeError(f"recoverable must be True or False, got {recoverable!r}.")
  if recoverable:
    jax.config.update("jax_enable_recoverability", True)
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if num_cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", int(num_cpu_devices))
  timeouts = {
    "heartbeat_timeout_seconds": heartbeat_timeout_seconds,
    "shutdown_timeout_seconds": shutdown_timeout_seconds,
    "initialization_timeout": initialization_timeout,
  }
  for name, value in timeouts.items():
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive integer number of seconds, got {value!r}.")
    kwargs[name] = value
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    local_device_ids=local_device_ids,
    **kwargs,
  )
  return process_info()


class Failure(NamedTuple):
  """One process failure survived by :func:`resilient_loop`.

  Attributes:
    step: the step that was running when the failure was reported, run again
      by the survivors (the last completed step is ``step − 1``).
    failed_processes: the ids of the processes that died.
    dropped_workers: the worker indices (of the run before) whose rows were
      on the dead processes' devices.
    num_workers: m before the failure.
    new_num_workers: m′ after it.
    detected_at: ``time.time()`` when the survivors got the failure.
    resumed_at: ``time.time()`` when step ``step`` completed on the survivors
      (rebuild and recompilation included).
  """

  step: int
  failed_processes: tuple[int, ...]
  dropped_workers: tuple[int, ...]
  num_workers: int
  new_num_workers: int
  detected_at: float
  resumed_at: float


class LoopResult(NamedTuple):
  """What :func:`resilient_loop` ends with.

  Attributes:
    X: the models after the last step (sharded over ``mesh``).
    opt_state: the optimizer state after the last step.
    tx: the transformation in use at the end (``make_tx(m′)`` after a failure).
    mesh: the mesh of the surviving devices.
    batches: the batch stream, positioned after the last step.
    failures: the failures survived, in order.
  """

  X: Any
  opt_state: Any
  tx: Any
  mesh: Any
  batches: WorkerBatches
  failures: tuple[Failure, ...]


def _local_step_count(opt_state) -> int:
  count = step_count(opt_state)
  if isinstance(count, jax.Array) and not count.is_fully_addressable:
    count = count.addressable_data(0)
  return int(np.asarray(count))


def _from_local(leaf, shape, target: NamedSharding):
  """A global array on ``target`` from this process's shards of ``leaf`` (no communication)."""
  devices = set(target.mesh.devices.flat)
  pieces = [s.data for s in leaf.addressable_shards if s.device in devices]
  return jax.make_array_from_single_device_arrays(tuple(shape), target, pieces)


def _block_shape(leaf) -> tuple[int, ...]:
  return tuple(leaf.addressable_shards[0].data.shape)


def _is_sharded(leaf) -> bool:
  spec = getattr(leaf.sharding, "spec", None)
  return spec is not None and len(spec) > 0 and spec[0] is not None


def _worker_rows(old, new, m: int, m_new: int, v: int) -> bool:
  """Whether a replicated leaf has one row per worker (a live mask): [m (+ v), ...] → [m′ (+ v)]."""
  return any(
    old.shape[:1] == (lead,) and tuple(new.shape) == (lead_new, *old.shape[1:])
    for lead, lead_new in ((m, m_new), (m + v, m_new + v))
  )


def _replicated_rows(leaf, rmap, num_aux: int, target: NamedSharding):
  """A replicated per-worker leaf with the kept workers' rows, from this process's copy."""
  rows = np.asarray(leaf.addressable_data(0))
  rows = np.concatenate([rows[np.asarray(rmap.keep)], rows[rmap.num_workers :][:num_aux]])
  devices = [d for d in target.mesh.devices.flat if d.process_index == jax.process_index()]
  pieces = [jax.device_put(rows, d) for d in devices]
  return jax.make_array_from_single_device_arrays(rows.shape, target, pieces)


def drop_devices(X, opt_state, tx, new_tx, mesh, new_mesh):
  """X and the optimizer state on ``new_mesh``: the rows of devices not in it dropped.

  The sharded representation keeps each device's workers and its copy of the
  auxiliary rows together, so the survivors' rows are rebuilt from this
  process's own shards without communication: device blocks of
  ``new_mesh`` keep their rows, the blocks of the missing devices are dropped.
  The optimizer state is matched leaf by leaf with
  ``coopjax.sharding.init(new_tx, X′, new_mesh)`` by the rules of
  :func:`coopjax.elastic.resize`: a leaf whose per-device block (sharded) or
  value (replicated) has the same shape is kept, a replicated leaf with one row
  per worker (the live mask of :func:`coopjax.with_live_mask`, its
  ``down_since``) keeps the surviving workers' rows, any other is taken fresh;
  state that is a function of W (CHOCO-SGD's ``s = W·x̂``) is then re-derived
  for ``new_tx``, as :func:`coopjax.elastic.resize` does.

  Args:
    X: sharded models over ``mesh``.
    opt_state: their optimizer state (from :func:`coopjax.sharding.init`).
    tx: the transformation for ``mesh``'s workers.
    new_tx: the same algorithm for the workers of ``new_mesh``.
    mesh: the mesh X lives on.
    new_mesh: a mesh over a subset of ``mesh``'s devices, in the same order.

  Returns:
    ``(X′, opt_state′)`` on ``new_mesh``.

  Examples:
    Four workers on two devices; the second device is lost, its workers 2 and 3
    with it:

    >>> import jax, jax.numpy as jnp, optax, coopjax
    >>> make_tx = lambda m: coopjax.local_sgd(optax.sgd(0.1, momentum=0.9), tau=2, num_workers=m)
    >>> mesh = coopjax.worker_mesh(2)
    >>> X = coopjax.shard(jnp.arange(4.0)[:, None], mesh, make_tx(4))
    >>> state = coopjax.sharding.init(make_tx(4), X, mesh)
    >>> X1, state1 = drop_devices(X, state, make_tx(4), make_tx(2), mesh, coopjax.worker_mesh(1))
    >>> X1.ravel().tolist(), coopjax.step_count(state1).tolist()
    ([0.0, 1.0], 0)
  """
  m, v = tx.layout
  D, D_new = sharding.num_devices(mesh), sharding.num_devices(new_mesh)
  b = m // D
  if new_tx.layout != (b * D_new, v):
    raise ValueError(
      f"new_tx has layout {tuple(new_tx.layout)} but the {D_new} surviving devices hold "
      f"{b * D_new} workers and {v} auxiliary rows; build it with make_tx({b * D_new})."
    )
  rows = sharding.worker_sharding(new_mesh)
  X_new = jax.tree.map(lambda x: _from_local(x, (D_new * (b + v), *x.shape[1:]), rows), X)
  fresh = sharding.init(new_tx, X_new, new_mesh)
  old_leaves, old_def = jax.tree.flatten(opt_state)
  fresh_leaves, fresh_def = jax.tree.flatten(fresh)
  if old_def != fresh_def:
    raise ValueError(
      "opt_state does not have the structure of new_tx's state: make_tx(m) must build the same "
      f"algorithm for every m; got {old_def} and {fresh_def}."
    )
  kept_devices = set(new_mesh.devices.flat)
  keep = [i * b + j for i, d in enumerate(mesh.devices.flat) if d in kept_devices for j in range(b)]
  rmap = elastic.row_map(m, b * D_new, keep)
  leaves = []
  for old, new in zip(old_leaves, fresh_leaves, strict=True):
    same_kind = _is_sharded(old) == _is_sharded(new)
    if same_kind and _block_shape(old) == _block_shape(new):
      leaves.append(_from_local(old, new.shape, new.sharding))
    elif not _is_sharded(old) and not _is_sharded(new) and _worker_rows(old, new, m, b * D_new, v):
      leaves.append(_replicated_rows(old, rmap, v if old.shape[0] == m + v else 0, new.sharding))
    else:
      leaves.append(new)
  state = jax.tree.unflatten(old_def, leaves)
  rederive = getattr(new_tx, "resized", None)  # state derived from W (CHOCO's s = W·x̂)
  if rederive is not None:
    derived = rederive(state)
    state = jax.tree.map(lambda d, s: jax.device_put(d, s.sharding), derived, state)
  return X_new, state


def resilient_loop(
  loss_fn: Callable[..., Any],
  tx,
  X,
  opt_state,
  batches: WorkerBatches,
  *,
  make_tx: Callable[[int], Any],
  make_shards: Callable[[int], Sequence[np.ndarray]],
  num_steps: int,
  mesh=None,
  step_options: dict | None = None,
  on_step: Callable[[int, dict], None] | None = None,
) -> LoopResult:
  r"""Runs steps up to ``num_steps``, surviving the death of processes other than process 0.

  Every step runs inside ``jax.experimental.multihost_utils.live_devices``,
  after an empty ``live_devices`` block that acts as a barrier of the live
  processes (a process that died since the last step is found there, before
  the step's collectives start): either all live processes complete the step,
  or all of them get ``ProcessFailureError``. Each block costs one round trip
  to the coordination service. On a failure at step k the survivors

  1. build the mesh of the live devices (same order);
  2. drop the rows of the dead devices' workers from X and from every
     per-worker leaf of the optimizer state (their own rows stay where they
     are: no communication), keeping the auxiliary rows and the replicated
     state (step counter, outer optimizer) — the state after step k − 1,
     which they still hold because the step does not donate its inputs;
  3. rebuild the algorithm for the m′ workers left with ``make_tx(m′)`` (the
     new W, EASGD's α) and the data assignment with
     ``batches.resplit(make_shards(m′))`` at step k − 1;
  4. recompile the step and run step k again.

  The step counter is kept, so the mixing schedule goes on where it was.
  Under a live mask (:func:`coopjax.with_live_mask`, e.g. quarantine) the
  data streams of masked workers are held after every step
  (``batches.set_live``), as ``docs/failures.md`` asks of a training loop;
  after a failure, on the re-split stream, for the workers still masked.
  In a single process (no :func:`initialize`) the loop runs without failure
  detection.

  What JAX 0.10 supports (``jax_enable_recoverability``, set by
  ``initialize(..., recoverable=True)``), and what this loop does:

  * **a process dies (crash, SIGKILL, lost host)**: the coordination service
    declares it dead after ``heartbeat_timeout_seconds``; the survivors' next
    ``live_devices`` exit raises ``ProcessFailureError``, and the loop
    recovers as above. A collective stuck on the dead peer must be cancelled
    first: JAX's documentation says this works fully only on GPUs. On CPUs
    with gloo the dead peer's TCP connections close, so the collective fails
    at once and the step is retried (measured, ``docs/elastic.md``). On TPUs
    JAX points to Pathways instead.
  * **process 0 dies**: it hosts the coordination service, so every process
    ends (non-zero exit); restart from the last checkpoint, possibly with a
    different m (:func:`coopjax.elastic.resize`).
  * **a process is alive but stuck** (a hung kernel, a deadlock): it still
    sends heartbeats, so nothing is detected and the run hangs; an external
    watchdog must kill it (then it is a dead process).

  Args:
    loss_fn: one worker's loss, as for :func:`coopjax.make_step`.
    tx: the transformation for the current m (``make_tx(m)``).
    X: sharded models (:func:`coopjax.shard` over ``mesh``).
    opt_state: their state (:func:`coopjax.sharding.init`).
    batches: the batch stream for the m workers, positioned at the next step;
      every process draws the full batch and places its own rows.
    make_tx: ``make_tx(m) -> tx``, the same algorithm for any number of workers.
    make_shards: ``make_shards(m) -> shards``, the data assignment for m
      workers (e.g. ``lambda m: data.split_iid(N, m, seed)``).
    num_steps: run until the step counter reaches this.
    mesh: the mesh X lives on (default: :func:`coopjax.worker_mesh` over all
      devices).
    step_options: keyword arguments for :func:`coopjax.make_step`.
    on_step: ``on_step(k, metrics)`` after each completed step k (``metrics``
      as returned by the step, JAX arrays).

  Returns:
    A :class:`LoopResult`. End each process with :func:`shutdown`.

  Raises:
    RuntimeError: in a multi-process run without ``jax_enable_recoverability``.

  Examples:
    In one process the loop is a plain training loop:

    >>> import jax, numpy as np, optax, coopjax
    >>> from coopjax import data, distributed
    >>> p = data.least_squares(num_examples=64, dim=3, seed=0)
    >>> make_tx = lambda m: coopjax.local_sgd(optax.sgd(0.1), tau=2, num_workers=m)
    >>> make_shards = lambda m: data.split_iid(64, m, seed=0)
    >>> mesh = coopjax.worker_mesh(2)
    >>> tx = make_tx(2)
    >>> X = coopjax.shard(coopjax.replicate(np.zeros(3, np.float32), tx), mesh, tx)
    >>> batches = data.make_worker_batches(p.x, p.y, make_shards(2), 4, keys=("x", "y"))
    >>> out = distributed.resilient_loop(
    ...   data.least_squares_loss, tx, X, coopjax.sharding.init(tx, X, mesh), batches,
    ...   make_tx=make_tx, make_shards=make_shards, num_steps=4, mesh=mesh)
    >>> int(coopjax.step_count(out.opt_state)), out.failures, out.batches.step
    (4, (), 4)
  """
  if mesh is None:
    mesh = sharding.worker_mesh()
  mesh = sharding.auto_mesh(mesh)
  num_steps = int(num_steps)
  options = dict(step_options or {})
  if options.get("donate"):
    raise ValueError(
      "resilient_loop keeps the state before each step to run it again after a failure; "
      "drop donate=True from step_options."
    )
  detect = jax.process_count() > 1
  if detect and not jax.config.jax_enable_recoverability:
    raise RuntimeError(
      "resilient_loop in a multi-process run needs jax_enable_recoverability, set before "
      "joining: coopjax.distributed.initialize(..., recoverable=True). Without it a dead "
      "process ends every process."
    )
  step = make_step(loss_fn, tx, mesh=mesh, **options)
  failures: list[Failure] = []
  pending: dict | None = None  # the failure whose retried step has not completed yet
  k = _local_step_count(opt_state)
  while k < num_steps:
    position = batches.step
    host_batch = next(batches)
    try:
      # A barrier first: a process that died since the last step is found here, before the
      # step's collectives start (on CPUs a collective that loses a peer mid-way may not end).
      with _detect(detect, list(mesh.devices.flat)):
        pass
      with _detect(detect, list(mesh.devices.flat)):
        X_next, state_next, metrics = step(X, opt_state, sharding.shard_batch(host_batch, mesh))
        jax.block_until_ready((X_next, state_next, metrics))
    except multihost_utils.ProcessFailureError as e:
      detected = time.time()
      dead = set(e.failed_devices)
      old = list(mesh.devices.flat)
      live = [d for d in old if d not in dead]
      m = tx.layout.num_workers
      b = m // len(old)
      rmap = elastic.row_map(
        m, b * len(live), [i * b + j for i, d in enumerate(old) if d not in dead for j in range(b)]
      )
      dropped = tuple(sorted(set(range(m)) - set(rmap.keep)))
      new_mesh = sharding.worker_mesh(devices=live)
      new_tx = make_tx(rmap.new_num_workers)
      X, opt_state = drop_devices(X, opt_state, tx, new_tx, mesh, new_mesh)
      batches.restore(IteratorState(*divmod(position, batches.steps_per_epoch)))
      batches = batches.resplit(make_shards(new_tx.layout.num_workers))
      _hold_masked(batches, opt_state)  # the mask as drop_devices mapped it
      pending = dict(
        step=k + 1,
        failed_processes=tuple(sorted({d.process_index for d in dead})),
        dropped_workers=dropped,
        num_workers=m,
        new_num_workers=new_tx.layout.num_workers,
        detected_at=detected,
      )
      tx, mesh = new_tx, new_mesh
      step = make_step(loss_fn, tx, mesh=mesh, **options)
      continue
    X, opt_state = X_next, state_next
    k += 1
    _hold_masked(batches, opt_state)
    if pending is not None:
      failures.append(Failure(**pending, resumed_at=time.time()))
      pending = None
    if on_step is not None:
      on_step(k, metrics)
  return LoopResult(X, opt_state, tx, mesh, batches, tuple(failures))


def _hold_masked(batches: WorkerBatches, opt_state) -> None:
  """Holds the data streams of the workers a live mask leaves out (``WorkerBatches.set_live``)."""
  ls = live_lib.find_live_state(opt_state)
  if ls is None:
    return
  batches.set_live(live_lib.host_flags(ls.live))


def shutdown(timeout_seconds: float = 60.0) -> None:
  """Leaves a multi-process run that may have lost processes: process 0 disconnects last.

  With ``jax_enable_recoverability`` JAX's shutdown barrier no longer holds the
  processes together, and a process still disconnecting when process 0 (the
  coordination service's host) has exited aborts. So: a barrier of the live
  processes; then every process but 0 disconnects, and process 0 waits until
  they have (at most ``timeout_seconds``) before it disconnects. Call it at the
  end of every process of a :func:`resilient_loop` run; without
  recoverability, or in a single process, it is ``jax.distributed.shutdown``.

  Examples:
    In one process that never joined a multi-process run it does nothing:

    >>> shutdown()
  """
  if jax.process_count() == 1 or not jax.config.jax_enable_recoverability:
    jax.distributed.shutdown()
    return
  devices = jax.devices()
  try:
    with multihost_utils.live_devices(devices):
      pass
  except multihost_utils.ProcessFailureError:
    pass  # one more process gone: the others are still together
  if jax.process_index() != 0:
    jax.distributed.shutdown()
    return
  deadline = time.monotonic() + float(timeout_seconds)
  while time.monotonic() < deadline:
    try:
      with multihost_utils.live_devices(devices) as live:
        pass
    except multihost_utils.ProcessFailureError:
      continue  # a process disconnected: look again
    if {d.process_index for d in live} <= {0}:
      break
    time.sleep(0.01)
  jax.distributed.shutdown()


class _NoDetection:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


def _detect(enabled: bool, devices):
  """``live_devices(devices)`` in a multi-process run, else a context that does nothing."""
  return multihost_utils.live_devices(devices) if enabled else _NoDetection()
