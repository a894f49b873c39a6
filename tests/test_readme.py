"""The README's Python examples run as written (on the 8 fake CPU devices)."""

import pathlib
import re

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
