"""experiments/compare.py's table: losses at equal steps and at equal modelled time."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import compare  # noqa: E402


def test_value_at_takes_the_last_evaluation_not_after_x():
  xs, vs = [10, 20, 30], [0.5, 0.4, 0.3]
  assert compare.value_at(xs, vs, 20) == 0.4
  assert compare.value_at(xs, vs, 25) == 0.4
  assert compare.value_at(xs, vs, 100) == 0.3
  assert compare.value_at(xs, vs, 5) is None


def test_table_labels_both_comparisons():
  row = dict(
    algorithm="PASGD τ=8",
    steps=1200,
    train_loss_at_equal_steps=0.2,
    train_loss_at_equal_time=0.1,
    final_train_loss=0.08,
    test_accuracy=0.97,
    modelled_total_time=1.2,
    time_to_sync_loss=0.6,
    ratio_vs_sync=0.4,
  )
  out = dict(
    preset="digits",
    num_workers=8,
    model_bytes=100,
    compute_time_per_step=1e-3,
    compute_source="fixed",
    network=dict(latency=1e-4, bandwidth=1.25e8),
    sync_comm_time_per_step=1e-3,
    target_train_loss=0.13,
    table=[row],
  )
  text = compare._table_text(out)
  assert "train loss, equal steps" in text and "train loss, equal modelled time" in text
  assert "| PASGD τ=8 | 1200 | 0.2000 | 0.1000 | 0.0800 |" in text
