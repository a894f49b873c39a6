"""The README's Python examples run as written (on the 8 fake CPU devices)."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert len(blocks) == 2
  ns = {}
  exec(compile(blocks[0], str(README), "exec"), ns)  # the single-device loop
  X1, tx, batch, unsharded_step = ns["X"], ns["tx"], ns["batch"], ns["step"]
  exec(compile(blocks[1], str(README), "exec"), ns)  # the sharded step from X1
  jax.block_until_ready(ns["Xs"])
  expected, _, _ = unsharded_step(X1, tx.init(X1), batch)
  got = ns["coopjax"].unshard(ns["Xs"], ns["mesh"])
  np.testing.assert_allclose(np.asarray(got["w"]), np.asarray(expected["w"]), rtol=1e-5)
  assert not np.allclose(np.asarray(got["w"]), np.asarray(X1["w"]))  # it did move


def test_experiment_scripts_start_as_commands():
  """``python experiments/X.py --help`` runs for every script: run as a command, the script's
  folder is first on ``sys.path``, where a file named like a module that JAX or the standard
  library imports (e.g. ``compression``) would shadow it."""
  root = README.parent
  scripts = sorted(
    p for p in (root / "experiments").glob("*.py") if "__main__" in p.read_text(encoding="utf-8")
  )
  shadowing = {p.stem for p in scripts} & (set(sys.stdlib_module_names) | {"compression"})
  assert not shadowing, f"experiments/ scripts named like modules JAX may import: {shadowing}"
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  procs = {
    p.name: subprocess.Popen(
      [sys.executable, str(p), "--help"],
      cwd=root,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for p in scripts
  }
  failed = {}
  for name, proc in procs.items():
    out, _ = proc.communicate(timeout=300)
    if proc.returncode != 0:
      failed[name] = out[-800:]
  assert not failed, failed
