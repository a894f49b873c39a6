r"""Train m cooperative workers from a config; log metrics, modelled time, checkpoints.

Usage (from the repository root)::

  python experiments/train.py --config experiments/configs/default.py \
    --config.algorithm=easgd --config.tau=4 --config.alpha=0.1 --workdir /tmp/run
  python experiments/train.py --config experiments/configs/default.py:runlocal --workdir /tmp/t
  python experiments/train.py --config experiments/configs/default.py \
    --config.algorithm=easgd --config.tau=4 --config.alpha=0.1 --workdir /tmp/run --resume

The command line is parsed by ``ml_collections.config_flags``: ``--config
PATH[:ARG]`` loads ``get_config(ARG)`` from a Python file (it must come before
the overrides); ``--config.FIELD=VALUE`` (or ``--config.FIELD VALUE``)
overrides a field, nested fields with dots, parsed as the field's type.

One step (paper eq. 10, :func:`coopjax.make_step`) is

.. math::

   X_{k+1} = (X_k - \eta_k G_k)\, W_k, \qquad W_k = W \text{ if } k \bmod \tau = 0 \text{ else } I .

Every ``log_every`` steps a row goes to ``WORKDIR/metrics.jsonl`` and
``WORKDIR/metrics.csv`` (the same columns, see :data:`COLUMNS`); every
``eval_every`` steps (and at steps 0 and the last) the row also holds the
loss and accuracy on the test set and on a fixed training subset of the model
of :func:`coopjax.evaluation_model`: the averaged model of paper eq. 13
:math:`u_k = X_k\mathbf 1/(m+v)` for the mixed leaves, the workers' mean for
leaves kept per worker (BatchNorm statistics), after settling a reduction in
flight.

Time. The modelled wall-clock charges every step ``config.compute_time``
seconds of compute (a fixed figure, the default, so that two runs differ only
by their communication; ``compute_source`` says ``fixed``), or with
``compute_time=0`` the step's measured time (``measured``: wall time of the
jitted step with ``jax.block_until_ready``, compilation and the first
execution excluded; ``measured_compute_time`` always holds it). The
communication is *modelled* (one machine cannot measure a cluster's
network): the transformation says what step k sends (``tx.comm(k, state)``,
a :class:`coopjax.cost.MixCost`) and :func:`coopjax.netmodel.mix_time` prices
it with the α–β model,

.. math::

   T_{\text{mix}} = r\,\alpha + \nu\,B\,\beta ,

r latency rounds and ν model-sized payloads per worker, B the bytes of one
model's mixed leaves, α = ``network.latency``, 1/β = ``network.bandwidth``.
The modelled wall-clock adds T_mix to the step that mixes (blocking), or, for
transformations whose mixes overlap the next steps (``tx.overlaps``), lets it
run during the following steps and waits only if it is still in flight at the
next mix (:func:`coopjax.netmodel.modelled_wallclock`); a Streaming DiLoCo
sync (``tx.consume_at`` = τ) starts at its snapshot and must have arrived at
its apply step, τ steps later, as in ``experiments/streaming.py``.
``real_time`` is the measured wall time of the loop on this machine.

Checkpoints (``WORKDIR/checkpoints``, :class:`coopjax.checkpoint.CheckpointManager`)
hold :class:`TrainState` ``(step, X, opt_state, rng)`` and, as JSON, the
config, the data-iterator position and the running clocks; ``--resume``
continues from the latest one and yields the same iterates as an
uninterrupted run. A non-finite loss stops the run cleanly, naming the step
and the workers.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags
from ml_collections import config_flags

import coopjax
from coopjax import diagnostics
from coopjax.cost import netmodel
from coopjax.training import checkpoint as ckpt
from coopjax.training import data as cdata
from coopjax.training import models as cmodels

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import registry  # noqa: E402

PyTree = Any

__all__ = [
  "TrainState",
  "Run",
  "COLUMNS",
  "load_config",
  "parse_args",
  "make_schedule",
  "make_local_optimizer",
  "make_model",
  "setup",
  "evaluate",
  "loop",
  "write_summary",
  "train",
  "main",
]

DEFAULT_CONFIG = os.path.join(_HERE, "configs", "default.py")
DEFAULT_WORKDIR = os.path.join(tempfile.gettempdir(), "coopjax_train")

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
  "compute_source",
  "measured_compute_time",
  "comm_time",
  "modelled_time",
  "real_time",
)

# The events a run lists in summary.json (and its checkpoints carry over to a resumed run).
_EVENTS = ("skipped", "quarantined", "rejoined")

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
# command line


def parse_args(argv: Sequence[str] | None = None):
  """Parses the command line with ``ml_collections.config_flags``: ``(config, workdir, resume)``.

  ``--config PATH[:ARG]`` (default ``experiments/configs/default.py``), then any
  ``--config.FIELD=VALUE`` overrides, ``--workdir DIR`` and ``--resume``.

  Raises:
    TypeError: a value that does not parse as its field's type.
    ValueError: an unknown field or argument, or a missing config file.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if "-h" in argv or "--help" in argv:
    print(__doc__)
    print("Fields of the default config (experiments/configs/default.py):\n")
    print(_parse([])[0])
    raise SystemExit(0)
  config, workdir, resume = _parse(argv)
  base = _parse(_config_spec(argv))[0]
  _check_sequences(base, config)
  return config, workdir, resume


