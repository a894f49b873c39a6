"""End-to-end tests of experiments/train.py (tiny runs on digits) and its modelled clock."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import types

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import registry  # noqa: E402
import train  # noqa: E402

RUNLOCAL = os.path.join(ROOT, "experiments", "configs", "default.py") + ":runlocal"
# runlocal: m = 4, MLP 64 -> 16 -> 10 on 8x8 digits.
M, TAU, STEPS = 4, 2, 24
NUM_PARAMS = 64 * 16 + 16 + 16 * 10 + 10


def run(tmp_path, *overrides, name="run"):
  workdir = str(tmp_path / name)
  args = ["--config", RUNLOCAL, "--workdir", workdir]
  args += [f"--config.{k}" for k in overrides]
  summary = train.main(args)
  return summary, workdir


def read_jsonl(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def read_csv(workdir):
  with open(os.path.join(workdir, "metrics.csv")) as f:
    return list(csv.DictReader(f))


@pytest.mark.parametrize("name", registry.names())
def test_every_algorithm_trains(tmp_path, name):
  summary, workdir = run(tmp_path, f"algorithm={name}")
  rows = read_jsonl(workdir)
  table = read_csv(workdir)
  assert [int(r["step"]) for r in table] == [r["step"] for r in rows]
  assert rows[0]["step"] == 0 and rows[-1]["step"] == STEPS
  assert summary["stopped"] is None
  losses = [r["loss"] for r in rows[1:]]
  assert all(math.isfinite(x) for x in losses)
  evals = [r for r in rows if r["train_loss"] is not None]
  assert [r["step"] for r in evals] == [0, 12, 24]
  assert all(math.isfinite(r["train_loss"]) and 0 <= r["test_accuracy"] <= 1 for r in evals)
  # the averaged model improves on the initial one, which is near chance: ln(10)
  assert abs(evals[0]["train_loss"] - math.log(10)) < 0.3
  assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 0.1
  # clocks are cumulative and the modelled clock covers at least the compute
  for a, b in zip(rows[1:], rows[2:], strict=False):
    assert b["modelled_time"] >= a["modelled_time"] and b["bytes_sent"] >= a["bytes_sent"]
  assert rows[-1]["modelled_time"] >= rows[-1]["compute_time"] > 0


def test_modelled_wallclock_matches_alpha_beta_blocking(tmp_path):
  t_c, lat, bw = 1e-3, 2e-4, 1e8
  summary, workdir = run(
    tmp_path,
    "algorithm=local_sgd",
    f"compute_time={t_c}",
    f"network.latency={lat}",
    f"network.bandwidth={bw}",
  )
  nbytes = 4 * NUM_PARAMS
  assert summary["model_bytes"] == nbytes
  t_mix = 2 * (M - 1) * lat + 2 * (M - 1) / M * nbytes / bw
  for row in read_jsonl(workdir)[1:]:
    k = row["step"]
    assert row["mixes"] == k // TAU
    assert row["modelled_time"] == pytest.approx(k * t_c + (k // TAU) * t_mix, rel=1e-9)
    assert row["comm_time"] == pytest.approx((k // TAU) * t_mix, rel=1e-9)
    # ring all-reduce: each worker sends 2(m-1)/m model-sized payloads per mix
    assert row["bytes_sent"] == pytest.approx((k // TAU) * 2 * (M - 1) / M * nbytes)


def test_modelled_wallclock_non_blocking_overlaps(tmp_path):
  # Communication-bound: T_mix > tau * t_c, so from the second mix on each
  # period waits for the previous mix: clock at the p-th mix = tau*t_c + (p-1)*T.
  t_c, lat, bw = 1e-4, 1e-3, 1e9
  _, workdir = run(
    tmp_path,
    "algorithm=nonblocking_easgd",
    f"compute_time={t_c}",
    f"network.latency={lat}",
    f"network.bandwidth={bw}",
  )
  nbytes = 4 * NUM_PARAMS  # X's rows are models of this size; the anchor all-reduce sends them
  t_mix = 2 * (M - 1) * lat + 2 * (M - 1) / M * nbytes / bw
  assert t_mix > TAU * t_c
  for row in read_jsonl(workdir)[1:]:
    k = row["step"]
    if k % TAU == 0:
      assert row["modelled_time"] == pytest.approx(TAU * t_c + (k // TAU - 1) * t_mix, rel=1e-9)


def test_clock_matches_netmodel():
  from coopjax.cost import netmodel
  from coopjax.cost import pattern

  rng = np.random.default_rng(0)
  compute = rng.uniform(1e-3, 3e-3, 40)
  mixed = np.arange(1, 41) % 3 == 0
  for overlap in (False, True):
    expected = netmodel.modelled_wallclock(compute, mixed, 4e-3, overlap=overlap)
    cost = pattern.MixCost("all_reduce", 1.0, 1, overlap)
    clocks, got = train._Clocks(), []
    for t, mix in zip(compute, mixed, strict=True):
      c = cost if mix else pattern.NO_COMM
      clocks = clocks.advance(t, t, c, 4e-3 if mix else 0.0, 1.0)
      got.append(clocks.modelled_time)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_two_runs_report_identical_modelled_times(tmp_path):
  """The default charges a fixed compute time per step: the same run gives the same clock."""
  a, dir_a = run(tmp_path, "algorithm=easgd", name="a")
  b, dir_b = run(tmp_path, "algorithm=easgd", name="b")
  rows_a, rows_b = read_jsonl(dir_a), read_jsonl(dir_b)
  assert [r["modelled_time"] for r in rows_a] == [r["modelled_time"] for r in rows_b]
  assert {r["compute_source"] for r in rows_a} == {"fixed"}
  t_c = train.load_config(RUNLOCAL).compute_time
  assert rows_a[-1]["compute_time"] == pytest.approx(STEPS * t_c, rel=1e-12)
  # the measured time is still reported, and differs between the runs' own clocks
  assert rows_a[-1]["measured_compute_time"] > 0 and rows_b[-1]["measured_compute_time"] > 0
  # compute_time=0 charges the measured time, and the column says so
  c, dir_c = run(tmp_path, "algorithm=easgd", "compute_time=0.0", name="c")
  rows_c = read_jsonl(dir_c)
  assert {r["compute_source"] for r in rows_c} == {"measured"}
  assert rows_c[-1]["compute_time"] == rows_c[-1]["measured_compute_time"]


def test_warmup_steps_run_synchronous_sgd_first(tmp_path):
  """warmup_steps=w: steps 1..w are sync SGD (one mix each), then local SGD counts from 1."""
  w = 6
  sync, sync_dir = run(tmp_path, "algorithm=sync_sgd", name="sync")
  warm, warm_dir = run(tmp_path, "algorithm=local_sgd", f"warmup_steps={w}", name="warm")
  a, b = read_jsonl(sync_dir), read_jsonl(warm_dir)
  for ra, rb in zip(a, b, strict=True):
    k = rb["step"]
    assert rb["mixes"] == min(k, w) + max(0, k - w) // TAU
    if 0 < k <= w:  # the same iterates as synchronous SGD
      assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
  assert b[-1]["mixes"] < a[-1]["mixes"]


def test_outer_optimizer_options_and_deprecated_names():
  config = train.load_config(RUNLOCAL)
  config.algorithm, config.outer_lr, config.outer_momentum = "slowmo", 0.7, 0.3
  kwargs = registry.options(config, 0.1)
  assert (kwargs["alpha"], kwargs["beta"]) == (0.7, 0.3)
  config.slow_lr = 0.5
  with pytest.warns(DeprecationWarning, match="outer_lr"):
    kwargs = registry.options(config, 0.1)
  assert (kwargs["alpha"], kwargs["beta"]) == (0.5, 0.3)
  parsed, _, _ = train.parse_args(["--config", RUNLOCAL, "--config.slow_momentum=0.25"])
  assert parsed.slow_momentum == 0.25
  # an option the algorithm does not have is refused, not ignored
  config = train.load_config(RUNLOCAL)
  config.algorithm, config.local_state_policy = "slowmo", "reset"
  with pytest.raises(ValueError, match="local_state_policy"):
    registry.options(config, 0.1)


def test_compressed_runs_count_payload_bytes(tmp_path):
  """bytes_sent counts payloads: EF local SGD with top-k 10 % on the runlocal MLP (m = 4, τ = 2).

  Leaves 64×16, 16, 16×10, 10 keep 102, 1, 16 and 1 values, each a float32 and an int32 index:
  960 payload bytes; the mean of compressed messages is an all-gather of m − 1 = 3 payloads, at
  each of the 12 mixes.
  """
  _, workdir = run(tmp_path, "algorithm=local_sgd", "compressor=top_k:0.1")
  assert read_jsonl(workdir)[-1]["bytes_sent"] == pytest.approx(12 * 3 * 960)
  _, workdir = run(tmp_path, "algorithm=choco", "compressor=top_k:0.1", "gamma=0.3", name="choco")
  assert read_jsonl(workdir)[-1]["bytes_sent"] == pytest.approx(12 * 2 * 960)  # a ring: 2 peers
  config = train.load_config(RUNLOCAL)
  config.algorithm, config.compressor = "easgd", "top_k:0.1"
  with pytest.raises(ValueError, match="no compressed variant"):
    registry.options(config, 0.1)
  config.algorithm, config.compressor, config.order = "choco", "none", "mix_then_step"
  with pytest.raises(ValueError, match="choco_order"):
    registry.options(config, 0.1)


def test_train_reports_the_evaluation_with_the_workers_statistics(tmp_path):
  """EASGD + BatchNorm through the CLI: the reported accuracy is that of evaluation_model."""
  import coopjax
  from coopjax.training import checkpoint as ckpt
  from coopjax.training import models as cmodels

  summary, workdir = run(tmp_path, "algorithm=easgd", "model=mlp_bn")
  assert summary["stopped"] is None
  # the statistics stay local: one mix moves the parameters' bytes only
  params_bytes = 4 * (64 * 16 + 16 + 2 * 16 + 16 * 10 + 10)  # dense, BatchNorm scale/bias, out
  assert summary["model_bytes"] == params_bytes
  last = read_jsonl(workdir)[-1]
  assert last["mixes"] == STEPS // TAU
  assert last["bytes_sent"] == pytest.approx(last["mixes"] * 2 * (M - 1) / M * params_bytes)
  assert math.isfinite(last["modelled_time"]) and last["modelled_time"] > last["compute_time"]
  config = train.load_config(RUNLOCAL)
  config.algorithm, config.model = "easgd", "mlp_bn"
  r, state = train.setup(config, str(tmp_path / "setup"))
  with ckpt.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    state = manager.restore(target=ckpt.abstract_target(state))
  # the workers' statistics (mean over rows 0..m-1), the parameters of eq. 13
  X = state.X
  u = {
    "params": coopjax.average(X["params"]),
    "batch_stats": jax_mean_rows(X["batch_stats"], M),
  }
  expected = cmodels.evaluate(r.model, u, r.data.test_x, r.data.test_y)
  assert summary["final"]["test_accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
  assert summary["final"]["test_loss"] == pytest.approx(expected["loss"], rel=1e-5)


def jax_mean_rows(tree, m):
  import jax

  return jax.tree.map(lambda x: np.asarray(x)[:m].mean(0), tree)


@pytest.mark.parametrize(
  "name",
  ["easgd", "elastic_averaging", "elastic_hierarchical", "nonblocking_easgd", "overlap_local_sgd"],
)
def test_train_evaluation_never_uses_the_auxiliary_statistics(tmp_path, name):
  """Every algorithm with auxiliary rows: their (initial) statistics never reach an evaluation."""
  import jax
  import jax.numpy as jnp

  config = train.load_config(RUNLOCAL)
  config.algorithm, config.model = name, "mlp_bn"
  r, state = train.setup(config, str(tmp_path / "setup"))
  assert r.tx.layout.num_aux >= 1
  X = state.X
  poisoned = dict(X, batch_stats=jax.tree.map(lambda x: x.at[M:].set(jnp.nan), X["batch_stats"]))
  clean = train.evaluate(r, state)
  dirty = train.evaluate(r, state._replace(X=poisoned))
  assert dirty == clean and math.isfinite(dirty["test_loss"])


def test_resume_continues_exactly(tmp_path):
  full, full_dir = run(tmp_path, "algorithm=easgd", name="full")
  run(tmp_path, "algorithm=easgd", "num_steps=12", name="split")
  resumed = train.main(
    [
      "--config",
      RUNLOCAL,
      "--workdir",
      str(tmp_path / "split"),
      "--resume",
      "--config.algorithm=easgd",
    ]
  )
  a, b = read_jsonl(full_dir), read_jsonl(str(tmp_path / "split"))
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b, strict=True):
    for key in ("loss", "consensus_distance", "train_loss", "test_accuracy", "bytes_sent"):
      assert ra[key] == rb[key], (ra["step"], key)
  assert resumed["final"]["train_loss"] == full["final"]["train_loss"]


def test_non_finite_loss_stops_and_names_workers(tmp_path):
  summary, workdir = run(tmp_path, "algorithm=local_sgd", "lr=1e30")
  assert summary["stopped"] is not None
  k, workers = summary["stopped"]["step"], summary["stopped"]["workers"]
  assert 1 <= k < STEPS and workers and set(workers) <= set(range(M))
  assert all(r["step"] < k for r in read_jsonl(workdir))


def test_non_finite_steps_are_skipped_on_request(tmp_path):
  """on_nonfinite=skip: every diverging step is discarded and the run goes on to the end."""
  stop, _ = run(tmp_path, "algorithm=local_sgd", "lr=1e30", name="stop")
  summary, workdir = run(
    tmp_path, "algorithm=local_sgd", "lr=1e30", "on_nonfinite=skip", name="skip"
  )
  assert summary["stopped"] is None
  skipped = [s["step"] for s in summary["skipped"]]
  # the first skipped step is where the stopping run stopped; from there on every step diverges
  assert skipped == list(range(stop["stopped"]["step"], STEPS + 1))
  rows = read_jsonl(workdir)
  assert rows[-1]["step"] == STEPS and "train_loss" in rows[-1]  # the run went on to the end
  assert all(r["loss"] is None for r in rows if r["step"] in skipped)
  # before the first bad step the two runs are the same run
  before = [r["loss"] for r in rows if r["step"] < skipped[0]]
  stop_rows = read_jsonl(os.path.join(str(tmp_path), "stop"))
  assert before == [r["loss"] for r in stop_rows]


@pytest.mark.parametrize("name", ["local_sgd", "easgd", "nonblocking_easgd", "slowmo"])
def test_sharded_run_matches_the_single_device_run(tmp_path, name):
  """--config.sharded=True: 8 workers on the 8 fake devices, the same training as vmapped."""
  common = (f"algorithm={name}", "num_workers=8")
  plain, plain_dir = run(tmp_path, *common, name="plain")
  shard, shard_dir = run(tmp_path, *common, "sharded=True", name="sharded")
  a, b = read_jsonl(plain_dir), read_jsonl(shard_dir)
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b, strict=True):
    for key in ("loss", "consensus_distance", "train_loss", "test_accuracy"):
      if ra.get(key) is not None:
        assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
  assert shard["stopped"] is None and plain["stopped"] is None


def test_overrides_parse_and_type_check():
  config, workdir, resume = train.parse_args(
    ["--config", RUNLOCAL, "--config.tau=8", "--config.network.latency", "1e-3", "--resume"]
  )
  assert (config.tau, config.network.latency, resume) == (8, 1e-3, True)
  config, _, _ = train.parse_args(["--config", RUNLOCAL, "--config.lr=1", "--config.hidden=32"])
  assert config.lr == 1.0 and isinstance(config.lr, float) and tuple(config.hidden) == (32,)
  with pytest.raises(TypeError, match="tau"):
    train.parse_args(["--config", RUNLOCAL, "--config.tau=abc"])
  with pytest.raises(ValueError, match="unknown field"):
    train.parse_args(["--config", RUNLOCAL, "--config.nosuchfield=1"])
  with pytest.raises(ValueError, match="unknown algorithm"):
    registry.build(types.SimpleNamespace(algorithm="nope"), None, 0.1)


def test_step_schedule_decays_at_epochs():
  config = train.load_config(RUNLOCAL)
  config.schedule, config.lr, config.decay_epochs = "step", 0.4, (2, 3)
  lr = train.make_schedule(config, steps_per_epoch=10, num_steps=50)
  got = [float(lr(k)) for k in (0, 19, 20, 29, 30, 49)]
  np.testing.assert_allclose(got, [0.4, 0.4, 0.04, 0.04, 0.004, 0.004], rtol=1e-6)


def test_quarantine_drill_masks_one_worker_and_finishes(tmp_path):
  """on_nonfinite=quarantine with NaN in worker 2's batch at step 3: the run finishes."""
  summary, workdir = run(
    tmp_path,
    "algorithm=dpsgd",
    "on_nonfinite=quarantine",
    "fault_nan=2@3",
    "readmit_after=4",
    name="quarantine",
  )
  assert summary["stopped"] is None
  assert summary["quarantined"] == [{"worker": 2, "step": 3}]
  assert [r["worker"] for r in summary["rejoined"]] == [2]
  assert summary["rejoined"][0]["step"] >= 7
  rows = read_jsonl(workdir)
  assert rows[-1]["step"] == STEPS and np.isfinite(rows[-1]["train_loss"])
  assert all(np.isfinite(r["loss"]) for r in rows if r["step"] > 0)


