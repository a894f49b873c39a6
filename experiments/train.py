r"""Train m cooperative workers from a config; log metrics, modelled time, checkpoints.

Usage (from the repository root)::

  python experiments/train.py --config experiments/configs/default.py \
    --config.algorithm=easgd --config.tau=4 --config.alpha=0.1 --workdir /tmp/run
  python experiments/train.py --config experiments/configs/default.py:runlocal --workdir /tmp/t
  python experiments/train.py --config experiments/configs/default.py --workdir /tmp/run --resume

``--config PATH[:ARG]`` loads ``get_config(ARG)`` from a Python file;
``--config.FIELD=VALUE`` (or ``--config.FIELD VALUE``) overrides a field, nested
fields with dots. Values are read as Python literals (``8``, ``0.1``,
``(100, 150)``, ``True``) and otherwise as strings; they must match the
field's type (an int is accepted for a float field).

One step (paper eq. 10, :func:`coopjax.make_step`) is

.. math::

   X_{k+1} = (X_k - \eta_k G_k)\, W_k, \qquad W_k = W \text{ if } k \bmod \tau = 0 \text{ else } I .

Every ``log_every`` steps a row goes to ``WORKDIR/metrics.jsonl`` and
``WORKDIR/metrics.csv`` (the same columns, see :data:`COLUMNS`); every
``eval_every`` steps (and at steps 0 and the last) the row also holds the
loss and accuracy of the averaged model :math:`u_k = X_k\mathbf 1/(m+v)`
(paper eq. 13) on the test set and on a fixed training subset.

Time. ``compute_time`` is measured: wall time of the jitted step with
``jax.block_until_ready`` after every step (compilation excluded). The
communication is *modelled* (one machine cannot measure a cluster's network):
each mix is priced with the α–β model of :mod:`coopjax.netmodel`,

.. math::

   T_{\text{mix}} = r\,\alpha + \nu\,B\,\beta ,

r latency rounds and ν model-sized payloads per worker from
``experiments/registry.py`` (ring all-reduce: ``r = 2(m−1)``,
``ν = 2(m−1)/m``; neighbour exchange with Δ peers: ``r = ν = Δ``), B the bytes
of one model's mixed leaves, α = ``network.latency``, 1/β =
``network.bandwidth``. The modelled wall-clock adds T_mix to the step that
mixes (blocking), or, for non-blocking algorithms, lets it run during the
following steps and waits only if it is still in flight at the next mix
(:func:`coopjax.netmodel.modelled_wallclock`). ``real_time`` is the measured
wall time of the loop on this machine.

Checkpoints (``WORKDIR/checkpoints``, :class:`coopjax.checkpoint.CheckpointManager`)
hold :class:`TrainState` ``(step, X, opt_state, rng)`` and, as JSON, the
config, the data-iterator position and the running clocks; ``--resume``
continues from the latest one and yields the same iterates as an
uninterrupted run. A non-finite loss stops the run cleanly, naming the step
and the workers.
"""

from __future__ import annotations

import argparse
import ast
import csv
import functools
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import coopjax
from coopjax.training import data as cdata
from coopjax.training import models as cmodels

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import registry  # noqa: E402

PyTree = Any

__all__ = [
  "TrainState",
  "COLUMNS",
  "load_config",
  "apply_overrides",
  "parse_args",
  "make_schedule",
  "make_local_optimizer",
  "make_model",
  "mix_seconds",
  "train",
  "main",
]

DEFAULT_CONFIG = os.path.join(_HERE, "configs", "default.py")

#: Columns of ``metrics.csv`` (and keys of every ``metrics.jsonl`` row; eval
#: columns are empty / null on rows without an evaluation).
COLUMNS = (
  "step",
  "epoch",
  "lr",
  "loss",
  "consensus_distance",
  "train_loss",
  "train_accuracy",
  "test_loss",
  "test_accuracy",
  "mixes",
  "bytes_sent",
  "compute_time",
  "comm_time",
  "modelled_time",
  "real_time",
)