def _check_sequences(base, config, prefix: str = "") -> None:
  """Tuple fields keep their elements' type (``--config.hidden=wide`` is refused)."""
  for key, default in base.items():
    value, field = config[key], f"{prefix}{key}"
    if isinstance(default, ml_collections.ConfigDict):
      _check_sequences(default, value, field + ".")
    elif isinstance(default, (tuple, list)) and default and isinstance(value, (tuple, list)):
      kind = float if isinstance(default[0], float) else type(default[0])
      ok = (int, float) if kind is float else (kind,)
      bad = [x for x in value if isinstance(x, bool) or not isinstance(x, ok)]
      if bad:
        raise TypeError(
          f"--config.{field}: {tuple(value)!r} holds {bad[0]!r}; the field holds "
          f"{kind.__name__}s, e.g. {tuple(default)!r}."
        )


def _parse(argv: list[str]):
  full = [sys.argv[0] if sys.argv else "train.py", *argv]
  fv = flags.FlagValues()
  try:
    with warnings.catch_warnings():  # config_flags loads the file with importlib's load_module
      warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
      # without --config the default file is loaded (and overridden) here already
      config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "PATH[:ARG] of a config file", flag_values=fv, sys_argv=full
      )
      flags.DEFINE_string("workdir", DEFAULT_WORKDIR, "output folder", flag_values=fv)
      flags.DEFINE_bool("resume", False, "continue from the latest checkpoint", flag_values=fv)
      rest = fv(full)
      config = fv.config
  except flags.IllegalFlagValueError as error:
    raise TypeError(f"{error}: the value does not fit the field's type.") from None
  except flags.UnrecognizedFlagError as error:
    raise ValueError(f"{error}; fields are set with --config.FIELD=VALUE.") from None
  except (AttributeError, KeyError) as error:  # an override naming no field
    raise ValueError(_unknown_field(argv) or f"unknown field {error}.") from None
  except flags.Error as error:
    raise ValueError(str(error)) from None
  except OSError as error:
    raise ValueError(f"cannot load the config: {error}") from None
  if len(rest) > 1:
    raise ValueError(
      f"unrecognised argument {rest[1]!r}; fields are set with --config.FIELD=VALUE."
    )
  return ml_collections.ConfigDict(config.to_dict()), fv.workdir, fv.resume


def _config_spec(argv: list[str]) -> list[str]:
  """The ``--config=PATH[:ARG]`` argument of ``argv`` (empty: the default config)."""
  spec = [
    a for i, a in enumerate(argv) if a.startswith("--config=") or argv[i - 1 : i] == ["--config"]
  ]
  return [a if a.startswith("--config=") else f"--config={a}" for a in spec[-1:]]


