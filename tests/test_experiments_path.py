"""Scripts in experiments/ run as ``python experiments/X.py``: experiments/ comes first on sys.path.

A module there named like one that jax imports shadows it. jax's compilation
cache tries ``from compression import zstd`` (the standard library's
``compression`` package from Python 3.14); an ``experiments/compression.py``
was imported instead, re-entered jax while it was initialising and made every
such script fail with a circular-import AttributeError.
"""

import os
import subprocess
import sys

EXPERIMENTS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"
)


def test_jax_imports_with_experiments_first_on_path():
  # ``python -c`` puts the working directory first on sys.path, as a script puts its folder.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("PYTHONPATH", None)
  result = subprocess.run(
    [sys.executable, "-c", "import jax.numpy, sys; print(sys.path[0] == '')"],
    cwd=EXPERIMENTS,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "True"