# Fields that may change between a run and its resumption.
_RESUMABLE_CHANGES = {
  "num_steps",
  "num_epochs",
  "progress",
  "log_every",
  "eval_every",
  "checkpoint_every",
  "checkpoint_keep",
}


class TrainState(NamedTuple):
  """Everything on the device that determines the rest of a run.

  Attributes:
    step: k, steps completed (int32 scalar).
    X: stacked models, leading axis m + v (workers, then auxiliaries).
    opt_state: the algorithm's state (step counter, local optimizer states, …).
    rng: a typed PRNG key (``jax.random.key(config.seed)``), kept for stochastic
      extensions; per-step keys derive from it with ``fold_in(rng, step)``.
  """

  step: jax.Array
  X: PyTree
  opt_state: PyTree
  rng: jax.Array


# ---------------------------------------------------------------------------
# config


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``get_config(arg)`` from ``PATH[:ARG]`` (a Python config file)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found; e.g. {DEFAULT_CONFIG}.")
  module_spec = importlib.util.spec_from_file_location("_coopjax_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config().")
  return module.get_config(arg) if arg else module.get_config()


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _coerce(field: str, old, new):
  if old is None or new is None:
    return new
  if isinstance(old, bool):
    if isinstance(new, bool):
      return new
    if isinstance(new, str) and new.lower() in ("true", "false"):
      return new.lower() == "true"
  elif isinstance(old, int) and isinstance(new, int) and not isinstance(new, bool):
    return new
  elif isinstance(old, float) and isinstance(new, (int, float)) and not isinstance(new, bool):
    return float(new)
  elif isinstance(old, str) and isinstance(new, str):
    return new
  elif isinstance(old, str):
    return str(new)
  elif isinstance(old, (tuple, list)):
    if isinstance(new, (int, float)) and not isinstance(new, bool):
      new = (new,)
    if isinstance(new, (tuple, list)):
      return tuple(new)
  raise TypeError(
    f"--config.{field}: value {new!r} ({type(new).__name__}) does not fit the field's type "
    f"{type(old).__name__} (current value {old!r})."
  )


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]
) -> ml_collections.ConfigDict:
  """Sets ``config.<field> = value`` for each ``(field, text)`` (dotted fields nest)."""
  for field, text in overrides:
    *parents, leaf = field.split(".")
    node = config
    for name in parents:
      if name not in node:
        raise ValueError(f"--config.{field}: no field {name!r} in the config.")
      node = node[name]
      if not isinstance(node, ml_collections.ConfigDict):
        raise ValueError(f"--config.{field}: {name!r} is a value, not a group of fields.")
    if leaf not in node:
      raise ValueError(
        f"--config.{field}: unknown field {leaf!r}; known fields: {sorted(node.keys())}."
      )
    value = _coerce(field, node[leaf], _literal(text))
    with node.ignore_type():
      node[leaf] = value
  return config


def parse_args(argv: Sequence[str] | None = None):
  """Parses the command line: ``(config, workdir, resume)``."""
  parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    epilog="Override config fields with --config.FIELD=VALUE.",
  )
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="PATH[:ARG] of a config file")
  parser.add_argument(
    "--workdir",
    default=os.path.join(tempfile.gettempdir(), "coopjax_train"),
    help="output folder (metrics, summary, checkpoints)",
  )
  parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
  args, rest = parser.parse_known_args(list(argv) if argv is not None else None)
  overrides, i = [], 0
  while i < len(rest):
    item = rest[i]
    if not item.startswith("--config."):
      parser.error(f"unrecognised argument {item!r}; fields are set with --config.FIELD=VALUE.")
    field = item[len("--config.") :]
    if "=" in field:
      field, text = field.split("=", 1)
    elif i + 1 < len(rest):
      i += 1
      text = rest[i]
    else:
      parser.error(f"{item} needs a value.")
    overrides.append((field, text))
    i += 1
  config = apply_overrides(load_config(args.config), overrides)
  return config, args.workdir, args.resume


