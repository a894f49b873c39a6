r"""An emulated cluster on one Linux machine: network namespaces, veth links, ``tbf`` rates.

Each node is a network namespace with one interface ``eth0`` (a veth pair
whose other end sits on a bridge). Bridges live in a namespace of their own,
so the root namespace's filtering is never in the path and the machine's own
interfaces, addresses and routes are untouched: every address used is
created here, inside these namespaces (``10.77.<group>.<node>/16``).

The rate of a node's link is a ``tbf`` qdisc on *both* ends of its veth (the
node's egress on ``eth0``, its ingress on the bridge side), which makes a
full-duplex NIC of rate R:

.. code-block:: text

   node i: netns <prefix>n<i>, eth0 --tbf R-- v<i> --+-- br<g>   (netns <prefix>sw)
                                                     |
   groups (optional):       br0 --tbf R_g-- up0 == up1 --tbf R_g-- br1

With ``groups`` the nodes are split into groups, each on its own bridge, and
the bridges are joined by one veth pair limited to ``group_rate``: every byte
between groups crosses that slower link (hierarchical averaging).

``tbf`` shapes bandwidth only; ``netem`` (added latency) is not assumed. Each
node process runs under ``ip netns exec <ns> unshare --uts`` with its own
hostname ``node<i>``, resolved by ``/etc/netns/<ns>/hosts``: gloo's TCP
transport binds to what ``gethostname()`` resolves to.

Names carry the owner's pid (``cj-<pid>-...``), so concurrent runs never
collide and the leftovers of a run that was killed (its pid gone) are
recognised: :class:`Cluster` refuses to start while they exist and
:func:`cleanup` removes them. Everything is torn down on exit, on an
exception, on Ctrl-C and on SIGTERM; after SIGKILL, run :func:`cleanup`
(``python -m benchmarks.cluster cleanup``).

Example (root)::

  with Cluster(4, rate="100mbit") as cluster:
    results = cluster.run([sys.executable, "node_program.py"], timeout=120)
  print(results[0].stdout)

Each node process gets ``CJ_NODE`` (its index), ``CJ_NUM_NODES``,
``CJ_COORDINATOR`` (``"10.77.0.1:<port>"``, node 0's address) and
``CJ_HOSTNAME`` in its environment.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import NamedTuple

__all__ = [
  "PREFIX",
  "ClusterError",
  "NodeResult",
  "Cluster",
  "check_environment",
  "parse_rate",
  "leftovers",
  "cleanup",
]

PREFIX = "cj-"
"""Every namespace, and every ``/etc/netns`` entry, this module creates starts with it."""

_NETNS_ETC = "/etc/netns"


class ClusterError(RuntimeError):
  """The emulated cluster cannot be built, run, or torn down; the message says why and what to do."""


class NodeResult(NamedTuple):
  """What one node's process returned.

  Attributes:
    node: the node index.
    returncode: the exit status (negative: killed by that signal).
    stdout: its standard output and error, interleaved.
  """

  node: int
  returncode: int
  stdout: str


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
  proc = subprocess.run(list(args), capture_output=True, text=True)
  if check and proc.returncode:
    raise ClusterError(f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
  return proc


def parse_rate(rate: str | float | int) -> float:
  """A link rate in bits per second: ``"100mbit"``, ``"1gbit"``, ``"500kbit"`` or a number."""
  if isinstance(rate, bool):
    raise TypeError(f"rate must be a string like '100mbit' or a number of bit/s, got {rate!r}.")
  if isinstance(rate, (int, float)):
    value = float(rate)
  else:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]?)bit\s*", str(rate).lower())
    if not match:
      raise ValueError(
        f"rate {rate!r} is not understood; write it as tc does, e.g. '100mbit', '1gbit', '500kbit'."
      )
    value = float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2)]
  if not value > 0:
    raise ValueError(f"rate must be positive, got {rate!r}.")
  return value


def _tc_rate(bits_per_s: float) -> str:
  return f"{int(round(bits_per_s))}bit"


def _burst_bytes(bits_per_s: float) -> int:
  # max(64 KiB, 2 ms at the rate): large enough for the kernel's timer granularity at 1 Gbit/s.
  return int(max(64 * 1024, 0.002 * bits_per_s / 8))


def check_environment() -> None:
  """Raises :class:`ClusterError` unless this process can build a cluster (root, iproute2, unshare)."""
  if os.name != "posix" or not os.path.isdir("/proc"):
    raise ClusterError("the emulated cluster needs Linux (network namespaces).")
  if os.geteuid() != 0:
    raise ClusterError(
      "the emulated cluster needs root (network namespaces, veth links and tc qdiscs); run as "
      "root, e.g. `sudo -E python ...`."
    )
  missing = [tool for tool in ("ip", "tc", "unshare", "hostname") if shutil.which(tool) is None]
  if missing:
    raise ClusterError(
      f"missing tools: {', '.join(missing)}; install them with `apt-get install iproute2 "
      "util-linux hostname`."
    )
  if _sh("ip", "netns", "list", check=False).returncode:
    raise ClusterError("`ip netns list` failed: this iproute2 or kernel has no network namespaces.")


def _namespaces() -> list[str]:
  out = _sh("ip", "netns", "list").stdout
  return [line.split()[0] for line in out.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
  """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      state = f.read().rsplit(")", 1)[1].split()[0]
  except (FileNotFoundError, ProcessLookupError, IndexError):
    return False
  return state not in ("Z", "X")


