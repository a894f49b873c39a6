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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax

__all__ = ["ProcessInfo", "initialize", "process_info"]


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
