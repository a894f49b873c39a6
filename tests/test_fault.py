"""Multi-process failure: when one process dies, the survivor exits non-zero, fast.

Two processes × 4 CPU devices form one 8-device mesh (gloo collectives,
:func:`coopjax.distributed.initialize`) and run a jitted step with a
cross-process collective in a loop. One is SIGKILLed. The reference is the
configured heartbeat timeout: the survivor must exit with a non-zero status
and JAX's "another task died" message well within
``heartbeat + margin < 60 s``, never hang. Every wait here has a hard deadline.

This file doubles as the worker script (``python tests/test_fault.py PID PORT HEARTBEAT``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

HEARTBEAT = 10  # seconds
LIMIT = 60  # the survivor must be gone this long after the kill


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(pid: int, port: int) -> subprocess.Popen:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the worker asks for 4 devices itself
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.Popen(
    [sys.executable, "-u", os.path.abspath(__file__), str(pid), str(port), str(HEARTBEAT)],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _wait_for_line(proc, prefix: str, deadline: float) -> str:
  """Reads stdout until a line starts with ``prefix`` (or the deadline, or EOF)."""
  lines: list[str] = []

  def read():
    for line in proc.stdout:
      lines.append(line)
      if line.startswith(prefix):
        return

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  reader.join(timeout=max(deadline - time.monotonic(), 0))
  return "".join(lines)


@pytest.mark.parametrize("victim", [1, 0], ids=["kill_worker", "kill_coordinator"])
def test_survivor_exits_nonzero_within_timeout_when_a_process_dies(victim):
  port = _free_port()
  procs = [_start(i, port) for i in range(2)]
  try:
    deadline = time.monotonic() + 90
    for p in procs:
      out = _wait_for_line(p, "step 10", deadline)
      assert "step 10" in out, (
        f"the 2-process run did not start: {out!r} {p.poll()} {p.stderr.read()[-2000:]!r}"
      )
    survivor = procs[1 - victim]
    procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
      rc = survivor.wait(timeout=LIMIT)
    except subprocess.TimeoutExpired:
      pytest.fail(f"the survivor was still running {LIMIT} s after the other process died")
    elapsed = time.monotonic() - killed_at
    err = survivor.stderr.read()
    print(f"survivor (process {1 - victim}) exited with {rc} after {elapsed:.1f} s")
    assert rc != 0
    assert elapsed < HEARTBEAT + 20, elapsed
    assert "another task died" in err or "stopped sending heartbeats" in err, err[-2000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
      p.wait(timeout=30)
      for f in (p.stdout, p.stderr):
        f.close()


def test_initialize_rejects_bad_timeouts():
  from coopjax.parallel import distributed

  for bad in (0, -5, 2.5, "10", True):
    with pytest.raises(ValueError, match="heartbeat_timeout_seconds"):
      distributed.initialize(
        "127.0.0.1:1", 2, 0, cpu_collectives=None, heartbeat_timeout_seconds=bad
      )


def _worker(pid: int, port: int, heartbeat: int) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from coopjax.parallel import distributed

  distributed.initialize(
    f"127.0.0.1:{port}",
    num_processes=2,
    process_id=pid,
    num_cpu_devices=4,
    heartbeat_timeout_seconds=heartbeat,
    shutdown_timeout_seconds=5,
    initialization_timeout=60,
  )
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("workers",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("workers"))
  x = jax.make_array_from_process_local_data(rows, np.ones((4, 3), np.float32))
  # The mean over the worker axis crosses the two processes.
  mix = jax.jit(lambda x: x - jnp.mean(x, 0, keepdims=True) + 1.0, out_shardings=rows)
  k = 0
  while True:
    x = jax.block_until_ready(mix(x))
    k += 1
    if k % 10 == 0:
      print(f"step {k}", flush=True)
    time.sleep(0.01)


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
