r"""Default training config: m = 8 workers, an MLP on scikit-learn's digits, CPU.

Launch (from the repository root)::

  python experiments/train.py --config experiments/configs/default.py \
    --config.algorithm=local_sgd --config.tau=8 --workdir /tmp/coopjax_run

``--config experiments/configs/default.py:runlocal`` shrinks the run to a few
steps (m = 4, a tiny MLP) for tests and smoke runs. Any field can be
overridden with ``--config.<field>=<value>`` (nested: ``--config.network.latency=1e-4``).

Fields:
  algorithm: a name from ``experiments/registry.py`` (``sync_sgd``, ``local_sgd``,
    ``easgd``, ``dpsgd``, ``cooperative``, ``nonblocking_easgd``, …).
  num_workers: m.
  tau: communication period τ (τ₁ for ``hierarchical``, τ₀ for ``adacomm``).
  alpha: elastic weight α (EASGD family, Overlap Local-SGD's pull).
  topology: workers' graph for ``dpsgd``/``cooperative``/``delayed``/``matcha``/``choco``/
    ``elastic_averaging``: complete, ring, torus, hypercube, exponential, erdos_renyi.
  optimizer: local optimizer: sgd, momentum, nesterov, adam, adamw.
  schedule: constant, step (×``decay_factor`` at ``decay_epochs``) or cosine.
  warmup_steps: steps of synchronous SGD before the algorithm's own schedule
    (post-local SGD, Lin et al. 2020).
  outer_lr, outer_momentum, outer_optimizer: the outer optimizer of ``slowmo``
    (α, β), ``diloco`` and ``streaming_diloco`` (``slow_lr`` / ``slow_momentum`` are
    deprecated names).
  fragments, delay, merge_alpha, streaming_schedule, outer_bits: ``streaming_diloco``'s
    P, τ, α, schedule and quantization of the outer gradients (H is ``tau``).
  compressor: ``none``, ``identity``, ``top_k:F``, ``random_k:F``, ``qsgd:B``, ``sign``,
    ``int8``, ``int4``: ``choco``'s messages (``none`` gossips uncompressed), and
    error-feedback averaging for ``local_sgd``, ``diloco`` and ``slowmo``
    (``error_decay`` β of the memory).
  gamma, choco_order, hat_init: ``choco``'s consensus step size, order
    (``paper``/``overlap``) and initial public copies (``zeros``/``x0``).
  network: α–β model (``latency`` seconds, ``bandwidth`` bytes/s) of the
    modelled communication time; ``bytes_per_param`` the wire size of a value.
  compute_time: seconds of compute charged per step in the modelled time (a
    fixed figure, so that two runs differ only by their communication); 0
    charges each step's measured time instead.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config; ``arg="runlocal"`` gives a tiny, fast variant."""
  c = ml_collections.ConfigDict()
  # algorithm
  c.algorithm = "local_sgd"
  c.num_workers = 8
  c.tau = 8
  c.alpha = 0.1
  c.topology = "ring"
  c.erdos_renyi_p = 0.5
  c.order = "step_then_mix"
  c.local_state_policy = "keep"
  c.tau2 = 16  # hierarchical: global period (multiple of tau)
  c.num_groups = 2  # hierarchical, elastic_hierarchical
  c.warmup_steps = 0  # steps of synchronous SGD before the algorithm starts (post-local SGD)
  c.outer_lr = 1.0  # the outer optimizer's learning rate: slowmo α, diloco's outer lr
  c.outer_momentum = 0.5  # the outer optimizer's momentum: slowmo β, diloco's outer momentum
  c.outer_optimizer = "nesterov"  # diloco, streaming_diloco: nesterov or sgd
  c.fragments = 2  # streaming_diloco: P fragments, synced every tau / P steps in turn
  c.delay = 0  # streaming_diloco: inner steps between a fragment's snapshot and its apply
  c.merge_alpha = 0.0  # streaming_diloco: weight of the worker's own fragment at the apply
  c.streaming_schedule = "torchft"  # streaming_diloco: torchft or maxtext
  c.outer_bits = 0  # streaming_diloco: 0 (float32 outer gradients), 4 or 8 (quantized)
  c.slow_lr = placeholder(float)  # deprecated name of outer_lr
  c.slow_momentum = placeholder(float)  # deprecated name of outer_momentum
  c.matcha_budget = 0.5
  c.anchor_momentum = 0.0  # overlap_local_sgd
  c.max_tau = 0  # adacomm (0: no bound)
  # compressed communication: choco's messages; error feedback for local_sgd, diloco, slowmo
  c.compressor = "none"  # none, identity, top_k:F, random_k:F, qsgd:B, sign, int8, int4
  c.error_decay = 1.0  # β of the error memory (error-feedback averaging)
  c.gamma = 0.5  # choco's consensus step size
  c.choco_order = "paper"  # choco: paper or overlap
  c.hat_init = "zeros"  # choco's public copies at first: zeros or x0
  # local optimizer and schedule
  c.optimizer = "sgd"
  c.lr = 0.1
  c.momentum = 0.9  # momentum / nesterov
  c.weight_decay = 0.0
  c.schedule = "constant"
  c.decay_epochs = (100, 150)
  c.decay_factor = 0.1
  # data and model
  c.dataset = "digits"
  c.data_dir = ""
  c.split = "iid"  # iid or dirichlet
  c.concentration = 0.5  # dirichlet α
  c.model = "mlp"  # mlp, mlp_bn (BatchNorm), cnn, resnet20, vgg16
  c.hidden = (64,)  # mlp widths
  c.norm = "batch"  # resnet20 / vgg16: batch, group, none
  c.bn_policy = "local"  # BatchNorm statistics: local (per worker) or mixed
  c.batch_size = 32  # per worker
  c.num_steps = 600  # 0: use num_epochs
  c.num_epochs = 0.0
  # logging, evaluation, checkpoints
  c.seed = 0
  c.log_every = 10
  c.eval_every = 50
  c.eval_train_size = 2000  # fixed training subset for the averaged model's train loss
  c.checkpoint_every = 0  # 0: only at exit
  c.checkpoint_keep = 2
  c.progress = True
  # NaN/Inf in a worker: stop (keep the last checkpoint), skip the batch, or quarantine the
  # worker (masked out inside the step, the others go on; coopjax.with_live_mask)
  c.on_nonfinite = "stop"
  c.readmit_after = 0  # quarantine: re-admit a worker after this many steps (0: never)
  c.disconnected = "error"  # quarantine splits the graph: "error" stops, "fallback" averages
  c.fault_nan = ""  # a drill: "WORKER@STEP" puts NaN in that worker's batch at that step
  c.sharded = False  # shard the worker axis over the devices (jax.shard_map step)
  c.num_devices = 0  # with sharded: how many devices (0: all); num_workers must be a multiple
  c.fast_compile = False  # XLA backend optimisation off: faster compile, slower steps
  # α–β network model for modelled communication time (the same for every CLI):
  # latency 100 µs, 1 Gbit/s; one sync all-reduce costs more than one local step
  c.network = ml_collections.ConfigDict({"latency": 100e-6, "bandwidth": 1.25e8})
  c.bytes_per_param = 4
  # the compute time charged per step: a fixed number of seconds, so that runs compare
  # their algorithms and not this machine's timing noise; 0 charges the measured time
  c.compute_time = 1e-3

  if arg == "runlocal":
    c.num_workers = 4
    c.tau = 2
    c.tau2 = 4
    c.hidden = (16,)
    c.batch_size = 16
    c.num_steps = 24
    c.log_every = 4
    c.eval_every = 12
    c.eval_train_size = 256
    c.lr = 0.2
    c.progress = False
    c.fast_compile = True
  elif arg not in (None, ""):
    raise ValueError(f"unknown config argument {arg!r}; use 'runlocal' or nothing.")
  return c