def _unknown_field(argv: list[str]) -> str | None:
  """A message naming the first ``--config.FIELD`` override that is no field of the config
  (with the closest field's name), or None."""
  spec = _config_spec(argv)
  base = _parse(spec)[0]
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config.") :].split("=")[0]
    node, done = base, []
    for part in path.split("."):
      if not isinstance(node, ml_collections.ConfigDict):
        return (
          f"--config.{path}: --config.{'.'.join(done)} holds a value ({type(node).__name__}), "
          "not a group of fields; fields are listed by --help."
        )
      if part not in node:
        near = difflib.get_close_matches(part, list(node.keys()), n=1)
        prefix = "--config." + "".join(f"{d}." for d in done)
        hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
        where = spec[0].split("=", 1)[1] if spec else DEFAULT_CONFIG
        return (
          f"--config.{path}: unknown field {'.'.join([*done, part])!r}{hint}; the fields of "
          f"{where} are listed by --help."
        )
      node, done = node[part], [*done, part]
  return None


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``get_config(ARG)`` of the config file ``PATH[:ARG]``, parsed as by the command line."""
  return parse_args(["--config", spec])[0]


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


MODELS = ("mlp", "mlp_bn", "cnn", "resnet20", "vgg16")


def make_model(config, num_classes: int):
  """The flax module named by ``config.model`` (see :data:`MODELS`)."""
  if config.model == "mlp":
    return cmodels.MLP(features=tuple(config.hidden), num_classes=num_classes)
  if config.model == "mlp_bn":
    return cmodels.MLP(features=tuple(config.hidden), num_classes=num_classes, norm="batch")
  if config.model == "cnn":
    return cmodels.CNN(num_classes=num_classes)
  if config.model == "resnet20":
    return cmodels.ResNet20(num_classes=num_classes, norm=config.norm)
  if config.model == "vgg16":
    return cmodels.VGG16(num_classes=num_classes, norm=config.norm)
  raise ValueError(f"model must be one of {', '.join(MODELS)}; got {config.model!r}.")


@functools.lru_cache(maxsize=16)
def _init_variables(model, shape: tuple[int, ...], seed: int):
  # flax init is slow on CPU: cache it across in-process runs of the same model.
  return model.init(jax.random.key(seed), jnp.zeros((1, *shape), jnp.float32))


@functools.lru_cache(maxsize=8)
def _load_data(name: str, data_dir: str):
  return cdata.load_dataset(name, data_dir or None)


def _tree_bytes(tree, bytes_per_param: int) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree))) * int(bytes_per_param)


class _Clocks(NamedTuple):
  """The run's clocks, advanced one step at a time (saved with checkpoints)."""

  compute_time: float = 0.0
  measured_compute_time: float = 0.0
  comm_time: float = 0.0
  modelled_time: float = 0.0
  pending_until: float = 0.0
  bytes_sent: float = 0.0
  mixes: int = 0
  real_time: float = 0.0
  recent: tuple = ()  # with lead τ: the modelled times after the last τ steps

  def advance(
    self, compute: float, measured: float, cost, seconds: float, nbytes: float, lead: int = 0
  ):
    """One step of :func:`coopjax.netmodel.modelled_wallclock`, incrementally.

    ``compute`` is the compute time charged, ``measured`` the step's measured
    time, ``cost`` what it communicates (a ``MixCost``) and ``seconds`` its
    priced time (:func:`coopjax.netmodel.mix_time`). An overlappable mix runs
    during the following steps and the next mix waits for it; with ``lead``
    τ > 0 (``tx.consume_at``: Streaming DiLoCo) the mix recorded at step k
    is the sync issued at its snapshot k − τ and awaited now:
    ``t_k = max(t_{k−1} + compute, t_{k−τ} + seconds)``.
    """
    modelled, pending, mixes = self.modelled_time + compute, self.pending_until, self.mixes
    if cost.collective != "none":
      mixes += 1
      if cost.overlappable and lead:
        issued = self.recent[-lead] if len(self.recent) >= lead else 0.0
        modelled = max(modelled, issued + seconds)
      elif cost.overlappable:
        modelled = max(modelled, pending)
        pending = modelled + seconds
      else:
        modelled += seconds
    return self._replace(
      recent=(*self.recent, modelled)[-lead:] if lead else (),
      compute_time=self.compute_time + compute,
      measured_compute_time=self.measured_compute_time + measured,
      comm_time=self.comm_time + seconds,
      modelled_time=modelled,
      pending_until=pending,
      bytes_sent=self.bytes_sent + cost.bytes_sent(nbytes),
      mixes=mixes,
    )