# ---------------------------------------------------------------------------
# pieces


def make_schedule(config, steps_per_epoch: int, num_steps: int):
  r"""The learning rate :math:`\eta_k` as an optax schedule of the step count (or a float).

  ``constant``: η. ``step``: η·f^{#(decay_epochs ≤ epoch)} with f = ``decay_factor``.
  ``cosine``: :math:`\eta\,\tfrac12(1 + \cos(\pi k / K))` over the K steps of the run.
  """
  lr = float(config.lr)
  if config.schedule == "constant":
    return lr
  if config.schedule == "step":
    boundaries = {
      int(round(e * steps_per_epoch)): float(config.decay_factor) for e in config.decay_epochs
    }
    return optax.piecewise_constant_schedule(lr, boundaries)
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, max(1, num_steps))
  raise ValueError(f"schedule must be 'constant', 'step' or 'cosine', got {config.schedule!r}.")


def make_local_optimizer(config, lr, decay_mask=None) -> optax.GradientTransformation:
  """Each worker's optax optimizer: sgd, momentum, nesterov, adam or adamw (+ weight decay).

  Weight decay :math:`\\lambda x` is added to the gradient (``add_decayed_weights``)
  for sgd/momentum/nesterov/adam; adamw decouples it. ``decay_mask`` keeps it
  off non-trainable leaves (BatchNorm statistics).
  """
  name, wd = config.optimizer, float(config.weight_decay)
  if name == "adamw":
    return optax.adamw(lr, weight_decay=wd, mask=decay_mask)
  if name == "sgd":
    opt = optax.sgd(lr)
  elif name == "momentum":
    opt = optax.sgd(lr, momentum=config.momentum)
  elif name == "nesterov":
    opt = optax.sgd(lr, momentum=config.momentum, nesterov=True)
  elif name == "adam":
    opt = optax.adam(lr)
  else:
    raise ValueError(
      f"optimizer must be one of sgd, momentum, nesterov, adam, adamw; got {name!r}."
    )
  if wd:
    return optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), opt)
  return opt


def make_model(config, num_classes: int):
  """The flax module named by ``config.model``."""
  if config.model == "mlp":
    return cmodels.MLP(features=tuple(config.hidden), num_classes=num_classes)
  if config.model == "cnn":
    return cmodels.CNN(num_classes=num_classes)
  if config.model == "resnet20":
    return cmodels.ResNet20(num_classes=num_classes, norm=config.norm)
  if config.model == "vgg16":
    return cmodels.VGG16(num_classes=num_classes, norm=config.norm)
  raise ValueError(f"model must be one of mlp, cnn, resnet20, vgg16; got {config.model!r}.")


@functools.lru_cache(maxsize=16)
def _init_variables(model, shape: tuple[int, ...], seed: int):
  # flax init is slow on CPU: cache it across in-process runs of the same model.
  return model.init(jax.random.key(seed), jnp.zeros((1, *shape), jnp.float32))


@functools.lru_cache(maxsize=8)
def _load_data(name: str, data_dir: str):
  return cdata.load_dataset(name, data_dir or None)


def mix_seconds(comm: registry.Comm, nbytes: float, latency: float, bandwidth: float) -> float:
  r"""α–β time of one communication event: :math:`r\alpha + \nu B / \text{bandwidth}`."""
  return comm.rounds * latency + comm.volume * nbytes / bandwidth


def _tree_bytes(tree, bytes_per_param: int) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree))) * int(bytes_per_param)


class _Clocks(NamedTuple):
  compute_time: float = 0.0
  comm_time: float = 0.0
  modelled_time: float = 0.0
  pending_until: float = 0.0
  bytes_sent: float = 0.0
  mixes: int = 0
  real_time: float = 0.0


