r"""Exact checkpoint and resume of a cooperative training run (orbax).

A run of A(τ, W, v) is determined by its state after step k,

.. math::

   (k,\; X_k,\; \text{opt\_state}_k,\; \text{rng}_k,\; \text{data position}_k,\; \text{config}),

where ``X_k`` stacks all ``m + v`` rows (workers and auxiliaries) and
``opt_state_k`` holds the step counter, every worker's local optimizer state
and whatever else an algorithm keeps (snapshots, anchors, outer-optimizer
moments). :class:`CheckpointManager` writes the array part (any pytree: dicts,
NamedTuples, typed ``jax.random.key`` arrays, sharded ``jax.Array``) with orbax
and the host part (config, data-iterator position: anything JSON) next to it,
so that restoring and running the remaining steps gives bit-identical arrays
to an uninterrupted run.

Restoring needs an abstract *target*: the pytree structure, shapes, dtypes and
(optionally) shardings of the state, e.g. ``jax.eval_shape`` of the
initialisation, or :func:`abstract_target` of a freshly initialised state.
NamedTuple types, key arrays and ``NamedSharding`` placements come back exactly
as in the target.

Writes are atomic: orbax writes step ``k`` into a temporary directory and
renames it when complete, so a process killed during a save leaves the
previous checkpoint as the latest readable one (the partial directory is
ignored, and removed when the next manager opens the directory).

  >>> import tempfile, jax, jax.numpy as jnp, optax, coopjax
  >>> from coopjax import checkpoint
  >>> tx = coopjax.local_sgd(optax.sgd(0.1), tau=2, num_workers=2)
  >>> X = coopjax.replicate({"w": jnp.zeros(3)}, 2)
  >>> state = {"X": X, "opt_state": tx.init(X), "rng": jax.random.key(0)}
  >>> with checkpoint.CheckpointManager(tempfile.mkdtemp(), max_to_keep=2) as mgr:
  ...   _ = mgr.save(4, state, meta={"config": {"tau": 2}}, force=True)
  ...   restored = mgr.restore(target=checkpoint.abstract_target(state))
  ...   mgr.latest_step(), mgr.meta()["config"]
  (4, {'tau': 2})
  >>> type(restored["opt_state"]).__name__, restored["rng"].dtype
  ('CooperativeState', key<fry>)
"""

from __future__ import annotations

import json
import numbers
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = [
  "CheckpointManager",
  "abstract_target",
  "to_json",
]

_KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
_META_VERSION = 1


def _ocp():
  import orbax.checkpoint as ocp

  return ocp


def _is_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(dtype) -> str:
  for name in _KEY_IMPLS:
    if jax.random.key(0, impl=name).dtype == dtype:
      return name
  raise TypeError(f"unknown PRNG key dtype {dtype}; known implementations: {_KEY_IMPLS}.")