def _nonfinite(metrics: dict, step: int) -> tuple[list[int], str]:
  """Workers whose loss, gradient or model went NaN/Inf at ``step``, and a message."""
  try:
    diagnostics.check_finite(metrics, step=step)
  except diagnostics.DivergenceError as error:
    return (error.workers or error.rows or [-1]), str(error)
  return [], ""


def _fault(spec: str) -> tuple[int, int] | None:
  """``"WORKER@STEP"`` (config ``fault_nan``) as ``(worker, step)``, or None."""
  if not spec:
    return None
  try:
    worker, step = (int(part) for part in str(spec).split("@"))
  except ValueError:
    raise ValueError(
      f"fault_nan must be 'WORKER@STEP' (e.g. '2@10': NaN in worker 2's batch at step 10), "
      f"got {spec!r}."
    ) from None
  return worker, step


def _check_failure_options(config, policy: str, m: int, num_steps: int) -> None:
  """Quarantine's options need ``on_nonfinite="quarantine"``; a drill must name a worker and a
  step of the run (else it would never fire)."""
  if policy != "quarantine":
    for key, default in (("readmit_after", 0), ("disconnected", "error")):
      if config.get(key, default) != default:
        raise ValueError(
          f"config.{key}={config[key]!r} applies to on_nonfinite='quarantine' only (here "
          f"on_nonfinite={policy!r}); set --config.on_nonfinite=quarantine or leave "
          f"config.{key} at {default!r}."
        )
  fault = _fault(config.get("fault_nan", ""))
  if fault is not None:
    worker, step = fault
    if not 0 <= worker < m:
      raise ValueError(
        f"fault_nan={config.fault_nan!r}: worker {worker} is not one of the {m} workers "
        f"(0..{m - 1}); the drill would never fire."
      )
    if not 1 <= step <= num_steps:
      raise ValueError(
        f"fault_nan={config.fault_nan!r}: step {step} is not a step of the run (1..{num_steps}); "
        "the drill would never fire."
      )


def _poison(batch, worker: int):
  """The batch with worker ``worker``'s floating-point inputs set to NaN."""
  return jax.tree.map(
    lambda a: (
      jnp.asarray(a).at[worker].set(jnp.nan) if jnp.issubdtype(a.dtype, jnp.floating) else a
    ),
    batch,
  )


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
# setup


class Run(NamedTuple):
  """What :func:`setup` builds and the loop, evaluation and output use.

  Attributes:
    config: the run's config.
    workdir: the output folder.
    data: the dataset (:class:`coopjax.data.Dataset`).
    batches: the per-worker batch iterator.
    eval_train: the fixed training subset ``(x, y)`` for the training loss.
    model: the flax module.
    variables: one model's initial variables.
    tx: the algorithm (a self-describing coopjax transformation).
    step_fn: the jitted step ``(X, opt_state, batch) -> (X, opt_state, metrics)``.
    place: puts a batch where the step wants it (sharded or not).
    mesh: the device mesh, or None.
    lr: the learning rate (float or schedule).
    num_steps: K, the steps of the run.
    steps_per_epoch: batches per epoch.
    nbytes: B, the bytes of one model's mixed leaves.
    net: the α–β network model.
    policy: ``on_nonfinite``, ``"stop"``, ``"skip"`` or ``"quarantine"``.
  """

  config: ml_collections.ConfigDict
  workdir: str
  data: Any
  batches: Any
  eval_train: tuple
  model: Any
  variables: PyTree
  tx: Any
  step_fn: Any
  place: Any
  mesh: Any
  lr: Any
  num_steps: int
  steps_per_epoch: int
  nbytes: int
  net: netmodel.NetworkModel
  policy: str


def _data(config):
  try:
    return _load_data(config.dataset, config.data_dir or "")
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