def _advance(
  clocks: _Clocks, measured: float, compute: float, comm_s: float, sent: float, overlap: bool
) -> _Clocks:
  """One step of :func:`coopjax.netmodel.modelled_wallclock`, incrementally.

  ``measured`` is the step's measured compute time, ``compute`` the compute
  time the model charges (the measured one unless ``config.compute_time``).
  """
  modelled, pending = clocks.modelled_time + compute, clocks.pending_until
  mixes = clocks.mixes
  if comm_s > 0 or sent > 0:
    mixes += 1
    if overlap:
      modelled = max(modelled, pending)
      pending = modelled + comm_s
    else:
      modelled += comm_s
  return clocks._replace(
    compute_time=clocks.compute_time + measured,
    comm_time=clocks.comm_time + comm_s,
    modelled_time=modelled,
    pending_until=pending,
    bytes_sent=clocks.bytes_sent + sent,
    mixes=mixes,
  )


def _nonfinite(metrics: dict, step: int) -> tuple[list[int], str]:
  """Workers whose loss, gradient or model went NaN/Inf at ``step``, and a message."""
  from coopjax import diagnostics

  try:
    diagnostics.check_finite(metrics, step=step)
  except diagnostics.DivergenceError as error:
    return (error.workers or error.rows or [-1]), str(error)
  return [], ""


