r"""Algorithm registry: a name gives a coopjax factory; a config gives its keywords.

:data:`ALGORITHMS` maps every name to its factory (``coopjax.easgd``, …); every
factory is called the same way, ``factory(local, **keywords)``, with the local
optimizer first and the rest keyword. :func:`options` reads an algorithm's own
keywords from the config, :func:`build` adds the options every algorithm takes
(``order``, ``local_state_policy``, ``mix_mask``, ``warmup_steps``) and calls
the factory. What the returned transformation communicates at each step is its
own description (``tx.comm(k, opt_state)``, ``tx.overlaps``, ``tx.layout``):
nothing about costs lives here.

Config fields read (see ``experiments/configs/default.py``): ``num_workers``,
``tau``, ``alpha``, ``topology``, ``erdos_renyi_p``, ``order``,
``local_state_policy``, ``warmup_steps``, ``tau2``, ``num_groups``,
``outer_lr``, ``outer_momentum``, ``outer_optimizer`` (SlowMo's and DiLoCo's
outer optimizer; the old names ``slow_lr`` / ``slow_momentum`` still work,
with a deprecation warning), ``matcha_budget``, ``anchor_momentum``,
``max_tau``, ``seed``, ``compressor`` (:func:`make_compressor`: CHOCO's
messages, and error-feedback averaging for ``local_sgd``, ``diloco`` and
``slowmo``), ``error_decay``, ``gamma``, ``choco_order``, ``hat_init``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

import coopjax
from coopjax import compress
from coopjax import topology

__all__ = [
  "ALGORITHMS",
  "ALIASES",
  "TOPOLOGIES",
  "COMPRESSORS",
  "build",
  "options",
  "make_topology",
  "make_compressor",
  "names",
]

PyTree = Any

#: Topology names accepted by ``config.topology``.
TOPOLOGIES = ("complete", "ring", "torus", "hypercube", "exponential", "erdos_renyi", "independent")

#: name → coopjax factory, called as ``factory(local, **options(name, config, lr))``.
ALGORITHMS: dict[str, Callable[..., optax.GradientTransformation]] = {
  "sync_sgd": coopjax.sync_sgd,
  "local_sgd": coopjax.local_sgd,
  "easgd": coopjax.easgd,
  "dpsgd": coopjax.dpsgd,
  "cooperative": coopjax.cooperative,
  "elastic_averaging": coopjax.elastic_averaging,
  "elastic_hierarchical": coopjax.elastic_hierarchical,
  "nonblocking_easgd": coopjax.nonblocking_easgd,
  "overlap_local_sgd": coopjax.overlap_local_sgd,
  "delayed": coopjax.delayed,
  "slowmo": coopjax.slowmo,
  "diloco": coopjax.diloco,
  "streaming_diloco": coopjax.streaming_diloco,
  "time_varying": coopjax.time_varying,
  "matcha": coopjax.matcha,
  "adacomm": coopjax.adacomm,
  "hierarchical": coopjax.hierarchical,
  "choco": coopjax.choco,
}

#: Short names accepted as well.
ALIASES = {"sync": "sync_sgd", "pasgd": "local_sgd", "periodic": "local_sgd", "d-psgd": "dpsgd"}

# Options every algorithm may take, with the value that means "not asked for".
_COMMON = {"order": "step_then_mix", "local_state_policy": "keep", "warmup_steps": 0}


#: ``config.compressor`` names: ``name`` or ``name:argument`` (see :func:`make_compressor`).
COMPRESSORS = (
  "none",
  "identity",
  "top_k",
  "random_k",
  "qsgd",
  "qsgd_biased",
  "sign",
  "int8",
  "int4",
)


def make_compressor(spec: str) -> compress.Compressor | None:
  """A compressor from its config name: ``"none"`` (no compression), ``"identity"``,
  ``"top_k:F"`` / ``"random_k:F"`` (F the fraction kept), ``"qsgd:B"`` (B bits,
  unbiased) and ``"qsgd_biased:B"`` (scaled by 1/(1 + ω): a contraction, as CHOCO
  needs), ``"sign"`` (scaled sign), ``"int8"``, ``"int4"``.

  Examples:
    >>> make_compressor("none") is None
    True
    >>> make_compressor("identity").name
    'identity'
  """
  name, _, arg = str(spec).partition(":")
  if name not in COMPRESSORS:
    raise ValueError(
      f"unknown compressor {spec!r}; expected one of {COMPRESSORS} (top_k and random_k take "
      "the fraction kept, qsgd the bits: 'top_k:0.01', 'qsgd:4')."
    )
  if name == "none":
    return None
  if name in ("top_k", "random_k", "qsgd", "qsgd_biased") and not arg:
    raise ValueError(f"compressor {name!r} needs an argument, e.g. 'top_k:0.01' or 'qsgd:4'.")
  if name == "identity":
    return compress.identity()
  if arg and name not in ("top_k", "random_k", "qsgd", "qsgd_biased"):
    raise ValueError(f"compressor {name!r} takes no argument; got {spec!r}, use {name!r}.")
  try:
    value = float(arg) if name in ("top_k", "random_k") else int(arg) if arg else None
  except ValueError:
    fraction = name in ("top_k", "random_k")
    what = "the fraction kept, a number in (0, 1]" if fraction else "a number of bits (an integer)"
    raise ValueError(
      f"compressor {spec!r}: {arg!r} is not {what}; e.g. 'top_k:0.01' or 'qsgd:4'."
    ) from None
  try:
    if name == "top_k":
      return compress.top_k(fraction=value)
    if name == "random_k":
      return compress.random_k(fraction=value)
    if name == "qsgd":
      return compress.qsgd(value)
    if name == "qsgd_biased":
      return compress.qsgd(value, unbiased=False)
  except ValueError as error:
    raise ValueError(f"compressor {spec!r}: {error}") from None
  if name == "sign":
    return compress.scaled_sign()
  return getattr(compress, name)()


def _error_feedback(c) -> dict:
  """``compressor`` and ``error_decay`` for the all-reduce family (nothing when uncompressed)."""
  compressor = make_compressor(c.get("compressor", "none"))
  if compressor is None:
    return {}
  return {"compressor": compressor, "error_decay": c.get("error_decay", 1.0)}


def names() -> tuple[str, ...]:
  """Registered algorithm names."""
  return tuple(ALGORITHMS)


def make_topology(name: str, m: int, *, p: float = 0.5, seed: int = 0) -> np.ndarray:
  """The m × m mixing matrix of a named topology (see :data:`TOPOLOGIES`)."""
  if name == "complete":
    return topology.complete(m)
  if name == "ring":
    return topology.ring(m)
  if name == "torus":
    rows = int(math.isqrt(m))
    while m % rows:
      rows -= 1
    if rows < 2:
      raise ValueError(f"topology 'torus' needs m = r·c with r, c >= 2; m={m} is prime or < 4.")
    return topology.torus(rows, m // rows)
  if name == "hypercube":
    return topology.hypercube(m)
  if name == "exponential":
    return topology.exponential(m)
  if name == "erdos_renyi":
    return topology.erdos_renyi(m, p, seed=seed)
  if name == "independent":
    return topology.independent(m)
  raise ValueError(f"unknown topology {name!r}; expected one of {TOPOLOGIES}.")


def _groups(m: int, num_groups: int) -> list[list[int]]:
  if num_groups < 1 or m % num_groups:
    raise ValueError(
      f"num_groups={num_groups} must be >= 1 and divide num_workers={m} (equal groups)."
    )
  size = m // num_groups
  return [list(range(g * size, (g + 1) * size)) for g in range(num_groups)]


def _graph(config) -> np.ndarray:
  return make_topology(
    config.topology, config.num_workers, p=config.erdos_renyi_p, seed=config.seed
  )


def _outer(config) -> tuple[float, float]:
  """``(outer_lr, outer_momentum)``, honouring the deprecated ``slow_lr`` / ``slow_momentum``."""
  lr, momentum = float(config.outer_lr), float(config.outer_momentum)
  for old, new in (("slow_lr", "outer_lr"), ("slow_momentum", "outer_momentum")):
    value = config.get(old)
    if value is not None:
      warnings.warn(
        f"config.{old} is deprecated: it is the outer optimizer's option, use config.{new}.",
        DeprecationWarning,
        stacklevel=3,
      )
      if new == "outer_lr":
        lr = float(value)
      else:
        momentum = float(value)
  return lr, momentum


def _diloco_outer(config) -> optax.GradientTransformation:
  lr, momentum = _outer(config)
  if config.outer_optimizer == "nesterov":
    return optax.sgd(lr, momentum=momentum or None, nesterov=True)
  if config.outer_optimizer == "sgd":
    return optax.sgd(lr, momentum=momentum or None)
  raise ValueError(f"outer_optimizer must be 'nesterov' or 'sgd', got {config.outer_optimizer!r}.")


def outer_compressor(bits: int):
  """The quantizer of Streaming DiLoCo's outer gradients: None for 0 bits, else ``compress.int{bits}()``."""
  if not bits:
    return None
  factory = getattr(coopjax.compress, f"int{int(bits)}", None)
  if factory is None:
    raise ValueError(
      f"outer_bits={bits}: coopjax.compress has no int{bits}() quantizer; use 0 (float32), 4 or 8."
    )
  return factory()