def setup(config: ml_collections.ConfigDict, workdir: str) -> tuple[Run, TrainState]:
  """Data, model, algorithm and step of ``config``, and the initial :class:`TrainState`."""
  config = ml_collections.ConfigDict(config.to_dict())
  os.makedirs(workdir, exist_ok=True)
  m = int(config.num_workers)
  ds = _data(config)
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
  if not float(config.compute_time) >= 0:
    raise ValueError(
      f"config.compute_time must be >= 0 (seconds per step; 0: measured), got "
      f"{config.compute_time}."
    )
  eval_idx = np.random.default_rng(config.seed).permutation(n_train)[: config.eval_train_size]
  eval_train = (ds.train_x[eval_idx], ds.train_y[eval_idx])

  model = make_model(config, ds.num_classes)
  variables = _init_variables(model, tuple(ds.train_x.shape[1:]), int(config.seed))
  bn = cmodels.has_batch_stats(model)
  mask = cmodels.params_mask(variables) if bn else None
  lr = make_schedule(config, spe, num_steps)
  local = make_local_optimizer(config, lr, decay_mask=mask)
  if bn and config.bn_policy not in ("local", "mixed"):
    raise ValueError(f"bn_policy must be 'local' or 'mixed', got {config.bn_policy!r}.")
  mix_mask = mask if (bn and config.bn_policy == "local") else None
  tx = registry.build(config, local, lr, mix_mask)
  mesh = None
  if config.get("sharded", False):
    # the worker axis sharded over the devices (m a multiple of their number)
    mesh = coopjax.worker_mesh(int(config.get("num_devices", 0)) or None)
  elif int(config.get("num_devices", 0)):
    raise ValueError(
      f"config.num_devices={config.num_devices} applies to sharded runs only; set "
      "--config.sharded=True or leave config.num_devices at 0."
    )
  sharded = {"mesh": mesh, "with_loss": True, "with_consensus": True} if mesh else {}
  if mesh:  # the reducing metrics (all-reduces) on the logged steps only
    sharded["log_every"] = int(config.log_every)
  if bn:
    loss_fn = cmodels.make_bn_loss_fn(model, ds.num_classes)
    sharded.update(has_aux=True, merge_aux=cmodels.merge_batch_stats)
  else:
    loss_fn = cmodels.make_loss_fn(model, ds.num_classes)
  policy = diagnostics.check_policy(config.get("on_nonfinite", "stop"))
  _check_failure_options(config, policy, m, num_steps)
  if policy == "quarantine":  # a failing worker is masked out inside the step
    tx = coopjax.with_live_mask(tx, disconnected=config.get("disconnected", "error"))
    readmit = int(config.get("readmit_after", 0)) or None
    sharded.update(on_nonfinite="quarantine", readmit_after=readmit)
  step_fn = coopjax.make_step(
    loss_fn, tx, num_workers=m, with_grad_norm=False, check_finite=True, jit=False, **sharded
  )
  if policy == "skip":  # a non-finite step is discarded inside the compiled step
    step_fn = diagnostics.skip_nonfinite(step_fn, donate=True)
  else:
    step_fn = jax.jit(step_fn, donate_argnums=(0, 1))
  mixed_tree = variables["params"] if mix_mask is not None else variables
  nbytes = _tree_bytes(mixed_tree, config.bytes_per_param)
  net = netmodel.NetworkModel(float(config.network.latency), float(config.network.bandwidth))
  net.check()

  X0 = coopjax.replicate(variables, m, tx.layout.num_aux)
  if mesh is None:
    # jit: one compilation instead of many small ones, and fresh buffers (some states
    # start as snapshots of X, and X and the state are both donated to the step)
    opt_state = jax.jit(tx.init)(X0)
    place = lambda batch: batch  # noqa: E731
  else:
    X0 = coopjax.shard(X0, mesh, tx.layout.num_aux)
    opt_state = coopjax.sharding.init(tx, X0, mesh, tx.layout.num_aux)
    place = lambda batch: coopjax.shard_batch(batch, mesh)  # noqa: E731
  state = TrainState(jnp.zeros([], jnp.int32), X0, opt_state, jax.random.key(config.seed))
  run = Run(
    config, workdir, ds, batches, eval_train, model, variables, tx, step_fn, place, mesh, lr,
    num_steps, spe, nbytes, net, policy,
  )  # fmt: skip
  return run, state


# ---------------------------------------------------------------------------
# evaluation