def _key_data_sharding(sharding, ndim: int):
  """The sharding of ``key_data`` for a key array placed with ``sharding``."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec, None))
  return None


def _abstract_leaf(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, (numbers.Number, np.ndarray, np.generic)) and not hasattr(x, "sharding"):
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    raise TypeError(
      f"state has a leaf of type {type(x).__name__}; checkpointed state must be a pytree of "
      "arrays (put host values such as the config or the data position in meta=...)."
    )
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def abstract_target(state: PyTree) -> PyTree:
  """``jax.ShapeDtypeStruct`` leaves (shape, dtype, sharding) of ``state``, for :meth:`restore`.

  Accepts concrete arrays or the output of ``jax.eval_shape``; shardings of
  ``jax.Array`` leaves are kept, so the state is restored onto the same devices.

  Args:
    state: a pytree of arrays or ``ShapeDtypeStruct``.

  Returns:
    The same pytree with ``ShapeDtypeStruct`` leaves.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> target = abstract_target({"w": jnp.zeros((2, 3)), "rng": jax.random.key(0)})
    >>> target["w"].shape, target["w"].dtype, target["rng"].dtype
    ((2, 3), dtype('float32'), key<fry>)
  """
  return jax.tree.map(_abstract_leaf, state)


def _encode(state: PyTree) -> PyTree:
  """Typed key arrays become their raw ``uint32`` key data (orbax stores plain arrays)."""

  def enc(x):
    if _is_key(x):
      return jax.random.key_data(x)
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      if isinstance(x, numbers.Number) and not isinstance(x, bool):
        return np.asarray(x)
      raise TypeError(
        f"state has a leaf of type {type(x).__name__}; checkpointed state must be a pytree of "
        "arrays (put host values such as the config or the data position in meta=...)."
      )
    return x

  return jax.tree.map(enc, state)


def _encode_target(target: PyTree) -> PyTree:
  def enc(x):
    x = _abstract_leaf(x)
    if _is_key(x):
      data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
      return jax.ShapeDtypeStruct(
        data.shape, data.dtype, sharding=_key_data_sharding(x.sharding, len(x.shape))
      )
    return x

  return jax.tree.map(enc, target)


def _decode(restored: PyTree, target: PyTree) -> PyTree:
  def dec(x, t):
    t = _abstract_leaf(t)
    if _is_key(t):
      key = jax.random.wrap_key_data(x, impl=_key_impl(t.dtype))
      sharding = getattr(t, "sharding", None)
      return jax.device_put(key, sharding) if sharding is not None else key
    return x

  return jax.tree.map(dec, restored, target)


def to_json(obj: Any, name: str = "meta") -> Any:
  """Converts ``obj`` to plain JSON types (dict, list, str, int, float, bool, None).

  Accepts mappings (including ``ml_collections.ConfigDict`` via ``to_dict``),
  NamedTuples (as dicts, e.g. :class:`coopjax.data.IteratorState`), tuples and
  lists, NumPy scalars and 0-d arrays. Non-finite floats are kept (JSON's
  ``NaN``/``Infinity`` extension, which Python reads back).

  Raises:
    TypeError: naming the path of a value that has no JSON form.

  Examples:
    >>> import numpy as np
    >>> from coopjax.training.data import IteratorState
    >>> to_json({"tau": np.int64(4), "data": IteratorState(1, 2), "lr": np.float32(0.5),
    ...          "shape": (2, 3)})
    {'tau': 4, 'data': {'epoch': 1, 'position': 2, 'lags': [], 'paused': []}, 'lr': 0.5, 'shape': [2, 3]}
    >>> to_json({"f": object()})
    Traceback (most recent call last):
    ...
    TypeError: meta['f'] = <object object at ...> of type object cannot be stored as JSON; ...
  """
  if hasattr(obj, "to_dict") and callable(obj.to_dict):
    obj = obj.to_dict()
  if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
    obj = obj._asdict()
  if isinstance(obj, Mapping):
    out = {}
    for k, v in obj.items():
      if not isinstance(k, str):
        raise TypeError(f"{name} has a non-string key {k!r}; JSON keys must be strings.")
      out[k] = to_json(v, f"{name}[{k!r}]")
    return out
  if isinstance(obj, (list, tuple)):
    return [to_json(v, f"{name}[{i}]") for i, v in enumerate(obj)]
  if obj is None or isinstance(obj, (str, bool)):
    return obj
  if isinstance(obj, np.ndarray) and obj.ndim == 0:
    obj = obj.item()
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, numbers.Integral):
    return int(obj)
  if isinstance(obj, numbers.Real):
    return float(obj)
  raise TypeError(
    f"{name} = {obj!r} of type {type(obj).__name__} cannot be stored as JSON; convert it to "
    "a number, string, list or dict (arrays belong in the checkpointed state)."
  )


def _check_step(step) -> int:
  if isinstance(step, bool) or not isinstance(step, (numbers.Integral, np.integer)):
    if (
      hasattr(step, "shape")
      and getattr(step, "shape", None) == ()
      and jnp.issubdtype(step.dtype, jnp.integer)
    ):
      step = int(step)
    else:
      raise TypeError(
        f"step must be a non-negative integer, got {step!r} of type {type(step).__name__}."
      )
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}.")
  return int(step)


def _check_positive_int(name: str, value, allow_none: bool = False):
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  return int(value)


def _remove_partial_saves(directory: str) -> None:
  """Deletes ``*.orbax-checkpoint-tmp-*`` folders: saves a killed process left unfinished.

  Orbax writes a step into such a temporary folder and renames it when complete,
  so these never hold a readable checkpoint. Done here, synchronously, because
  orbax's own clean-up may still be running when the manager is first used.
  """
  if not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if ".orbax-checkpoint-tmp-" in name:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _rows_hint(saved: list[tuple], want: list[tuple]) -> str:
  """A hint when the saved and wanted shapes differ in their leading (row) axis only."""
  trailing = lambda shapes: sorted((len(s), s[1:]) for s in shapes)  # noqa: E731
  if len(saved) != len(want) or trailing(saved) != trailing(want):
    return ""
  return (
    " Only the leading (row) axis differs: either the target has another number of workers "
    "(build it with the saved m, e.g. from meta()), or the state was saved from a sharded X "
    "with auxiliary rows (EASGD's anchor), which keeps a copy of them on every device, "
    "D·(m/D + v) rows instead of m + v: build the target on the same mesh "
    "(X0 = coopjax.shard(X0, mesh, tx), opt_state0 = coopjax.sharding.init(tx, X0, mesh)) and "
    "coopjax.unshard(X, mesh, tx) after restoring."
  )


class CheckpointManager:
  r"""Saves the training state every N steps and on demand; restores it exactly.

  A thin layer over ``orbax.checkpoint.CheckpointManager``: each checkpoint is
  a directory ``<directory>/<step>`` with two items, ``state`` (the arrays,
  orbax ``StandardSave``) and ``meta`` (JSON: config, data position, and
  anything else the caller passes). Saves are synchronous and atomic.

  Args:
    directory: where checkpoints live (created if missing).
    max_to_keep: keep the newest ``max_to_keep`` checkpoints (None keeps all).
    save_interval_steps: N; :meth:`save` writes when ``step % N == 0`` or
      ``force=True`` (use ``force`` at the end of a run or on a stop signal).
    cleanup_tmp: remove partial directories left by a process killed during a
      save (safe when this is the only writer, as when resuming).

  Examples:
    Saving every second step and keeping the newest two: of steps 0..5, steps
    0, 2 and 4 are written and step 0 is then dropped.

    >>> import tempfile, jax.numpy as jnp
    >>> from coopjax.training.data import IteratorState
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   with CheckpointManager(directory, max_to_keep=2, save_interval_steps=2) as mgr:
    ...     for k in range(6):
    ...       _ = mgr.save(k, {"w": jnp.full(3, float(k))}, meta={"data": IteratorState(0, k)})
    ...     target = abstract_target({"w": jnp.zeros(3)})
    ...     restored = mgr.restore(target=target)
    ...     print(mgr.all_steps(), mgr.latest_step(), mgr.should_save(7))
    ...     print(restored["w"].tolist(), mgr.meta())
    ...     print(mgr.restore(2, target=target)["w"].tolist(), mgr.meta(2))
    [2, 4] 4 False
    [4.0, 4.0, 4.0] {'data': {'epoch': 0, 'position': 4, 'lags': [], 'paused': []}}
    [2.0, 2.0, 2.0] {'data': {'epoch': 0, 'position': 2, 'lags': [], 'paused': []}}
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    max_to_keep: int | None = 3,
    save_interval_steps: int = 1,
    cleanup_tmp: bool = True,
  ):
    if not isinstance(directory, (str, os.PathLike)) or not str(directory):
      raise TypeError(f"directory must be a non-empty path, got {directory!r}.")
    self.max_to_keep = _check_positive_int("max_to_keep", max_to_keep, allow_none=True)
    self.save_interval_steps = _check_positive_int("save_interval_steps", save_interval_steps)
    self.directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise ValueError(f"checkpoint directory {self.directory} exists and is not a directory.")
    if cleanup_tmp:
      _remove_partial_saves(self.directory)
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=self.max_to_keep,
      save_interval_steps=1,
      create=True,
      cleanup_tmp_directories=cleanup_tmp,
      enable_async_checkpointing=False,
    )
    self._mgr = ocp.CheckpointManager(
      self.directory,
      options=options,
      # Registered up front, so that a fresh manager reads the items' metadata
      # (the shape check of restore) without orbax warning that it cannot.
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )

  # -- queries -------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Steps with a complete checkpoint, ascending."""
    self._mgr.reload()
    return sorted(int(s) for s in self._mgr.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None if there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def should_save(self, step: int) -> bool:
    """Whether :meth:`save` without ``force`` writes at ``step``."""
    return _check_step(step) % self.save_interval_steps == 0

  # -- save / restore ------------------------------------------------------

  def save(
    self,
    step: int,
    state: PyTree,
    *,
    meta: Mapping[str, Any] | None = None,
    force: bool = False,
  ) -> bool:
    """Writes ``state`` (and JSON ``meta``) as checkpoint ``step``.

    Args:
      step: k, the number of steps completed (≥ 0).
      state: pytree of arrays: X, opt_state, RNG keys (typed or raw), counters.
      meta: JSON-able host state: config, ``data.IteratorState``, anything small.
      force: save even if ``step`` is not a multiple of ``save_interval_steps``.

    Returns:
      True if a checkpoint was written; False if the step was skipped (not due,
      or already saved).
    """
    step = _check_step(step)
    if not force and not self.should_save(step):
      return False
    if step in self.all_steps():
      return False
    meta_json = {
      "format_version": _META_VERSION,
      "step": step,
      "user": to_json({} if meta is None else meta),
    }
    json.dumps(meta_json)  # fail here, not half-way through the write
    ocp = _ocp()
    encoded = _encode(state)
    if not jax.tree.leaves(encoded):
      raise ValueError("state has no array leaves; nothing to checkpoint.")
    saved = self._mgr.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(encoded), meta=ocp.args.JsonSave(meta_json)
      ),
      force=True,
    )
    self._mgr.wait_until_finished()
    return bool(saved)

  def _resolve(self, step) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {self.directory}.")
      return steps[-1]
    step = _check_step(step)
    if step not in steps:
      raise FileNotFoundError(
        f"no checkpoint for step {step} in {self.directory}; available steps: {steps}."
      )
    return step

  def restore(self, step: int | None = None, target: PyTree = None) -> PyTree:
    """Reads checkpoint ``step`` (default: the latest) into the structure of ``target``.

    Args:
      step: which checkpoint; None for :meth:`latest_step`.
      target: abstract state (``jax.eval_shape`` of the initialisation, or
        :func:`abstract_target` / concrete arrays of the same structure). It
        fixes the pytree types (NamedTuples), dtypes, typed key arrays and
        shardings of the result. None returns the raw saved tree for
        inspection (NamedTuples as dicts or lists, keys as ``uint32`` key data).

    Returns:
      The state, with the structure of ``target``.

    Raises:
      FileNotFoundError: no such checkpoint.
      ValueError: the checkpoint does not match ``target``.
    """
    step = self._resolve(step)
    ocp = _ocp()
    if target is None:
      restored = self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
      return restored["state"]
    abstract = _encode_target(target)
    saved = self._saved_shapes(step)
    want = [tuple(x.shape) for x in jax.tree.leaves(abstract)]
    if saved is not None and sorted(saved) != sorted(want):
      raise ValueError(
        f"checkpoint {step} in {self.directory} does not match target: it holds "
        f"{len(saved)} arrays with shapes {sorted(saved)}, the target has {len(want)} with "
        f"shapes {sorted(want)}; build the target from the same config as the saved run."
        + _rows_hint(saved, want)
      )
    try:
      restored = self._mgr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
      )
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"checkpoint {step} in {self.directory} does not match target: {e}") from e
    return _decode(restored["state"], target)

  def _saved_shapes(self, step: int) -> list[tuple[int, ...]] | None:
    try:
      md = self._mgr.item_metadata(step)
      tree = md["state"] if md is not None else None
    except Exception:  # metadata is a convenience: fall back to orbax's own checks
      return None
    if tree is None:
      return None
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return [tuple(x.shape) for x in leaves if hasattr(x, "shape")]

  def meta(self, step: int | None = None) -> dict:
    """The JSON ``meta`` saved with checkpoint ``step`` (default: the latest)."""
    step = self._resolve(step)
    ocp = _ocp()
    restored = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored["meta"]["user"]

  # -- lifetime ------------------------------------------------------------

  def wait_until_finished(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.close()

  def __enter__(self) -> CheckpointManager:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __repr__(self) -> str:
    return (
      f"CheckpointManager({self.directory!r}, max_to_keep={self.max_to_keep}, "
      f"save_interval_steps={self.save_interval_steps})"
    )