def _streaming_schedule(config) -> dict:
  """Streaming DiLoCo's H, P and τ from ``tau``, ``fragments`` and ``delay``, checked by name.

  Fragments sync in turn every h = H/P steps, and a sync must land before the next one starts:
  P divides H and 0 ≤ τ < h.
  """
  H, P, delay = int(config.tau), config.fragments, int(config.delay)
  if isinstance(P, int) and not isinstance(P, bool):
    if P < 1:
      raise ValueError(f"streaming_diloco: config.fragments (P) must be >= 1, got {P}.")
    if H < 1 or H % P:
      raise ValueError(
        f"streaming_diloco: config.tau (H, the steps between two syncs of one fragment) = {H} "
        f"must be a positive multiple of config.fragments (P) = {P}: fragments sync in turn "
        f"every H/P steps. Set --config.tau to a multiple of {P} or --config.fragments to a "
        f"divisor of {H}."
      )
    if not 0 <= delay < H // P:
      raise ValueError(
        f"streaming_diloco: config.delay = {delay} must be in [0, h) with h = config.tau / "
        f"config.fragments = {H // P} (one sync in flight at a time); lower --config.delay or "
        "--config.fragments, or raise --config.tau."
      )
  return {"H": H, "fragments": P, "delay": delay}


def _time_varying_schedule(m: int) -> list[np.ndarray]:
  period = topology.one_peer_exponential_period(m)
  return [topology.one_peer_exponential(m, r) for r in range(period)]