def leftovers(include_live: bool = False, prefix: str = PREFIX) -> list[str]:
  """Namespaces and ``/etc/netns`` entries named ``<prefix><pid>-...`` whose owner has exited.

  Args:
    include_live: also list those of runs still alive (other concurrent clusters).
    prefix: the name prefix (:data:`PREFIX` unless the cluster was given another).

  Returns:
    Sorted names (``/etc/netns`` entries as full paths).
  """
  owner = re.compile(rf"^{re.escape(prefix)}(\d+)-")
  names = [n for n in _namespaces() if n.startswith(prefix)]
  if os.path.isdir(_NETNS_ETC):
    names += [os.path.join(_NETNS_ETC, n) for n in os.listdir(_NETNS_ETC) if n.startswith(prefix)]

  def stale(name):
    match = owner.match(os.path.basename(name))
    return include_live or match is None or not _alive(int(match.group(1)))

  return sorted(n for n in set(names) if stale(n))


def _kill_namespace_processes(ns: str) -> None:
  pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
  for pid in pids:
    with contextlib.suppress(ProcessLookupError, ValueError):
      os.kill(int(pid), signal.SIGKILL)
  deadline = time.monotonic() + 5
  while pids and time.monotonic() < deadline:
    pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
    if pids:
      time.sleep(0.05)


def _remove(names: Sequence[str]) -> list[str]:
  """Kills what runs in the namespaces, deletes them and the /etc/netns entries; returns failures."""
  failed = []
  for name in names:
    if name.startswith(_NETNS_ETC + os.sep):
      shutil.rmtree(name, ignore_errors=True)
      if os.path.exists(name):
        failed.append(name)
      continue
    _kill_namespace_processes(name)
    proc = _sh("ip", "netns", "delete", name, check=False)
    if proc.returncode and name in _namespaces():
      failed.append(f"{name} ({proc.stderr.strip()})")
  return failed


def cleanup(include_live: bool = False, prefix: str = PREFIX) -> list[str]:
  """Removes the leftovers of crashed or killed runs (:func:`leftovers`); returns what it removed.

  Namespaces go with their veth ends and bridges; processes still inside them
  are killed first. ``include_live=True`` also removes the namespaces of runs
  still alive (use it only when none of yours is running).
  """
  check_environment()
  names = leftovers(include_live, prefix)
  failed = _remove(names)
  if failed:
    raise ClusterError(f"could not remove: {', '.join(failed)}.")
  return names


