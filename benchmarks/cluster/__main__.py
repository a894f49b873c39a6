"""Command line: ``python -m benchmarks.cluster {list,cleanup,run}``.

* ``list``: leftovers of runs that did not tear down (``--all``: also live runs).
* ``cleanup``: removes them (``--all``: also those of live runs).
* ``run N --rate 100mbit -- CMD ...``: brings up N nodes, runs CMD on each,
  prints each node's output, tears down; exits non-zero if a node failed.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.cluster.emulate import PREFIX
from benchmarks.cluster.emulate import Cluster
from benchmarks.cluster.emulate import ClusterError
from benchmarks.cluster.emulate import cleanup
from benchmarks.cluster.emulate import leftovers


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__)
  sub = parser.add_subparsers(dest="cmd", required=True)
  for name in ("list", "cleanup"):
    p = sub.add_parser(name)
    p.add_argument("--all", action="store_true", help="also the namespaces of live runs")
    p.add_argument("--prefix", default=PREFIX, help=f"name prefix (default {PREFIX})")
  run = sub.add_parser("run")
  run.add_argument("nodes", type=int)
  run.add_argument("--rate", default="1gbit")
  run.add_argument("--groups", type=int, default=None, help="group size")
  run.add_argument("--group-rate", default=None)
  run.add_argument("--timeout", type=float, default=600.0)
  argv = list(sys.argv[1:] if argv is None else argv)
  command = argv[argv.index("--") + 1 :] if "--" in argv else []
  args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
  try:
    if args.cmd == "list":
      print("\n".join(leftovers(args.all, args.prefix)) or "none")
      return 0
    if args.cmd == "cleanup":
      removed = cleanup(args.all, args.prefix)
      print("removed: " + (", ".join(removed) or "nothing"))
      return 0
    if not command:
      parser.error("run needs a command after --")
    with Cluster(args.nodes, args.rate, groups=args.groups, group_rate=args.group_rate) as c:
      results = c.run(command, timeout=args.timeout)
    for r in results:
      print(f"--- node {r.node} (exit {r.returncode})\n{r.stdout}", end="")
    return max((abs(r.returncode) for r in results), default=0) and 1
  except ClusterError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