# name → options(config, lr): the algorithm's own keywords.
_OPTIONS: dict[str, Callable[[Any, Any], dict]] = {
  "sync_sgd": lambda c, lr: {"num_workers": c.num_workers},
  "local_sgd": lambda c, lr: {"tau": c.tau, "num_workers": c.num_workers, **_error_feedback(c)},
  "easgd": lambda c, lr: {"tau": c.tau, "alpha": c.alpha, "num_workers": c.num_workers},
  "dpsgd": lambda c, lr: {"W": _graph(c)},
  "cooperative": lambda c, lr: {"tau": c.tau, "W": _graph(c)},
  "elastic_averaging": lambda c, lr: {"W": _graph(c), "alpha": c.alpha, "tau": c.tau},
  "elastic_hierarchical": lambda c, lr: {
    "tau": c.tau,
    "groups": _groups(c.num_workers, c.num_groups),
    "alpha": c.alpha,
  },
  "nonblocking_easgd": lambda c, lr: {
    "tau": c.tau,
    "alpha": c.alpha,
    "num_workers": c.num_workers,
  },
  "overlap_local_sgd": lambda c, lr: {
    "tau": c.tau,
    "alpha": c.alpha,
    "num_workers": c.num_workers,
    "anchor_momentum": c.anchor_momentum,
    "lr": lr,
  },
  "delayed": lambda c, lr: {"tau": c.tau, "W": _graph(c)},
  "slowmo": lambda c, lr: dict(
    zip(("alpha", "beta"), _outer(c), strict=True),
    tau=c.tau,
    num_workers=c.num_workers,
    lr=lr,
    **_error_feedback(c),
  ),
  "diloco": lambda c, lr: {
    "outer": _diloco_outer(c),
    "tau": c.tau,
    "num_workers": c.num_workers,
    **_error_feedback(c),
  },
  "streaming_diloco": lambda c, lr: {
    "outer": _diloco_outer(c),
    **_streaming_schedule(c),
    "alpha": c.merge_alpha,
    "compressor": outer_compressor(c.outer_bits),
    "schedule": c.streaming_schedule,
    "num_workers": c.num_workers,
  },
  "time_varying": lambda c, lr: {"tau": c.tau, "schedule": _time_varying_schedule(c.num_workers)},
  "matcha": lambda c, lr: {
    "graph": _graph(c),
    "budget": c.matcha_budget,
    "num_workers": c.num_workers,
    "key": jax.random.key(c.seed),
  },
  # The factory sees no loss function or evaluation batch, so the CLI uses the per-worker
  # minibatch losses as F (no extra forward pass), not the averaged model's loss.
  "adacomm": lambda c, lr: {
    "tau0": c.tau,
    "num_workers": c.num_workers,
    "lr_schedule": lr if callable(lr) else None,
    "max_tau": c.max_tau or None,
    "loss_estimate": "worker_losses",
  },
  "hierarchical": lambda c, lr: {
    "tau1": c.tau,
    "tau2": c.tau2,
    "groups": _groups(c.num_workers, c.num_groups),
  },
  # CHOCO's messages: config.compressor ("none" gossips uncompressed: the identity).
  "choco": lambda c, lr: {
    "tau": c.tau,
    "W": _graph(c),
    "compressor": make_compressor(c.get("compressor", "none")) or compress.identity(),
    "gamma": c.get("gamma", 0.5),
    "order": c.get("choco_order", "paper"),
    "hat_init": c.get("hat_init", "zeros"),
    "key": jax.random.key(c.seed),
  },
}

