"""Every program in examples/ runs (tiny sizes) and reaches its own checks."""

from __future__ import annotations

import pathlib
import runpy
import sys

import jax
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
FILES = sorted(p.name for p in EXAMPLES.glob("*.py"))
TINY = {"quickstart.py": ["--steps", "3"]}  # the others take --steps too


def test_every_example_is_listed():
  readme = (EXAMPLES.parent / "README.md").read_text()
  assert FILES and all(f"examples/{name}" in readme for name in FILES), FILES


@pytest.mark.parametrize("name", FILES)
def test_example_runs(name, monkeypatch, capsys):
  argv = TINY.get(name, ["--steps", "4"])
  monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *argv])
  runpy.run_path(str(EXAMPLES / name), run_name="__main__")
  jax.effects_barrier()
  assert capsys.readouterr().out.strip()  # it reported something