def test_resumed_summary_keeps_the_events_before_the_checkpoint(tmp_path):
  """Quarantine at step 3, stop at 6, resume to 24: summary.json lists the quarantine too.

  runlocal: τ = 2, so with readmit_after = 8 worker 1 rejoins at the first step k ≥ 3 + 8 that
  ends a period, k = 12; the resumed rows equal the uninterrupted run's.
  """
  drill = ("algorithm=local_sgd", "on_nonfinite=quarantine", "fault_nan=1@3", "readmit_after=8")
  full, full_dir = run(tmp_path, *drill, name="full")
  run(tmp_path, *drill, "num_steps=6", name="split")
  args = ["--config", RUNLOCAL, "--workdir", str(tmp_path / "split"), "--resume"]
  resumed = train.main(args + [f"--config.{k}" for k in drill])
  events = {"quarantined": [{"worker": 1, "step": 3}], "rejoined": [{"worker": 1, "step": 12}]}
  for summary in (full, resumed):
    assert {k: summary[k] for k in events} == events and summary["skipped"] == []
  with open(tmp_path / "split" / "summary.json") as f:
    written = json.load(f)
  assert {k: written[k] for k in events} == events
  a = {r["step"]: r for r in read_jsonl(full_dir)}
  b = {r["step"]: r for r in read_jsonl(str(tmp_path / "split"))}
  assert set(b) == set(a) | {6}  # the stopped run evaluated its last step, 6
  assert all(b[k]["loss"] == a[k]["loss"] for k in a)
  # on_nonfinite=skip: the skipped step survives a resume as well
  skip = ("algorithm=local_sgd", "on_nonfinite=skip", "fault_nan=2@3")
  run(tmp_path, *skip, "num_steps=6", name="skip")
  args = ["--config", RUNLOCAL, "--workdir", str(tmp_path / "skip"), "--resume"]
  resumed = train.main(args + [f"--config.{k}" for k in skip])
  assert resumed["skipped"] == [{"step": 3, "workers": [2]}]


