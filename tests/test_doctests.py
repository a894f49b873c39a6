"""Runs the docstring examples of every module of the package."""

import doctest
import importlib
import pkgutil

import pytest

import coopjax

MODULES = sorted(
  name
  for _, name, _ in pkgutil.walk_packages(coopjax.__path__, prefix="coopjax.")
  if not name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