def evaluation_params(run: Run, state: TrainState) -> PyTree:
  """The model to evaluate: :func:`coopjax.evaluation_model` of the state's X."""
  X = state.X
  if run.mesh is not None:
    X = coopjax.unshard(X, run.mesh, run.tx.layout.num_aux)
  return coopjax.evaluation_model(X, run.tx, state.opt_state)


def evaluate(run: Run, state: TrainState) -> dict:
  """Loss and accuracy of :func:`evaluation_params` on the training subset and the test set."""
  u = evaluation_params(run, state)
  tr = cmodels.evaluate(run.model, u, *run.eval_train)
  te = cmodels.evaluate(run.model, u, run.data.test_x, run.data.test_y)
  return {
    "train_loss": tr["loss"],
    "train_accuracy": tr["accuracy"],
    "test_loss": te["loss"],
    "test_accuracy": te["accuracy"],
  }


# ---------------------------------------------------------------------------
# the loop


def _copy(tree):
  return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)


def _compile(run: Run, state: TrainState, batch):
  """The compiled step, and its compile time; one untimed execution on a copy warms it up."""
  t0 = time.perf_counter()
  options = {"xla_backend_optimization_level": 0} if run.config.get("fast_compile") else None
  compiled = run.step_fn.lower(state.X, state.opt_state, batch).compile(compiler_options=options)
  compile_time = time.perf_counter() - t0
  # the first execution allocates and warms caches: keep it off the measured clock
  jax.block_until_ready(compiled(_copy(state.X), _copy(state.opt_state), batch))
  return compiled, compile_time


class _Outcome(NamedTuple):
  state: TrainState
  clocks: _Clocks
  stopped: dict | None
  skipped: list
  compile_time: float
  quarantined: list
  rejoined: list


def loop(
  run: Run,
  state: TrainState,
  clocks: _Clocks,
  writer: _MetricsWriter,
  save,
  events: dict | None = None,
) -> _Outcome:
  """Steps ``state.step + 1 … num_steps``: logs rows, evaluates, checkpoints; stops on NaN.

  ``events`` holds the ``skipped``, ``quarantined`` and ``rejoined`` lists of the
  steps before ``state.step`` (a resumed run's, from its checkpoint); the
  outcome's lists continue them, and every checkpoint saves them.
  """
  config, tx, num_steps = run.config, run.tx, run.num_steps
  start = int(state.step)
  first = run.place(next(run.batches))
  compiled, compile_time = _compile(run, state, first)
  pending_batch = first
  fixed = float(config.compute_time)
  source = "fixed" if fixed > 0 else "measured"

  from tqdm import tqdm

  events = events or {}
  stopped = None
  skipped, quarantined, rejoined = (list(events.get(key, [])) for key in _EVENTS)

  def logged() -> dict:
    return dict(zip(_EVENTS, (skipped, quarantined, rejoined), strict=True))

  fault = _fault(config.get("fault_nan", ""))
  bar = tqdm(
    total=num_steps, initial=start, desc=config.algorithm, disable=not config.progress, leave=False
  )
  loop_start = time.perf_counter() - clocks.real_time
  try:
    for k in range(start + 1, num_steps + 1):
      batch = pending_batch if pending_batch is not None else run.place(next(run.batches))
      pending_batch = None
      if fault is not None and fault[1] == k:  # a drill: NaN in one worker's batch
        batch = _poison(batch, fault[0])
      t = time.perf_counter()
      X, opt_state, metrics = compiled(state.X, state.opt_state, batch)
      jax.block_until_ready((X, opt_state, metrics))
      measured = time.perf_counter() - t
      state = TrainState(jnp.asarray(k, jnp.int32), X, opt_state, state.rng)
      if run.policy == "quarantine":
        try:
          events = coopjax.live.check_quarantine(metrics, tx.disconnected, graph=tx.graph)
        except ValueError as error:
          stopped = {"step": k, "workers": [], "message": str(error)}
          print(f"{error} Stopping; the last checkpoint is kept.", file=sys.stderr)
          break
        for worker, at in events:
          quarantined.append({"worker": worker, "step": at})
          print(f"worker {worker} quarantined at step {at} (non-finite).", file=sys.stderr)
        for worker in np.flatnonzero(np.asarray(metrics["rejoined"])).tolist():
          rejoined.append({"worker": int(worker), "step": k})
          print(f"worker {worker} re-admitted at step {k}.", file=sys.stderr)
        run.batches.set_live(np.asarray(metrics["live"]))  # a masked worker's data waits
        bad, message = [], ""
      else:
        bad, message = _nonfinite(metrics, k)
      skip = bool(bad) and run.policy == "skip"
      if skip:  # the step kept X and the state as they were: no mix, nothing sent
        skipped.append({"step": k, "workers": bad})
        print(f"{message} Skipping this batch (on_nonfinite='skip').", file=sys.stderr)
      elif bad:
        stopped = {"step": k, "workers": bad, "message": message}
        print(f"{message} Stopping; the last checkpoint is kept.", file=sys.stderr)
        break
      cost = coopjax.cost.NO_COMM if skip else tx.comm(k, opt_state)
      seconds = netmodel.mix_time(cost, run.nbytes, run.net)
      lead = int(getattr(tx, "consume_at", None) or 0)  # a sync awaited τ steps after issue
      clocks = clocks.advance(fixed or measured, measured, cost, seconds, run.nbytes, lead)
      clocks = clocks._replace(real_time=time.perf_counter() - loop_start)
      bar.update(1)
      is_eval = k % config.eval_every == 0 or k == num_steps
      if k % config.log_every == 0 or is_eval:
        # with a mesh the step reduces loss and consensus on the steps log_every divides only
        # (NaN on the others): an evaluation row between them leaves them empty
        reduced = not skip and (run.mesh is None or k % config.log_every == 0)
        row = {
          "step": k,
          "epoch": k / run.steps_per_epoch,
          "lr": _lr_at(run.lr, k - 1),
          "loss": float(metrics["loss"]) if reduced else None,
          "consensus_distance": float(metrics["consensus_distance"]) if reduced else None,
          "compute_source": source,
          **clocks._asdict(),
        }
        if is_eval:
          row.update(evaluate(run, state))
        writer.write(row)
        if row["loss"] is not None:
          bar.set_postfix(loss=f"{row['loss']:.4f}")
      if config.checkpoint_every and k % config.checkpoint_every == 0:
        save(state, clocks, force=False, events=logged())
    if stopped is None:
      save(state, clocks, force=True, events=logged())
  finally:
    bar.close()
  return _Outcome(state, clocks, stopped, skipped, compile_time, quarantined, rejoined)


