"""Argument checks shared by the public API: clear errors that name the value and the fix."""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["check_int", "check_real", "check_positive"]


def check_int(name: str, value, minimum: int = 1) -> int:
  """``value`` as an int, which must be an integer (not a bool) ``>= minimum``.

  Examples:
    >>> import numpy as np
    >>> check_int("tau", np.int64(4))
    4
    >>> check_int("tau", 0)
    Traceback (most recent call last):
    ...
    ValueError: tau must be >= 1, got 0.
    >>> check_int("tau", True)
    Traceback (most recent call last):
    ...
    TypeError: tau must be an integer, got True of type bool.
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}.")
  value = int(value)
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")
  return value


def check_real(name: str, value) -> float:
  """``value`` as a float, which must be a finite real number (not a bool).

  Examples:
    >>> check_real("alpha", 1)
    1.0
    >>> check_real("alpha", float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: alpha must be finite, got nan.
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}.")
  value = float(value)
  if not np.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value}.")
  return value


def check_positive(name: str, value) -> float:
  """``value`` as a float, which must be finite and > 0.

  Examples:
    >>> check_positive("lr", 0.1)
    0.1
    >>> check_positive("lr", 0)
    Traceback (most recent call last):
    ...
    ValueError: lr must be finite and > 0, got 0.0.
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}.")
  value = float(value)
  if not (np.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be finite and > 0, got {value}.")
  return value
