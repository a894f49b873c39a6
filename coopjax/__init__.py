"""coopjax: Cooperative SGD in JAX.

Communication-efficient distributed SGD, A(τ, W, v) of Wang & Joshi (JMLR 2021),
as optax gradient transformations over a stacked worker axis.
"""

from coopjax import topology

__version__ = "0.1.0"

__all__ = [
  "topology",
]