# ---------------------------------------------------------------------------
# output


def write_summary(run: Run, outcome: _Outcome, rows: list[dict], initial_loss) -> dict:
  """The run's summary dict, also written to ``workdir/summary.json``."""
  steps = int(outcome.state.step)
  clocks = outcome.clocks
  last_eval = next((r for r in reversed(rows) if r.get("test_accuracy") is not None), {})
  summary = {
    "algorithm": run.config.algorithm,
    "steps": steps,
    "num_params": cmodels.num_params(run.variables),
    "model_bytes": run.nbytes,
    "initial_loss": initial_loss,
    "final": last_eval,
    "compile_time": outcome.compile_time,
    "compute_time_per_step": clocks.compute_time / max(1, steps),
    "compute_source": "fixed" if float(run.config.compute_time) > 0 else "measured",
    "measured_compute_time_per_step": clocks.measured_compute_time / max(1, steps),
    "clocks": {k: v for k, v in clocks._asdict().items() if k != "recent"},
    "network": {"latency": run.net.latency, "bandwidth": run.net.bandwidth},
    "overlap": bool(run.tx.overlaps),
    "stopped": outcome.stopped,
    "skipped": outcome.skipped,
    "quarantined": outcome.quarantined,
    "rejoined": outcome.rejoined,
    "config": run.config.to_dict(),
  }
  with open(os.path.join(run.workdir, "summary.json"), "w") as f:
    json.dump(_jsonable(summary), f, indent=1)
  return summary


def write_results(outdir: str, results: dict, summary: str) -> None:
  """Writes ``results.json`` (machine-readable) and ``summary.md`` (the table) to ``outdir``."""
  os.makedirs(outdir, exist_ok=True)
  with open(os.path.join(outdir, "results.json"), "w") as f:
    json.dump(_jsonable(results), f, indent=1)
  with open(os.path.join(outdir, "summary.md"), "w") as f:
    f.write(summary if summary.endswith("\n") else summary + "\n")
  print(summary)


