"""Fake CPU devices for the benchmarks, set up before JAX is imported.

XLA reads ``XLA_FLAGS`` once, when JAX first initialises its backends, so a benchmark that
wants D fake CPU devices (``--xla_force_host_platform_device_count=D``) must set the flag
before its first ``import jax``. This module imports nothing from JAX for that reason: a
benchmark imports it, parses its arguments, calls :func:`force_host_devices`, and only then
imports JAX.

Usage::

  from _devices import add_devices_flag
  from _devices import force_host_devices

  ARGS = parse_args() if __name__ == "__main__" else parse_args([])
  if __name__ == "__main__":
    force_host_devices(ARGS.devices)

  import jax  # noqa: E402
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"


def add_devices_flag(parser: argparse.ArgumentParser, default: int = 8, help: str | None = None):
  """Adds ``--devices N``, the number of fake CPU devices, to a benchmark's parser."""
  parser.add_argument(
    "--devices",
    type=int,
    default=default,
    help=help or f"number of fake CPU devices when no accelerator is present (default {default})",
  )


def force_host_devices(count: int, extra: Sequence[str] = ()) -> bool:
  """Adds ``extra`` and ``--xla_force_host_platform_device_count=count`` to ``XLA_FLAGS``.

  A device count already in ``XLA_FLAGS`` (or in ``extra``) is kept: the caller's
  environment wins. Nothing changes once JAX is imported, where the flag would have no effect.

  Args:
    count: the number of fake CPU devices (used only on a host without an accelerator).
    extra: further XLA flags to append, e.g. scheduling flags already checked by the caller.

  Returns:
    Whether ``XLA_FLAGS`` was set (False when JAX had already been imported).
  """
  if "jax" in sys.modules:
    return False
  flags = " ".join([os.environ.get("XLA_FLAGS", ""), *extra])
  if DEVICE_COUNT_FLAG not in flags:
    flags += f" --{DEVICE_COUNT_FLAG}={count}"
  os.environ["XLA_FLAGS"] = flags.strip()
  return True