# Algorithms whose ``order`` keyword is their own option (not step-then-mix / mix-then-step).
_OWN_ORDER = {"choco"}


def _accepts(factory, keyword: str) -> bool:
  params = inspect.signature(factory).parameters
  if keyword in params:
    return True
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    # forwards its keywords to coopjax.cooperative
    return keyword in inspect.signature(coopjax.cooperative).parameters
  return False


def _name(config) -> str:
  name = ALIASES.get(config.algorithm, config.algorithm)
  if name not in ALGORITHMS:
    raise ValueError(
      f"unknown algorithm {config.algorithm!r}; expected one of {names()} "
      f"(or aliases {tuple(ALIASES)})."
    )
  return name


def options(config, lr=None, mix_mask: PyTree | None = None) -> dict:
  """The keywords ``build`` passes to ``config.algorithm``'s factory after ``local``.

  Options that every algorithm may take (``order``, ``local_state_policy``,
  ``warmup_steps``, ``mix_mask``) are passed when the factory accepts them; one
  set to a non-default value for an algorithm that has no such option is an
  error rather than silently ignored.
  """
  name = _name(config)
  factory = ALGORITHMS[name]
  kwargs = _OPTIONS[name](config, lr)
  common = {key: config.get(key, default) for key, default in _COMMON.items()}
  if mix_mask is not None:
    common["mix_mask"] = mix_mask
  if name not in ("local_sgd", "slowmo", "diloco", "choco") and make_compressor(
    config.get("compressor", "none")
  ):
    raise ValueError(
      f"{name} has no compressed variant (config.compressor={config.compressor!r}); "
      "compression applies to choco, local_sgd, diloco and slowmo."
    )
  for key, value in common.items():
    if key == "order" and name in _OWN_ORDER:
      if value != _COMMON["order"]:
        raise ValueError(
          f"{name} sets its order with config.choco_order ('paper' or 'overlap'); leave "
          f"config.order at {_COMMON['order']!r}."
        )
      continue
    if _accepts(factory, key):
      kwargs[key] = value
    elif value != _COMMON.get(key):
      raise ValueError(
        f"{name} has no option {key!r} (config.{key}={value!r}); leave it at its default "
        f"{_COMMON.get(key)!r} for this algorithm."
      )
  return kwargs


def build(config, local: optax.GradientTransformation, lr, mix_mask=None):
  """``ALGORITHMS[config.algorithm](local, **options(config, lr, mix_mask))``.

  Args:
    config: the run's config (``ml_collections.ConfigDict``).
    local: the local optax optimizer.
    lr: the learning rate (a float or an optax schedule of the step count);
      algorithms whose outer update needs it (SlowMo, Overlap Local-SGD,
      AdaComm) receive it.
    mix_mask: optional pytree prefix of one model selecting the mixed leaves
      (e.g. :func:`coopjax.models.params_mask` to keep BatchNorm statistics
      local).

  Returns:
    The coopjax transformation; it describes itself (``tx.layout``,
    ``tx.comm(k, opt_state)``, ``tx.overlaps``, ``tx.settle``, ``tx.mix_mask``).
  """
  return ALGORITHMS[_name(config)](local, **options(config, lr, mix_mask))