def test_sharded_rows_between_log_steps_leave_loss_empty(tmp_path):
  """With a mesh the step reduces loss and consensus on the steps log_every divides only.

  log_every = 5, eval_every = 12: the evaluation rows at 12 and 24 lie between them and hold no
  loss (null, not NaN: metrics.jsonl stays strict JSON); the rows at 5, 10, 15, 20 hold the
  vmapped run's losses.
  """
  common = ("algorithm=local_sgd", "log_every=5")
  _, plain_dir = run(tmp_path, *common, name="plain")
  _, shard_dir = run(tmp_path, *common, "sharded=True", "num_devices=4", name="sharded")

  def refuse(name):
    raise ValueError(f"{name} in metrics.jsonl")

  with open(os.path.join(shard_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line, parse_constant=refuse) for line in f]
  plain = {r["step"]: r for r in read_jsonl(plain_dir)}
  assert [r["step"] for r in rows] == [0, 5, 10, 12, 15, 20, 24]
  for r in rows[1:]:
    if r["step"] % 5:
      assert r["loss"] is None and r["consensus_distance"] is None
      assert r["train_loss"] == pytest.approx(plain[r["step"]]["train_loss"], rel=1e-5)
    else:
      assert r["loss"] == pytest.approx(plain[r["step"]]["loss"], rel=1e-5)