class Cluster:
  r"""N nodes joined by rate-limited links; a context manager that always tears down.

  Args:
    num_nodes: N ≥ 1.
    rate: each node's link rate (``"100mbit"``, ``"1gbit"``, or bit/s).
    groups: optional group size g (N a multiple of g): nodes ``0..g−1`` on one
      bridge, ``g..2g−1`` on the next, the bridges joined by a link of
      ``group_rate``.
    group_rate: the rate of the link between groups (required with groups).
    port: node 0's coordinator port.
    tag: an optional extra in the names (``cj-<pid>-<tag>-...``), letters and
      digits, to run several clusters from one process.
    prefix: the names' prefix (default :data:`PREFIX`); leftovers are looked
      for, and cleaned up, per prefix.

  Raises:
    ClusterError: not root, tools missing, or leftovers of a killed run
      (run :func:`cleanup`).
  """

  def __init__(
    self,
    num_nodes: int,
    rate: str | float = "1gbit",
    *,
    groups: int | None = None,
    group_rate: str | float | None = None,
    port: int = 47123,
    tag: str = "",
    prefix: str = PREFIX,
  ):
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
      raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}.")
    if num_nodes > 200:
      raise ValueError(f"num_nodes={num_nodes} is more than this emulation supports (200).")
    self.num_nodes = num_nodes
    self.rate = parse_rate(rate)
    if groups is not None:
      if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive group size, got {groups!r}.")
      if num_nodes % groups:
        raise ValueError(f"num_nodes={num_nodes} is not a multiple of the group size {groups}.")
      if group_rate is None:
        raise ValueError("groups needs group_rate, the rate of the link between groups.")
      self.group_rate = parse_rate(group_rate)
    elif group_rate is not None:
      raise ValueError("group_rate needs groups (the group size).")
    else:
      self.group_rate = None
    self.group_size = groups or num_nodes
    if not re.fullmatch(r"[a-z0-9]{0,8}", tag):
      raise ValueError(f"tag must be up to 8 lowercase letters or digits, got {tag!r}.")
    self.port = int(port)
    if not re.fullmatch(r"[a-z][a-z0-9]{0,5}-", prefix):
      raise ValueError(f"prefix must be 1-6 lowercase letters or digits and a '-', got {prefix!r}.")
    self.prefix = prefix
    stem = f"{prefix}{os.getpid()}-" + (f"{tag}-" if tag else "")
    self.switch = stem + "sw"
    self.nodes = [f"{stem}n{i}" for i in range(num_nodes)]
    self._up = False
    self._procs: list[subprocess.Popen] = []

  # -- addresses ---------------------------------------------------------------------------

  def address(self, node: int) -> str:
    """Node's IPv4 address (inside its namespace only)."""
    return f"10.77.{node // 250}.{node % 250 + 1}"

  @property
  def coordinator(self) -> str:
    """``"address:port"`` of node 0, for ``jax.distributed.initialize``."""
    return f"{self.address(0)}:{self.port}"

  def group(self, node: int) -> int:
    return node // self.group_size

  # -- bring-up and teardown -----------------------------------------------------------------

  def _shape(self, ns: str, dev: str, bits: float) -> None:
    _sh(
      "ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
      "rate", _tc_rate(bits), "burst", str(_burst_bytes(bits)), "latency", "100ms",
    )  # fmt: skip

  def up(self) -> Cluster:
    """Creates namespaces, bridges, links and rates. Tears down what it made if a step fails."""
    check_environment()
    stale = leftovers(prefix=self.prefix)
    if stale:
      hint = "" if self.prefix == PREFIX else f" --prefix {self.prefix}"
      raise ClusterError(
        f"leftovers of an earlier run that did not tear down: {', '.join(stale)}. Remove them "
        f"with `python -m benchmarks.cluster cleanup{hint}` (or benchmarks.cluster.cleanup())."
      )
    if any(n.startswith(self.switch[: -len("sw")]) for n in _namespaces()):
      raise ClusterError(f"namespaces {self.switch[:-2]}* already exist: this cluster is up.")
    self._up = True
    try:
      self._build()
    except BaseException:
      self.down()
      raise
    return self

  def _build(self) -> None:
    sw = self.switch
    _sh("ip", "netns", "add", sw)
    _sh("ip", "-n", sw, "link", "set", "lo", "up")
    num_groups = self.num_nodes // self.group_size
    for g in range(num_groups):
      _sh("ip", "-n", sw, "link", "add", f"br{g}", "type", "bridge")
      _sh("ip", "-n", sw, "link", "set", f"br{g}", "up")
    if num_groups > 1:
      # A chain of bridges br0 - br1 - ... joined by veth pairs limited to group_rate.
      for g in range(num_groups - 1):
        a, b = f"up{g}a", f"up{g}b"
        _sh("ip", "-n", sw, "link", "add", a, "type", "veth", "peer", "name", b)
        _sh("ip", "-n", sw, "link", "set", a, "master", f"br{g}", "up")
        _sh("ip", "-n", sw, "link", "set", b, "master", f"br{g + 1}", "up")
        self._shape(sw, a, self.group_rate)
        self._shape(sw, b, self.group_rate)
    hosts = "127.0.0.1 localhost\n" + "".join(
      f"{self.address(i)} node{i}\n" for i in range(self.num_nodes)
    )
    for i, ns in enumerate(self.nodes):
      _sh("ip", "netns", "add", ns)
      etc = os.path.join(_NETNS_ETC, ns)
      os.makedirs(etc, exist_ok=True)
      with open(os.path.join(etc, "hosts"), "w", encoding="utf-8") as f:
        f.write(hosts)
      _sh("ip", "-n", ns, "link", "set", "lo", "up")
      # Create the pair inside the node's namespace and move the far end to the switch.
      _sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"v{i}")
      _sh("ip", "-n", ns, "link", "set", f"v{i}", "netns", sw)
      _sh("ip", "-n", ns, "addr", "add", f"{self.address(i)}/16", "dev", "eth0")
      _sh("ip", "-n", ns, "link", "set", "eth0", "up")
      _sh("ip", "-n", sw, "link", "set", f"v{i}", "master", f"br{self.group(i)}", "up")
      self._shape(ns, "eth0", self.rate)
      self._shape(sw, f"v{i}", self.rate)

  def down(self) -> list[str]:
    """Kills the node processes and removes everything this cluster created; idempotent.

    Returns:
      What could not be removed (empty when teardown is clean).
    """
    for proc in self._procs:
      if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(proc.pid, signal.SIGKILL)
    for proc in self._procs:
      with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    self._procs = []
    if not self._up:
      return []
    self._up = False
    existing = set(_namespaces())
    names = [n for n in self.nodes + [self.switch] if n in existing]
    names += [
      os.path.join(_NETNS_ETC, n) for n in self.nodes if os.path.exists(os.path.join(_NETNS_ETC, n))
    ]
    return _remove(names)

  def __enter__(self) -> Cluster:
    self._old_term = signal.getsignal(signal.SIGTERM)
    in_main = _in_main_thread()
    if in_main:
      # SIGTERM -> SystemExit, so `with` unwinds and tears down.
      signal.signal(signal.SIGTERM, _raise_exit)
    try:
      return self.up()
    except BaseException:
      if in_main:
        signal.signal(signal.SIGTERM, self._old_term)
      raise

  def __exit__(self, *exc) -> None:
    try:
      failed = self.down()
    finally:
      if _in_main_thread():
        signal.signal(signal.SIGTERM, self._old_term)
    if failed and exc[0] is None:
      raise ClusterError(f"teardown left behind: {', '.join(failed)}; run cleanup().")

  # -- running -------------------------------------------------------------------------------

  def popen(self, node: int, command: Sequence[str], env: dict | None = None) -> subprocess.Popen:
    """Starts ``command`` in node's namespace with its own hostname; returns the process."""
    if not self._up:
      raise ClusterError("the cluster is not up: use it as `with Cluster(...) as cluster:`.")
    if not 0 <= node < self.num_nodes:
      raise ValueError(f"node must be in [0, {self.num_nodes}), got {node}.")
    full_env = dict(os.environ if env is None else env)
    full_env.update(
      CJ_NODE=str(node),
      CJ_NUM_NODES=str(self.num_nodes),
      CJ_COORDINATOR=self.coordinator,
      CJ_HOSTNAME=f"node{node}",
    )
    wrapped = [
      "ip", "netns", "exec", self.nodes[node], "unshare", "--uts", "sh", "-c",
      'hostname "$CJ_HOSTNAME" && exec "$@"', "sh", *command,
    ]  # fmt: skip
    proc = subprocess.Popen(
      wrapped,
      env=full_env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      start_new_session=True,
    )
    self._procs.append(proc)
    return proc

  def run(
    self,
    command: Sequence[str] | Sequence[Sequence[str]],
    *,
    env: dict | None = None,
    timeout: float = 600.0,
    grace: float = 10.0,
  ) -> list[NodeResult]:
    """Runs one process per node (the same command, or one command per node) and waits.

    Args:
      command: argv for every node, or a list of N argvs.
      env: the environment (default: this process's), plus the ``CJ_*`` variables.
      timeout: seconds for all of them together; on expiry all are killed.
      grace: seconds the others may still run after one node fails (then killed).

    Returns:
      One :class:`NodeResult` per node.

    Raises:
      ClusterError: on timeout (with the outputs so far).
    """
    commands = list(command)
    if commands and isinstance(commands[0], str):
      commands = [commands] * self.num_nodes
    if len(commands) != self.num_nodes:
      raise ValueError(f"need one command per node ({self.num_nodes}), got {len(commands)}.")
    procs = [self.popen(i, cmd, env) for i, cmd in enumerate(commands)]
    chunks: list[list[str]] = [[] for _ in procs]
    readers = [
      threading.Thread(target=lambda p=p, c=c: c.extend(p.stdout), daemon=True)
      for p, c in zip(procs, chunks, strict=True)
    ]
    for reader in readers:
      reader.start()
    deadline = time.monotonic() + timeout
    failed_at = None
    while any(p.poll() is None for p in procs):
      now = time.monotonic()
      if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
        failed_at = now  # one node failed: the others would wait for it forever
      if now > deadline or (failed_at is not None and now > failed_at + grace):
        for proc in procs:
          if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
              os.killpg(proc.pid, signal.SIGKILL)
        for proc in procs:
          proc.wait()
        break
      time.sleep(0.05)
    for reader in readers:
      reader.join(timeout=5)
    outputs = ["".join(c) for c in chunks]
    if time.monotonic() > deadline:
      tails = "\n".join(f"--- node {i}:\n{out[-2000:]}" for i, out in enumerate(outputs))
      raise ClusterError(f"the node processes did not finish in {timeout} s.\n{tails}")
    return [
      NodeResult(i, p.returncode, out)
      for i, (p, out) in enumerate(zip(procs, outputs, strict=True))
    ]


def _in_main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


def _raise_exit(signum, frame):
  raise SystemExit(128 + signum)