def _jsonable(obj):
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.generic,)):
    return obj.item()
  return obj


# ---------------------------------------------------------------------------
# the run


def _checkpoints(run: Run, state: TrainState, resume: bool):
  """The checkpoint manager, and the state, clocks, initial loss, kept rows and events to go on from."""
  config, workdir = run.config, run.workdir
  manager = ckpt.CheckpointManager(
    os.path.join(workdir, "checkpoints"),
    max_to_keep=int(config.checkpoint_keep),
    save_interval_steps=int(config.checkpoint_every) or max(run.num_steps, 1) * 10,
  )
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
    run.batches.restore(cdata.IteratorState(**meta["data"]))
    saved = meta["clocks"]
    clocks = _Clocks(**{**saved, "recent": tuple(saved.get("recent", ()))})
    events = meta.get("events", {})
    return manager, state, clocks, meta.get("initial_loss"), int(state.step), events
  if os.path.isdir(manager.directory) and manager.all_steps():
    # a fresh run replaces an earlier run's checkpoints in this workdir
    manager.close()
    shutil.rmtree(manager.directory)
    manager = ckpt.CheckpointManager(
      manager.directory,
      max_to_keep=int(config.checkpoint_keep),
      save_interval_steps=manager.save_interval_steps,
    )
  return manager, state, _Clocks(), None, None, {}


def train(config: ml_collections.ConfigDict, workdir: str, resume: bool = False) -> dict:
  """Runs ``config`` and writes metrics, checkpoints and ``summary.json`` under ``workdir``.

  :func:`setup`, then :func:`loop` (which calls :func:`evaluate`), then
  :func:`write_summary`.

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
  with _config_errors():  # nothing has run yet: a bad field, value or combination
    run, state = setup(config, workdir)
    manager, state, clocks, initial_loss, keep_until, events = _checkpoints(run, state, resume)
  writer = _MetricsWriter(workdir, keep_until)
  if int(state.step) == 0:
    ev = evaluate(run, state)
    initial_loss = ev["train_loss"]
    source = "fixed" if float(run.config.compute_time) > 0 else "measured"
    writer.write(
      {"step": 0, "epoch": 0.0, "lr": _lr_at(run.lr, 0), "compute_source": source}
      | clocks._asdict()
      | ev
    )

  def save(st: TrainState, clk: _Clocks, force: bool, events: dict) -> None:
    meta = {
      "config": run.config.to_dict(),
      "data": run.batches.state._asdict(),
      "clocks": clk._asdict(),
      "initial_loss": initial_loss,
      "events": events,  # skipped, quarantined and rejoined so far: summary.json lists them all
    }
    manager.save(int(st.step), st, meta=meta, force=force)

  try:
    outcome = loop(run, state, clocks, writer, save, events)
  finally:
    writer.close()
    manager.close()
  return write_summary(run, outcome, writer.rows, initial_loss)


@contextlib.contextmanager
def _config_errors():
  """Marks the errors raised inside as the config's (the command line prints them alone)."""
  try:
    yield
  except (ValueError, TypeError, FileNotFoundError) as error:
    error.config_error = True
    raise


def main(argv: Sequence[str] | None = None) -> dict:
  """Command-line entry point; returns the run's summary (see :func:`train`)."""
  with _config_errors():
    config, workdir, resume = parse_args(argv)
  summary = train(config, workdir, resume=resume)
  final = summary["final"]
  if final:
    print(
      f"{config.algorithm}: step {summary['steps']}, train loss {final['train_loss']:.4f}, "
      f"test accuracy {final['test_accuracy']:.4f}, modelled time "
      f"{summary['clocks']['modelled_time']:.3f} s ({summary['compute_source']} compute); "
      f"metrics in {workdir}"
    )
  return summary


if __name__ == "__main__":
  try:
    sys.exit(1 if main()["stopped"] else 0)
  except (ValueError, TypeError, FileNotFoundError) as error:
    if not getattr(error, "config_error", False):
      raise
    print(f"train.py: error: {error}", file=sys.stderr)
    sys.exit(2)
