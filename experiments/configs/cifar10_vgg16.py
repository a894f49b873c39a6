r"""CIFAR-10, VGG-16, m = 8: the setup of Wang & Joshi (JMLR 2021, Appendix A).

Launch (GPU; the data must be prepared under DATA_DIR, see docs/experiments.md)::

  python experiments/train.py --config experiments/configs/cifar10_vgg16.py \
    --config.data_dir=DATA_DIR --config.algorithm=local_sgd --config.tau=8 --workdir /tmp/vgg
  python experiments/compare.py --preset cifar10_vgg16 --data_dir DATA_DIR

Batch 128 per worker, learning rate 0.4 multiplied by 0.1 at epochs 100 and
150, 200 epochs. The paper states neither momentum nor weight decay; this
config uses plain SGD with weight decay 5e-4 on the parameters (not on the
BatchNorm statistics, which stay local to each worker). The network model is
the paper's 40 Gbit/s Ethernet with 50 µs latency.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import default  # noqa: E402


def get_config(arg: str | None = None):
  """The paper's CIFAR-10 VGG-16 config (``arg="runlocal"``: a few steps, for smoke tests)."""
  c = default.get_config()
  c.dataset = "cifar10"
  c.model = "vgg16"
  c.norm = "batch"
  c.bn_policy = "local"
  c.num_workers = 8
  c.batch_size = 128
  c.optimizer = "sgd"
  c.lr = 0.4
  c.weight_decay = 5e-4
  c.schedule = "step"
  c.decay_epochs = (100, 150)
  c.decay_factor = 0.1
  c.num_steps = 0
  c.num_epochs = 200.0
  c.eval_every = 480
  c.log_every = 48
  c.eval_train_size = 10000
  c.network.latency = 50e-6
  c.network.bandwidth = 5e9  # 40 Gbit/s
  c.compute_time = 0.0  # charge the measured step (GPU); pass a fixed figure to compare runs
  if arg == "runlocal":
    c.num_steps = 4
    c.batch_size = 8
    c.eval_every = 4
    c.log_every = 2
    c.eval_train_size = 64
    c.progress = False
  elif arg not in (None, ""):
    raise ValueError(f"unknown config argument {arg!r}; use 'runlocal' or nothing.")
  return c
