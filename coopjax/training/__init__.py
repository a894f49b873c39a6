"""Training utilities: data sets with per-worker splits, flax models, checkpoints."""