def _read_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _write_rows(workdir: str, rows: list[dict]) -> None:
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  with open(os.path.join(workdir, "metrics.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})


class _MetricsWriter:
  """Appends rows to ``metrics.jsonl`` and ``metrics.csv`` (flushing each row)."""

  def __init__(self, workdir: str, keep_until: int | None):
    self.rows = []
    if keep_until is not None:
      self.rows = [
        r for r in _read_rows(os.path.join(workdir, "metrics.jsonl")) if r["step"] <= keep_until
      ]
    _write_rows(workdir, self.rows)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._csv_file = open(os.path.join(workdir, "metrics.csv"), "a", newline="")
    self._csv = csv.DictWriter(self._csv_file, fieldnames=COLUMNS)

  def write(self, row: dict) -> None:
    row = {k: row.get(k) for k in COLUMNS}
    self.rows.append(row)
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    self._csv.writerow({k: ("" if v is None else v) for k, v in row.items()})
    self._csv_file.flush()

  def close(self) -> None:
    self._jsonl.close()
    self._csv_file.close()


def _lr_at(lr, step: int) -> float:
  return float(lr(step)) if callable(lr) else float(lr)


# ---------------------------------------------------------------------------
# the run


def train(config: ml_collections.ConfigDict, workdir: str, resume: bool = False) -> dict:
  """Runs ``config`` and writes metrics, checkpoints and ``summary.json`` under ``workdir``.

  Args:
    config: the run's config (see ``experiments/configs/default.py``).
    workdir: output folder (created).
    resume: continue from the latest checkpoint in ``workdir/checkpoints``
      (starts fresh when there is none).

  Returns:
    The summary dict (also written to ``workdir/summary.json``): final
    metrics, clocks, the initial loss, ``stopped`` (None, or the step and
    workers where a loss became non-finite, with ``on_nonfinite="stop"``) and
    ``skipped`` (the discarded steps, with ``on_nonfinite="skip"``).
  """
  from coopjax.training import checkpoint as ckpt

  config = ml_collections.ConfigDict(config.to_dict())
  os.makedirs(workdir, exist_ok=True)
  m = int(config.num_workers)

  # data
  try:
    ds = _load_data(config.dataset, config.data_dir or "")
  except FileNotFoundError as error:
    raise FileNotFoundError(f"dataset {config.dataset!r} is not available: {error}") from error
  except (KeyError, AssertionError, OSError) as error:  # TFDS folders without prepared splits
    if config.dataset not in cdata.TFDS_DATASETS:
      raise
    raise FileNotFoundError(
      f"dataset {config.dataset!r} is not prepared under data_dir="
      f"{config.data_dir or '$TFDS_DATA_DIR or ~/tensorflow_datasets'!r} "
      f"({type(error).__name__}: {error}). Build it in array_record format: "
      f"tfds build {config.dataset} --file_format=array_record --data_dir DIR."
    ) from error
  n_train = len(ds.train_y)
  if config.split == "iid":
    shards = cdata.split_iid(n_train, m, seed=config.seed)
  elif config.split == "dirichlet":
    shards = cdata.split_dirichlet(ds.train_y, m, config.concentration, seed=config.seed)
  else:
    raise ValueError(f"split must be 'iid' or 'dirichlet', got {config.split!r}.")
  batches = cdata.make_worker_batches(
    ds.train_x, ds.train_y, shards, config.batch_size, seed=config.seed
  )
  spe = batches.steps_per_epoch
  num_steps = int(config.num_steps) or int(math.ceil(float(config.num_epochs) * spe))
  if num_steps < 1:
    raise ValueError("set config.num_steps or config.num_epochs to a positive value.")
  for name in ("log_every", "eval_every"):
    if int(config[name]) < 1:
      raise ValueError(f"config.{name} must be >= 1 (steps between rows), got {config[name]}.")
  if not float(config.lr) > 0:
    raise ValueError(f"config.lr must be > 0, got {config.lr}.")
  eval_idx = np.random.default_rng(config.seed).permutation(n_train)[: config.eval_train_size]
  eval_train = (ds.train_x[eval_idx], ds.train_y[eval_idx])

  # model, loss, algorithm
  model = make_model(config, ds.num_classes)
  variables = _init_variables(model, tuple(ds.train_x.shape[1:]), int(config.seed))
  bn = cmodels.has_batch_stats(model)
  mask = cmodels.params_mask(variables) if bn else None
  lr = make_schedule(config, spe, num_steps)
  local = make_local_optimizer(config, lr, decay_mask=mask)
  mix_mask = mask if (bn and config.bn_policy == "local") else None
  if bn and config.bn_policy not in ("local", "mixed"):
    raise ValueError(f"bn_policy must be 'local' or 'mixed', got {config.bn_policy!r}.")
  alg = registry.build(config, local, lr, mix_mask)
  mesh = None
  if config.get("sharded", False):
    # the worker axis sharded over the devices (m a multiple of their number)
    mesh = coopjax.worker_mesh(int(config.get("num_devices", 0)) or None)
  sharded = {"mesh": mesh, "with_loss": True, "with_consensus": True} if mesh else {}
  if bn:
    loss_fn = cmodels.make_bn_loss_fn(model, ds.num_classes)
    step_fn = coopjax.make_step(
      loss_fn,
      alg.tx,
      num_workers=m,
      has_aux=True,
      merge_aux=cmodels.merge_batch_stats,
      with_grad_norm=False,
      check_finite=True,
      jit=False,
      **sharded,
    )
  else:
    loss_fn = cmodels.make_loss_fn(model, ds.num_classes)
    step_fn = coopjax.make_step(
      loss_fn,
      alg.tx,
      num_workers=m,
      with_grad_norm=False,
      check_finite=True,
      jit=False,
      **sharded,
    )
  from coopjax import diagnostics

  policy = diagnostics.check_policy(config.get("on_nonfinite", "stop"))
  if policy == "skip":  # a non-finite step is discarded inside the compiled step
    step_fn = diagnostics.skip_nonfinite(step_fn, donate=True)
  else:
    step_fn = jax.jit(step_fn, donate_argnums=(0, 1))
  mixed_tree = variables["params"] if mix_mask is not None else variables
  nbytes = _tree_bytes(mixed_tree, config.bytes_per_param)
  net = coopjax.netmodel.NetworkModel(
    float(config.network.latency), float(config.network.bandwidth)
  ).check()

  X0 = coopjax.replicate(variables, m, alg.num_aux)
  if mesh is None:
    # jit: one compilation instead of many small ones, and fresh buffers (some states
    # start as snapshots of X, and X and the state are both donated to the step)
    opt_state = jax.jit(alg.tx.init)(X0)
    place = lambda batch: batch
  else:
    X0 = coopjax.shard(X0, mesh, alg.num_aux)
    opt_state = coopjax.sharding.init(alg.tx, X0, mesh, alg.num_aux)
    place = lambda batch: coopjax.shard_batch(batch, mesh)
  state = TrainState(jnp.zeros([], jnp.int32), X0, opt_state, jax.random.key(config.seed))

  # resume
  manager = ckpt.CheckpointManager(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=int(config.checkpoint_keep),
    save_interval_steps=int(config.checkpoint_every) or max(num_steps, 1) * 10,
  )
  clocks, initial_loss, keep_until = _Clocks(), None, None
  if resume and manager.latest_step() is not None:
    meta = manager.meta()
    saved = meta.get("config", {})
    changed = sorted(
      k
      for k in set(saved) | set(config.to_dict())
      if k not in _RESUMABLE_CHANGES
      and _jsonable(saved.get(k)) != _jsonable(config.to_dict().get(k))
    )
    if changed:
      raise ValueError(
        f"cannot resume {workdir}: the config differs from the checkpoint's in {changed}; "
        f"use the saved config or a new --workdir."
      )
    state = manager.restore(target=ckpt.abstract_target(state))
    batches.restore(cdata.IteratorState(**meta["data"]))
    clocks = _Clocks(**meta["clocks"])
    initial_loss = meta.get("initial_loss")
    keep_until = int(state.step)
  elif os.path.isdir(manager.directory) and manager.all_steps():
    # a fresh run replaces an earlier run's checkpoints in this workdir
    manager.close()
    shutil.rmtree(manager.directory)
    manager = ckpt.CheckpointManager(
      manager.directory,
      max_to_keep=int(config.checkpoint_keep),
      save_interval_steps=manager.save_interval_steps,
    )
  writer = _MetricsWriter(workdir, keep_until)
  start = int(state.step)

  def averaged(st: TrainState):
    X = st.X if mesh is None else coopjax.unshard(st.X, mesh, alg.num_aux)
    X = alg.settle(X, st.opt_state) if alg.settle is not None else X
    return coopjax.average(X)

  def evaluate(st: TrainState) -> dict:
    u = averaged(st)
    tr = cmodels.evaluate(model, u, *eval_train)
    te = cmodels.evaluate(model, u, ds.test_x, ds.test_y)
    return {
      "train_loss": tr["loss"],
      "train_accuracy": tr["accuracy"],
      "test_loss": te["loss"],
      "test_accuracy": te["accuracy"],
    }

  def save(st: TrainState, clk: _Clocks, force: bool) -> None:
    manager.save(
      int(st.step),
      st,
      meta={
        "config": config.to_dict(),
        "data": batches.state._asdict(),
        "clocks": clk._asdict(),
        "initial_loss": initial_loss,
      },
      force=force,
    )

  if start == 0:
    ev = evaluate(state)
    initial_loss = ev["train_loss"]
    writer.write({"step": 0, "epoch": 0.0, "lr": _lr_at(lr, 0), **clocks._asdict(), **ev})

  # compile once, outside the timed loop
  first = place(next(batches))
  t0 = time.perf_counter()
  options = {"xla_backend_optimization_level": 0} if config.get("fast_compile") else None
  compiled = step_fn.lower(state.X, state.opt_state, first).compile(compiler_options=options)
  compile_time = time.perf_counter() - t0
  pending_batch = first

  from tqdm import tqdm

  stopped = None
  skipped = []
  metrics = {}
  bar = tqdm(
    total=num_steps, initial=start, desc=config.algorithm, disable=not config.progress, leave=False
  )
  loop_start = time.perf_counter() - clocks.real_time
  try:
    for k in range(start + 1, num_steps + 1):
      batch = pending_batch if pending_batch is not None else place(next(batches))
      pending_batch = None
      t = time.perf_counter()
      X, opt_state, metrics = compiled(state.X, state.opt_state, batch)
      jax.block_until_ready((X, opt_state, metrics))
      compute = time.perf_counter() - t
      state = TrainState(jnp.asarray(k, jnp.int32), X, opt_state, state.rng)
      bad, message = _nonfinite(metrics, k)
      skip = bool(bad) and policy == "skip"
      if skip:  # the step kept X and the state as they were: no mix, nothing sent
        skipped.append({"step": k, "workers": bad})
        print(f"{message} Skipping this batch (on_nonfinite='skip').", file=sys.stderr)
      elif bad:
        stopped = {"step": k, "workers": bad, "message": message}
        print(f"{message} Stopping; the last checkpoint is kept.", file=sys.stderr)
        break
      comm = alg.comm(k, opt_state)
      clocks = _advance(
        clocks,
        compute,
        float(config.compute_time) or compute,
        0.0 if skip else mix_seconds(comm, nbytes, net.latency, net.bandwidth),
        0.0 if skip else comm.volume * nbytes,
        alg.overlap,
      )
      clocks = clocks._replace(real_time=time.perf_counter() - loop_start)
      bar.update(1)
      is_eval = k % config.eval_every == 0 or k == num_steps
      if k % config.log_every == 0 or is_eval:
        row = {
          "step": k,
          "epoch": k / spe,
          "lr": _lr_at(lr, k - 1),
          "loss": None if skip else float(metrics["loss"]),
          "consensus_distance": None if skip else float(metrics["consensus_distance"]),
          **clocks._asdict(),
        }
        if is_eval:
          row.update(evaluate(state))
        writer.write(row)
        if row["loss"] is not None:
          bar.set_postfix(loss=f"{row['loss']:.4f}")
      if config.checkpoint_every and k % config.checkpoint_every == 0:
        save(state, clocks, force=False)
    if stopped is None:
      save(state, clocks, force=True)
  finally:
    bar.close()
    writer.close()
    manager.close()

  rows = writer.rows
  last_eval = next((r for r in reversed(rows) if r.get("test_accuracy") is not None), {})
  summary = {
    "algorithm": config.algorithm,
    "steps": int(state.step),
    "num_params": cmodels.num_params(variables),
    "model_bytes": nbytes,
    "initial_loss": initial_loss,
    "final": last_eval,
    "compile_time": compile_time,
    "compute_time_per_step": clocks.compute_time / max(1, int(state.step)),
    "clocks": clocks._asdict(),
    "network": {"latency": net.latency, "bandwidth": net.bandwidth},
    "overlap": alg.overlap,
    "stopped": stopped,
    "skipped": skipped,
    "config": config.to_dict(),
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(_jsonable(summary), f, indent=1)
  return summary


def _jsonable(obj):
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.generic,)):
    return obj.item()
  return obj


def main(argv: Sequence[str] | None = None) -> dict:
  """Command-line entry point; returns the run's summary (see :func:`train`)."""
  config, workdir, resume = parse_args(argv)
  summary = train(config, workdir, resume=resume)
  final = summary["final"]
  if final:
    print(
      f"{config.algorithm}: step {summary['steps']}, train loss {final['train_loss']:.4f}, "
      f"test accuracy {final['test_accuracy']:.4f}, modelled time "
      f"{summary['clocks']['modelled_time']:.3f} s; metrics in {workdir}"
    )
  return summary


if __name__ == "__main__":
  sys.exit(1 if main()["stopped"] else 0)