@pytest.mark.parametrize("name", ["easgd", "overlap_local_sgd"])
def test_quarantine_drill_with_an_anchor(tmp_path, name):
  """Quarantine with an auxiliary row (EASGD's anchor): the masked worker is left out of the
  consensus distance, the anchor is not; the run finishes with finite losses."""
  summary, workdir = run(
    tmp_path, f"algorithm={name}", "on_nonfinite=quarantine", "fault_nan=1@3", "readmit_after=4"
  )
  assert summary["quarantined"] == [{"worker": 1, "step": 3}]
  assert summary["rejoined"] == [{"worker": 1, "step": 8}]  # first k >= 7 with k mod τ = 0
  rows = read_jsonl(workdir)
  assert all(np.isfinite(r["loss"]) and np.isfinite(r["consensus_distance"]) for r in rows[1:])


def test_streaming_diloco_bytes_per_sync_count_the_padded_int4_fragment(tmp_path):
  """Streaming DiLoCo, P = 2, τ = 1, int4 on the runlocal MLP (m = 4, H = 4: 12 syncs).

  Leaves 64×16, 16, 16×10, 10: fragment 0 is the 1024-value kernel, fragment 1 the other 186
  values, padded to 1024. One payload: 1024 / 2 bytes of codes + 4 rows of 256 × a float32 scale
  = 528 bytes; the all-reduce's all-to-all and all-gather send 2(m − 1)/m = 1.5 payloads.
  """
  _, workdir = run(
    tmp_path,
    "algorithm=streaming_diloco",
    "tau=4",
    "fragments=2",
    "delay=1",
    "outer_bits=4",
  )
  last = read_jsonl(workdir)[-1]
  assert last["mixes"] == 12
  assert last["bytes_sent"] == pytest.approx(12 * 1.5 * (1024 // 2 + 4 * 4))


def test_bad_flags_name_the_field_and_the_fix(tmp_path):
  def refused(*overrides):
    with pytest.raises((ValueError, TypeError)) as info:
      run(tmp_path, *overrides, name="bad")
    return str(info.value)

  message = refused("num_workers=4", "fragmnts=2")
  assert "--config.fragmnts" in message and "--config.fragments" in message
  assert "--config.network.latency" in refused("network.latncy=1")
  with pytest.raises(ValueError, match="did you mean --config.fragments"):
    train.parse_args(["--config.fragmnts=2"])  # the default config, loaded without --config
  assert "'abc' is not the fraction kept" in refused("algorithm=choco", "compressor=top_k:abc")
  assert "compressor 'top_k:1.5'" in refused("algorithm=choco", "compressor=top_k:1.5")
  assert "takes no argument" in refused("algorithm=choco", "compressor=int4:3")
  message = refused("algorithm=streaming_diloco", "tau=4", "fragments=3")
  assert "config.tau" in message and "config.fragments" in message
  assert "config.delay = 2" in refused("algorithm=streaming_diloco", "tau=4", "delay=2")
  assert "on_nonfinite='quarantine' only" in refused("readmit_after=5")
  assert "sharded runs only" in refused("num_devices=4")
  assert "worker 9 is not one of the 4" in refused("on_nonfinite=quarantine", "fault_nan=9@3")
  assert "step 30 is not a step" in refused("on_nonfinite=quarantine", "fault_nan=1@30")


def test_command_line_prints_a_config_error_without_a_traceback(tmp_path):
  import subprocess

  script = os.path.join(ROOT, "experiments", "train.py")
  args = ["--config", RUNLOCAL, "--workdir", str(tmp_path), "--config.algorithm=nope"]
  result = subprocess.run(
    [sys.executable, script, *args], capture_output=True, text=True, timeout=120, check=False
  )
  assert result.returncode == 2
  assert "train.py: error: unknown algorithm 'nope'" in result.stderr
  assert "Traceback" not in result.stderr


def test_streaming_clock_awaits_each_sync_tau_steps_after_its_snapshot(tmp_path):
  """Streaming DiLoCo (H = 4, P = 2, τ = 1) on a slow network: the modelled clock equals
  ``experiments/streaming.py``'s (a sync issued at its snapshot, awaited at its apply step),
  t = K·t_c + Σ_syncs (T − τ·t_c) when T > τ·t_c, also across a resume between a snapshot and
  its apply (step 5)."""
  import streaming

  from coopjax import algorithms

  t_c, lat = 1e-3, 1e-3
  flags = (
    "algorithm=streaming_diloco",
    "tau=4",
    "fragments=2",
    "delay=1",
    "outer_bits=4",
    f"compute_time={t_c}",
    f"network.latency={lat}",
  )
  _, workdir = run(tmp_path, *flags, name="full")
  t_sync = 2 * (M - 1) * lat + 1.5 * (1024 // 2 + 4 * 4) / 1.25e8  # all-reduce of 528 bytes
  syncs = algorithms.streaming_syncs(H=4, fragments=2, delay=1, schedule="torchft", steps=STEPS)
  expected = streaming.streaming_clock(
    t_c, {s.snapshot: t_sync for s in syncs}, {s.apply: s.snapshot for s in syncs}, STEPS
  )
  rows = read_jsonl(workdir)
  for row in rows[1:]:
    assert row["modelled_time"] == pytest.approx(expected[row["step"] - 1], rel=1e-12)
  assert rows[-1]["modelled_time"] == pytest.approx(STEPS * t_c + len(syncs) * (t_sync - t_c))
  run(tmp_path, *flags, "num_steps=5", name="split")
  args = ["--config", RUNLOCAL, "--workdir", str(tmp_path / "split"), "--resume"]
  resumed = train.main(args + [f"--config.{k}" for k in flags])
  assert resumed["clocks"]["modelled_time"] == rows[-1]["modelled_time"]
