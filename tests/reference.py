"""Independent NumPy references shared by the tests.

The model is linear regression with a bias, loss(x, (A, b)) = ½ mean((A w + c − b)²),
whose gradient is written out by hand here, so the references never call JAX.
"""

import numpy as np

D = 3  # features


def make_batches(steps, m, batch=5, seed=0):
  rng = np.random.default_rng(seed)
  A = rng.normal(size=(steps, m, batch, D)).astype(np.float32)
  b = rng.normal(size=(steps, m, batch)).astype(np.float32)
  return A, b


def loss_fn(params, batch):
  import jax.numpy as jnp

  A, b = batch
  r = A @ params["w"] + params["c"] - b
  return 0.5 * jnp.mean(r**2)


def np_grad(x, A, b):
  """Gradient of the loss at flat x = [w (D), c] for one worker."""
  w, c = x[:D], x[D]
  r = A @ w + c - b
  return np.concatenate([A.T @ r / len(b), [r.mean()]])


def flat(X):
  """Stacked params pytree -> [rows, D + 1] float64 array."""
  return np.concatenate(
    [np.asarray(X["w"], np.float64), np.asarray(X["c"], np.float64)[:, None]], 1
  )


def init_params(seed=1):
  rng = np.random.default_rng(seed)
  return {"w": rng.normal(size=D).astype(np.float32), "c": np.float32(rng.normal())}


def cooperative_reference(x0, W, tau, lr, A, b, num_aux=0, order="step_then_mix"):
  """X <- (X - lr G) W_k (or X W_k - lr G) in NumPy, rows = nodes, x_i' = sum_j W[j,i] x_j."""
  W = np.asarray(W, np.float64)
  n = W.shape[0]
  m = n - num_aux
  X = np.tile(np.asarray(x0, np.float64), (n, 1))
  history = [X.copy()]
  for k in range(1, A.shape[0] + 1):
    G = np.zeros_like(X)
    for i in range(m):
      G[i] = np_grad(X[i], A[k - 1, i], b[k - 1, i])
    S = W if k % tau == 0 else np.eye(n)
    X = S.T @ (X - lr * G) if order == "step_then_mix" else S.T @ X - lr * G
    history.append(X.copy())
  return X, history


def x_init():
  """``init_params()`` as one flat float64 row ``[w, c]``: every worker's starting point."""
  p = init_params()
  return np.concatenate([np.asarray(p["w"], np.float64), [np.float64(p["c"])]])


def run_from(tx, X, A, b, steps=None, single_trace=False):
  """``(X, state)`` after ``coopjax.make_step(loss_fn, tx)`` on the batches ``(A[k], b[k])``.

  The run starts at X and ``tx.init(X)`` and takes the first ``steps`` batches (all by default).
  With ``single_trace`` the step fails if it is traced more than once (mixing and off-steps
  share one program). This drives the library under test; the references above never call it.
  """
  import chex
  import jax
  import jax.numpy as jnp

  import coopjax

  state = tx.init(X)
  if single_trace:
    raw = coopjax.make_step(loss_fn, tx, jit=False)
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(raw, n=1))
  else:
    step = coopjax.make_step(loss_fn, tx)
  for k in range(A.shape[0] if steps is None else steps):
    X, state, _ = step(X, state, (jnp.asarray(A[k]), jnp.asarray(b[k])))
  return X, state


def run(tx, A, b, m, v=0, X=None, steps=None):
  """:func:`run_from` X, by default ``init_params()`` on m workers and v auxiliaries."""
  import coopjax

  X = coopjax.replicate(init_params(), m, v) if X is None else X
  return run_from(tx, X, A, b, steps)


def averaged_model_run(tx, m, v, A, b, lr):
  """Steps tx from ``init_params()`` and checks the averaged-model identity after every step.

  Paper eq. 14: ``u_{k+1} = u_k − η·m/(m+v)·mean_i g_i(x_i)`` with u the mean over all m + v
  rows and the gradients written out in NumPy (:func:`np_grad`). Returns ``[(X, u), ...]``, the
  X after each step and the u it was checked against.
  """
  import jax.numpy as jnp

  import coopjax

  X = coopjax.replicate(init_params(), m, v)
  state = tx.init(X)
  step = coopjax.make_step(loss_fn, tx)
  out = []
  for k in range(A.shape[0]):
    Xf = flat(X)
    g = np.mean([np_grad(Xf[i], A[k, i], b[k, i]) for i in range(m)], axis=0)
    u_expected = Xf.mean(0) - lr * m / (m + v) * g
    X, state, _ = step(X, state, (jnp.asarray(A[k]), jnp.asarray(b[k])))
    np.testing.assert_allclose(flat(X).mean(0), u_expected, rtol=1e-5, atol=1e-6)
    out.append((X, u_expected))
  return out
