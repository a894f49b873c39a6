r"""Mixing matrices W for the Cooperative SGD framework A(τ, W, v).

A mixing matrix acts on the stacked models ``X = [x_1, ..., x_m, z_1, ..., z_v]``
(one row per worker or auxiliary variable in coopjax's layout) by

.. math::

   x_i^{\text{new}} = \sum_j W_{ji}\, x_j ,

i.e. ``X ← X·W`` in the paper's column layout (Wang & Joshi, JMLR 2021, eq. 10),
so ``W[j, i]`` is node ``j``'s weight in node ``i``'s new model. The convergence
theory needs W symmetric and doubly stochastic, ``W 1 = 1``, ``Wᵀ = W``, with

.. math::

   \zeta = \max\{|\lambda_2(W)|, |\lambda_{m+v}(W)|\} < 1 .

ζ = 0 for full averaging ``J = 11ᵀ/m``, 0 < ζ < 1 for a connected sparse
graph, ζ = 1 for independent workers ``I``.

Every constructor returns a ``float64`` NumPy array; they are cheap, run on the
host at construction time and raise :class:`ValueError` for bad arguments.
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np

from coopjax._validation import check_int
from coopjax._validation import check_real

__all__ = [
  "complete",
  "ring",
  "torus",
  "hypercube",
  "exponential",
  "erdos_renyi",
  "from_adjacency",
  "metropolis_hastings",
  "independent",
  "easgd",
  "elastic",
  "elastic_hierarchical",
  "circulant",
  "circulant_offsets",
  "validate",
  "zeta",
  "is_complete",
  "one_peer_exponential",
  "one_peer_exponential_period",
  "matching_decomposition",
  "matching_laplacian",
  "matching_permutation",
]

_ATOL = 1e-6


def complete(m: int) -> np.ndarray:
  r"""Full averaging ``J = 11ᵀ/m`` (ζ = 0): every mix is an all-reduce mean.

  >>> complete(2)
  array([[0.5, 0.5],
         [0.5, 0.5]])
  """
  m = check_int("m", m)
  return np.full((m, m), 1.0 / m)


def independent(m: int) -> np.ndarray:
  """The identity ``I`` (ζ = 1): workers never communicate.

  Examples:
    >>> independent(3)
    array([[1., 0., 0.],
           [0., 1., 0.],
           [0., 0., 1.]])
    >>> zeta(independent(3))
    1.0
  """
  m = check_int("m", m)
  return np.eye(m)


def circulant(m: int, weights: dict[int, float]) -> np.ndarray:
  r"""Circulant matrix ``W[(i + s) mod m, i] = weights[s]``.

  Node ``i`` takes weight ``weights[s]`` from node ``i + s``. Offsets that
  coincide modulo ``m`` add up. Symmetric when ``weights[s] == weights[-s]``.

  .. math::

     W_{(i + s) \bmod m,\; i} = \sum_{s' \equiv s \ (\mathrm{mod}\ m)} w_{s'} .

  Examples:
    Node 0 takes half of its new model from node 1 (``W[1, 0] = 0.5``):

    >>> circulant(4, {0: 0.5, 1: 0.5})
    array([[0.5, 0. , 0. , 0.5],
           [0.5, 0.5, 0. , 0. ],
           [0. , 0.5, 0.5, 0. ],
           [0. , 0. , 0.5, 0.5]])
  """
  m = check_int("m", m)
  if not isinstance(weights, dict) or not weights:
    raise TypeError(
      f"weights must be a non-empty dict offset -> weight (e.g. {{-1: 1/3, 0: 1/3, 1: 1/3}}), "
      f"got {weights!r}."
    )
  for s, w in weights.items():
    check_int("circulant offset", s, -(2**62))
    check_real(f"weights[{s}]", w)
  W = np.zeros((m, m))
  for s, w in weights.items():
    for i in range(m):
      W[(i + s) % m, i] += w
  return W


def circulant_offsets(W: np.ndarray, atol: float = 1e-12) -> dict[int, float] | None:
  """If ``W`` is circulant, the map ``offset -> weight`` (offsets in [0, m)); else None.

  Used to lower mixing to one collective-permute per non-zero offset.

  Examples:
    >>> {s: round(w, 4) for s, w in circulant_offsets(ring(4)).items()}
    {0: 0.3333, 1: 0.3333, 3: 0.3333}
    >>> circulant_offsets(torus(3, 3)) is None
    True
  """
  W = np.asarray(W, dtype=np.float64)
  m = W.shape[0]
  col = W[:, 0]
  offsets = {s: float(col[s]) for s in range(m) if abs(col[s]) > atol}
  if not np.allclose(W, circulant(m, offsets), atol=atol, rtol=0.0):
    return None
  return offsets


def ring(m: int) -> np.ndarray:
  r"""Ring: each node averages itself and its two neighbours with weight 1/3.

  Eigenvalues are ``(1 + 2 cos(2πk/m))/3``; for ``m = 2`` the two neighbours
  coincide (weights 1/3 self, 2/3 other) and for ``m = 1`` it is ``[[1]]``.

  .. math::

     W = \tfrac13 (I + P + P^\top), \qquad
     \zeta(W) = \max_{k = 1, \dots, m-1} \Bigl|\tfrac{1 + 2\cos(2\pi k/m)}{3}\Bigr| ,

  with ``P`` the cyclic shift.

  Examples:
    >>> 3 * ring(4)
    array([[1., 1., 0., 1.],
           [1., 1., 1., 0.],
           [0., 1., 1., 1.],
           [1., 0., 1., 1.]])

    For ``m = 8`` the second eigenvalue ``(1 + 2 cos(π/4))/3`` sets ζ:

    >>> import numpy as np
    >>> round(zeta(ring(8)), 4), round(float(1 + 2 * np.cos(np.pi / 4)) / 3, 4)
    (0.8047, 0.8047)
  """
  m = check_int("m", m)
  if m == 1:
    return np.ones((1, 1))
  return circulant(m, {0: 1.0 / 3.0, 1: 1.0 / 3.0, -1: 1.0 / 3.0})


def metropolis_hastings(adjacency: np.ndarray) -> np.ndarray:
  r"""Metropolis–Hastings weights of an undirected graph.

  .. math::

     W_{ij} = \frac{1}{1 + \max(d_i, d_j)} \text{ for an edge } (i, j),\qquad
     W_{ii} = 1 - \sum_{j \ne i} W_{ij}.

  The result is symmetric, doubly stochastic and non-negative.

  Examples:
    A path 0 – 1 – 2: the middle node has degree 2, so every edge weighs 1/3
    and the ends keep 2/3.

    >>> import numpy as np
    >>> A = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    >>> 3 * metropolis_hastings(A)
    array([[2., 1., 0.],
           [1., 1., 1.],
           [0., 1., 2.]])
  """
  A = np.asarray(adjacency)
  if A.ndim != 2 or A.shape[0] != A.shape[1]:
    raise ValueError(f"adjacency must be a square matrix, got shape {A.shape}.")
  if A.shape[0] == 0:
    raise ValueError("adjacency is empty; it needs one row per worker.")
  if np.iscomplexobj(A):
    raise TypeError("adjacency has complex entries; pass a 0/1 (or boolean) matrix.")
  try:
    A_float = A.astype(np.float64)
  except (TypeError, ValueError) as e:
    raise TypeError(f"adjacency must be a numeric 0/1 matrix, got dtype {A.dtype}.") from e
  if not np.all(np.isfinite(A_float)):
    raise ValueError("adjacency has non-finite entries; pass a 0/1 matrix.")
  if np.any(A_float < 0):
    raise ValueError("adjacency has negative entries; pass a 0/1 matrix (nonzero = edge).")
  A = A.astype(bool)
  np.fill_diagonal(A, False)
  if not np.array_equal(A, A.T):
    raise ValueError(
      "adjacency must be symmetric (an undirected graph); symmetrise it with A | A.T."
    )
  deg = A.sum(axis=1)
  n = A.shape[0]
  W = np.zeros((n, n))
  ii, jj = np.nonzero(A)
  W[ii, jj] = 1.0 / (1.0 + np.maximum(deg[ii], deg[jj]))
  W[np.arange(n), np.arange(n)] = 1.0 - W.sum(axis=1)
  return W


def from_adjacency(adjacency: np.ndarray) -> np.ndarray:
  """Mixing matrix of a connected undirected graph, with Metropolis–Hastings weights.

  Raises ValueError when the graph is not connected (ζ would be 1).

  Examples:
    >>> import numpy as np
    >>> path = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    >>> 3 * from_adjacency(path)
    array([[2., 1., 0.],
           [1., 1., 1.],
           [0., 1., 2.]])
    >>> from_adjacency(np.zeros((2, 2)))
    Traceback (most recent call last):
    ...
    ValueError: the graph given by adjacency is not connected, ...
  """
  W = metropolis_hastings(adjacency)
  if W.shape[0] > 1 and zeta(W) > 1.0 - 1e-9:
    raise ValueError(
      "the graph given by adjacency is not connected, so its workers can never reach "
      "consensus (zeta = 1); add edges that connect every component."
    )
  return W


def torus(rows: int, cols: int) -> np.ndarray:
  r"""2-D torus (grid with wrap-around) of ``rows × cols`` nodes, node ``(r, c)`` at ``r·cols + c``.

  Metropolis–Hastings weights: 1/5 to self and each of the four neighbours
  when ``rows, cols ≥ 3``.

  Examples:
    Node 0 of a 3 × 3 torus averages itself with nodes 1, 2 (same row) and 3, 6
    (same column):

    >>> 5 * torus(3, 3)[:, 0]
    array([1., 1., 1., 1., 0., 0., 1., 0., 0.])
  """
  rows = check_int("rows", rows)
  cols = check_int("cols", cols)
  n = rows * cols
  A = np.zeros((n, n), dtype=bool)
  for r in range(rows):
    for c in range(cols):
      i = r * cols + c
      for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        j = ((r + dr) % rows) * cols + (c + dc) % cols
        if j != i:
          A[i, j] = A[j, i] = True
  return metropolis_hastings(A)


def hypercube(m: int) -> np.ndarray:
  r"""Hypercube on ``m = 2^d`` nodes: ``i`` links to ``i XOR 2^b``; weights ``1/(d + 1)``.

  .. math::

     W_{ji} = \frac{1}{d + 1} \text{ for } j = i \text{ or } j = i \oplus 2^b,\ b < d,
     \qquad \zeta(W) = \frac{d - 1}{d + 1} .

  Examples:
    >>> 3 * hypercube(4)
    array([[1., 1., 1., 0.],
           [1., 1., 0., 1.],
           [1., 0., 1., 1.],
           [0., 1., 1., 1.]])
    >>> round(zeta(hypercube(8)), 4)  # (3 - 1) / (3 + 1)
    0.5
  """
  m = check_int("m", m)
  if m & (m - 1):
    raise ValueError(f"hypercube needs m to be a power of two, got m={m}; try ring or exponential.")
  d = m.bit_length() - 1
  W = np.eye(m) / (d + 1)
  for i in range(m):
    for b in range(d):
      W[i ^ (1 << b), i] = 1.0 / (d + 1)
  return W


def exponential(m: int) -> np.ndarray:
  r"""Static (undirected) exponential graph: ``i`` links to ``i ± 2^j mod m`` for ``2^j < m``.

  The graph is circulant and regular, so Metropolis–Hastings gives uniform
  weights ``1/(deg + 1)``; the result is symmetric and doubly stochastic.
  (Ying et al., NeurIPS 2021, use the directed version ``i → i + 2^j``; see
  ``one_peer_exponential`` for its time-varying one-peer form.)

  Examples:
    For ``m = 8`` the offsets ``±1, ±2, ±4`` give five distinct neighbours
    (``+4 ≡ −4``), so every weight is 1/6:

    >>> 6 * exponential(8)[:, 0]
    array([1., 1., 1., 0., 1., 0., 1., 1.])
  """
  m = check_int("m", m)
  if m == 1:
    return np.ones((1, 1))
  offs = set()
  j = 0
  while (1 << j) < m:
    offs.add((1 << j) % m)
    offs.add((-(1 << j)) % m)
    j += 1
  offs.discard(0)
  w = 1.0 / (len(offs) + 1)
  return circulant(m, {0: w, **{s: w for s in offs}})


def erdos_renyi(m: int, p: float, seed: int = 0) -> np.ndarray:
  r"""Erdős–Rényi graph G(m, p) with Metropolis–Hastings weights.

  Deterministic in ``seed``. Raises ValueError if the drawn graph is
  disconnected (use a larger ``p`` or another seed).

  Examples:
    >>> import numpy as np
    >>> W = erdos_renyi(6, 0.6, seed=1)
    >>> W.shape, bool(np.allclose(W.sum(axis=0), 1.0)), bool(np.allclose(W, W.T))
    ((6, 6), True, True)
    >>> zeta(W) < 1
    True
  """
  m = check_int("m", m)
  p = check_real("p", p)
  if not 0.0 < p <= 1.0:
    raise ValueError(f"p must be in (0, 1], got {p}.")
  seed = check_int("seed", seed, minimum=0)
  rng = np.random.default_rng(seed)
  upper = np.triu(rng.random((m, m)) < p, k=1)
  A = upper | upper.T
  try:
    return from_adjacency(A)
  except ValueError:
    raise ValueError(
      f"erdos_renyi(m={m}, p={p}, seed={seed}) drew a disconnected graph; "
      "increase p (p > ln(m)/m connects with high probability) or change seed."
    ) from None


def _check_alpha(alpha, m: int, name: str = "alpha") -> float:
  alpha = check_real(name, alpha)
  upper = 2.0 / (m + 1)
  if not 0.0 < alpha < upper:
    raise ValueError(
      f"{name}={alpha} is outside (0, 2/(m+1)) = (0, {upper:.6g}) for m={m}: there the "
      "elastic matrix has zeta >= 1 and the models never reach consensus. "
      f"The error-floor-minimising value is 2/(m+2) = {2.0 / (m + 2):.6g}."
    )
  if alpha > 1.0 / m:
    warnings.warn(
      f"{name}={alpha} > 1/m = {1.0 / m:.6g}: the anchor keeps weight 1 - m*alpha = "
      f"{1.0 - m * alpha:.6g} < 0. The matrix is still symmetric and doubly stochastic "
      "with zeta < 1 (the paper's conditions) but not non-negative.",
      stacklevel=3,
    )
  return alpha


def easgd(m: int, alpha: float) -> np.ndarray:
  r"""The EASGD matrix ``W_α`` of size (m+1)×(m+1) (paper eq. 11), anchor last.

  .. math::

     W_\alpha = \begin{bmatrix} (1-\alpha) I_m & \alpha \mathbf 1 \\
                                \alpha \mathbf 1^\top & 1 - m\alpha \end{bmatrix},
     \qquad \zeta(W_\alpha) = \max\{|1-\alpha|, |1-(m+1)\alpha|\}.

  Valid for ``0 < α < 2/(m+1)``; non-negative only for ``α ≤ 1/m`` (a warning
  is issued above that). The bound's error floor is smallest at ``α = 2/(m+2)``.

  Examples:
    Two workers and the anchor (last row), ``α = 1/4``; ζ = max{3/4, 1/4}:

    >>> easgd(2, 0.25)
    array([[0.75, 0.  , 0.25],
           [0.  , 0.75, 0.25],
           [0.25, 0.25, 0.5 ]])
    >>> zeta(easgd(2, 0.25))
    0.75
  """
  m = check_int("m", m)
  return elastic(np.eye(m), alpha)


def elastic(W: np.ndarray, alpha: float) -> np.ndarray:
  r"""Generalised elastic averaging matrix ``W′`` (paper §6.2), anchor last.

  .. math::

     W' = \begin{bmatrix} (1-\alpha) W & \alpha \mathbf 1 \\
                          \alpha \mathbf 1^\top & 1 - m\alpha \end{bmatrix}.

  ``W = I`` gives EASGD's ``W_α``. ``ζ(W′) = max{(1−α)ζ(W), |1−(m+1)α|}``.

  Examples:
    Four workers on a ring (ζ = 1/3) with an anchor, ``α = 0.2``; then
    ``ζ(W′) = max{0.8 · 1/3, |1 − 5 · 0.2|} = 0.2667``:

    >>> W = elastic(ring(4), 0.2)
    >>> W.shape
    (5, 5)
    >>> W[4].round(4).tolist()
    [0.2, 0.2, 0.2, 0.2, 0.2]
    >>> round(zeta(W), 4)
    0.2667
  """
  W = validate(W, allow_disconnected=True)
  m = W.shape[0]
  alpha = _check_alpha(alpha, m)
  out = np.zeros((m + 1, m + 1))
  out[:m, :m] = (1.0 - alpha) * W
  out[:m, m] = alpha
  out[m, :m] = alpha
  out[m, m] = 1.0 - m * alpha
  return out


def elastic_hierarchical(groups, alpha: float, W_aux: np.ndarray | None = None) -> np.ndarray:
  r"""Elastic hierarchical averaging (paper §6.3): one auxiliary variable per group.

  ``groups`` is a list of lists of worker indices that partition ``0..m-1``.
  Worker ``i`` in group ``g`` (size ``n_g``) pulls toward its auxiliary ``z_g``;
  each ``z_g`` mixes with the other auxiliaries through ``W_aux`` (g×g,
  symmetric doubly stochastic, default ``J``) and pulls toward its workers:

  .. math::

     x_i \leftarrow (1-\alpha) x_i + \alpha z_{g(i)}, \qquad
     z_g \leftarrow \sum_l (W_{aux})_{lg} z_l + \alpha \sum_{i \in g} (x_i - z_g),

     W = \begin{bmatrix} (1 - \alpha) I_m & \alpha B \\ \alpha B^\top & W_{aux} - \alpha N
     \end{bmatrix}

  with ``B[i, g] = 1`` iff worker ``i`` is in group ``g`` and ``N = diag(n_g)``.
  Rows are ordered ``[x_1..x_m, z_1..z_g]``. W is symmetric and doubly
  stochastic for any group sizes; it is validated (ζ < 1) on construction.

  Examples:
    Two groups of two workers, ``α = 1/4``; rows 4 and 5 are ``z_1`` and ``z_2``:

    >>> elastic_hierarchical([[0, 1], [2, 3]], 0.25)
    array([[0.75, 0.  , 0.  , 0.  , 0.25, 0.  ],
           [0.  , 0.75, 0.  , 0.  , 0.25, 0.  ],
           [0.  , 0.  , 0.75, 0.  , 0.  , 0.25],
           [0.  , 0.  , 0.  , 0.75, 0.  , 0.25],
           [0.25, 0.25, 0.  , 0.  , 0.  , 0.5 ],
           [0.  , 0.  , 0.25, 0.25, 0.5 , 0.  ]])
  """
  if isinstance(groups, (str, bytes)) or not isinstance(groups, (list, tuple)):
    raise TypeError(f"groups must be a list of lists of worker indices, got {groups!r}.")
  for gr in groups:
    if isinstance(gr, (str, bytes)) or not isinstance(gr, (list, tuple, range, np.ndarray)):
      raise TypeError(f"each group must be a list of worker indices, got {gr!r} in {groups!r}.")
    for i in gr:
      if isinstance(i, (bool, np.bool_)) or not isinstance(i, (numbers.Integral, np.integer)):
        raise TypeError(f"worker indices must be integers, got {i!r} in groups {groups!r}.")
  groups = [list(map(int, g)) for g in groups]
  members = sorted(i for g in groups for i in g)
  m = len(members)
  if m == 0 or members != list(range(m)) or any(len(g) == 0 for g in groups):
    raise ValueError(
      f"groups must be non-empty lists of worker indices that partition 0..m-1, got {groups}."
    )
  g = len(groups)
  sizes = np.array([len(gr) for gr in groups], dtype=np.float64)
  alpha = check_real("alpha", alpha)
  upper = 2.0 / (sizes.max() + 1)
  if not 0.0 < alpha < upper:
    raise ValueError(
      f"alpha={alpha} is outside (0, 2/(n_max+1)) = (0, {upper:.6g}) for the largest group "
      f"of size {int(sizes.max())}; there the group mixing diverges."
    )
  W_aux = complete(g) if W_aux is None else validate(W_aux, allow_disconnected=True)
  if W_aux.shape != (g, g):
    raise ValueError(f"W_aux must be {g}x{g} (one row per group), got {W_aux.shape}.")
  B = np.zeros((m, g))
  for k, gr in enumerate(groups):
    B[gr, k] = 1.0
  out = np.zeros((m + g, m + g))
  out[:m, :m] = (1.0 - alpha) * np.eye(m)
  out[:m, m:] = alpha * B
  out[m:, :m] = alpha * B.T
  out[m:, m:] = W_aux - np.diag(alpha * sizes)
  return validate(out, allow_negative=True)


def zeta(W: np.ndarray) -> float:
  r"""ζ = max{|λ₂(W)|, |λ_n(W)|}: the second-largest eigenvalue modulus.

  For symmetric W this is computed from the real spectrum; for a
  non-symmetric W it is the second-largest eigenvalue modulus.

  .. math::

     \zeta(W) = \max\{|\lambda_2(W)|, |\lambda_n(W)|\},
     \qquad 1 = \lambda_1 \ge \lambda_2 \ge \dots \ge \lambda_n .

  Examples:
    >>> round(zeta(complete(4)), 4), round(zeta(independent(4)), 4)
    (0.0, 1.0)
    >>> round(zeta(ring(4)), 4)  # eigenvalues 1, 1/3, 1/3, -1/3
    0.3333
  """
  W = np.asarray(W, dtype=np.float64)
  if W.ndim != 2 or W.shape[0] != W.shape[1]:
    raise ValueError(f"W must be a square matrix, got shape {W.shape}.")
  n = W.shape[0]
  if n == 1:
    return 0.0
  if np.allclose(W, W.T, atol=1e-12):
    lam = np.sort(np.linalg.eigvalsh(W))[::-1]
    return float(max(abs(lam[1]), abs(lam[-1])))
  mods = np.sort(np.abs(np.linalg.eigvals(W)))[::-1]
  return float(mods[1])


def is_complete(W: np.ndarray, atol: float = 1e-12) -> bool:
  """Whether W is full averaging ``J = 11ᵀ/n``.

  Examples:
    >>> is_complete(complete(4)), is_complete(ring(4))
    (True, False)
    >>> is_complete(ring(3))  # a ring of three is complete
    True
  """
  W = np.asarray(W)
  return bool(np.allclose(W, 1.0 / W.shape[0], atol=atol, rtol=0.0))


def validate(
  W,
  size: int | None = None,
  *,
  symmetric: bool = True,
  allow_negative: bool = False,
  allow_disconnected: bool = False,
  atol: float = _ATOL,
) -> np.ndarray:
  r"""Check that W is a valid mixing matrix and return it as a float64 array.

  Checks, each with an error that names the problem and a fix: square, of
  ``size`` rows when given (``m + v``), finite, non-negative (unless
  ``allow_negative``), symmetric (unless ``symmetric=False``), rows and
  columns summing to 1, and ζ < 1 (unless ``allow_disconnected``; the identity
  only warns, since independent workers are a legitimate baseline).

  Examples:
    >>> validate([[0.5, 0.5], [0.5, 0.5]])
    array([[0.5, 0.5],
           [0.5, 0.5]])
    >>> validate([[0.5, 0.5], [0.4, 0.6]])
    Traceback (most recent call last):
    ...
    ValueError: W is not symmetric: W[0, 1] = 0.5 but W[1, 0] = 0.4; ...
  """
  if np.iscomplexobj(W):
    raise TypeError("W has complex entries; mixing weights must be real numbers.")
  try:
    W = np.array(W, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise TypeError(f"W must be a numeric matrix (array-like), got {type(W).__name__}.") from e
  if W.ndim != 2 or W.shape[0] != W.shape[1]:
    raise ValueError(f"W must be a square (n, n) matrix, got shape {W.shape}.")
  n = W.shape[0]
  if n == 0:
    raise ValueError("W is empty; it needs one row per worker and auxiliary variable.")
  if size is not None and n != size:
    raise ValueError(
      f"W is {n}x{n} but there are {size} nodes (num_workers + num_aux); "
      f"pass a {size}x{size} matrix or change num_workers/num_aux."
    )
  if not np.all(np.isfinite(W)):
    raise ValueError("W has NaN or infinite entries; every weight must be a finite number.")
  if not allow_negative and np.any(W < -atol):
    i, j = np.argwhere(W < -atol)[0]
    raise ValueError(
      f"W has a negative entry W[{i}, {j}] = {W[i, j]:.6g}; mixing weights must be >= 0 "
      "(pass allow_negative=True if this is intended)."
    )
  if symmetric and not np.allclose(W, W.T, atol=atol, rtol=0.0):
    i, j = np.unravel_index(np.argmax(np.abs(W - W.T)), W.shape)
    raise ValueError(
      f"W is not symmetric: W[{i}, {j}] = {W[i, j]:.6g} but W[{j}, {i}] = {W[j, i]:.6g}; "
      "the theory needs W = W^T (use metropolis_hastings for an undirected graph, or "
      "symmetric=False for a column-stochastic matrix)."
    )
  cols = W.sum(axis=0)
  if not np.allclose(cols, 1.0, atol=atol, rtol=0.0):
    j = int(np.argmax(np.abs(cols - 1.0)))
    raise ValueError(
      f"column {j} of W sums to {cols[j]:.6g}, not 1: every node's new model must be a "
      "weighted average (normalise the columns)."
    )
  rows = W.sum(axis=1)
  if symmetric and not np.allclose(rows, 1.0, atol=atol, rtol=0.0):
    i = int(np.argmax(np.abs(rows - 1.0)))
    raise ValueError(f"row {i} of W sums to {rows[i]:.6g}, not 1: W must be doubly stochastic.")
  if n > 1 and not allow_disconnected:
    if np.allclose(W, np.eye(n), atol=atol, rtol=0.0):
      warnings.warn(
        "W is the identity: workers never communicate (zeta = 1), the models never reach "
        "consensus; this is A(tau, I, v), independent training.",
        stacklevel=2,
      )
    elif zeta(W) >= 1.0 - 1e-9:
      raise ValueError(
        f"W has zeta = {zeta(W):.6g} >= 1: its graph is disconnected (or periodic), so "
        "mixing can never reach consensus; connect the graph or add self-weights."
      )
  return W


def one_peer_exponential(m: int, r: int) -> np.ndarray:
  r"""The r-th matrix of the one-peer exponential graph (Ying et al., NeurIPS 2021).

  At the r-th mix (r = 0, 1, …) every worker averages with the single peer at
  distance ``s`` behind it:

  .. math::

     s = 2^{\,r \bmod \lceil \log_2 m \rceil}, \qquad
     x_i \leftarrow \tfrac12\bigl(x_i + x_{(i - s) \bmod m}\bigr),

  so ``W[i, i] = W[(i − s) mod m, i] = 1/2`` (``W[j, i]`` is worker j's weight in
  worker i's new model; each worker receives from ``i − s`` as BlueFog does).
  W is doubly stochastic but not symmetric: check it with
  ``validate(W, symmetric=False, allow_disconnected=True)``. For ``m = 2^t``
  any t consecutive matrices multiply to ``J`` exactly. Use the sequence with
  :func:`coopjax.time_varying`.

  Args:
    m: number of workers.
    r: index of the mix, ``r ≥ 0``.

  Returns:
    The ``m × m`` float64 matrix (``[[1]]`` for ``m = 1``).

  Examples:
    >>> one_peer_exponential(4, 1)
    array([[0.5, 0. , 0.5, 0. ],
           [0. , 0.5, 0. , 0.5],
           [0.5, 0. , 0.5, 0. ],
           [0. , 0.5, 0. , 0.5]])
  """
  m = check_int("m", m)
  r = check_int("r", r, minimum=0)
  if m == 1:
    return np.ones((1, 1))
  period = one_peer_exponential_period(m)
  s = 1 << (r % period)
  return circulant(m, {0: 0.5, -s: 0.5})


def one_peer_exponential_period(m: int) -> int:
  r"""Number of distinct one-peer exponential matrices, ``⌈log₂ m⌉`` (1 for ``m ≤ 2``).

  Examples:
    >>> [one_peer_exponential_period(m) for m in (2, 4, 8, 9)]
    [1, 2, 3, 4]
  """
  m = check_int("m", m)
  return max(1, (m - 1).bit_length())


def _edges(graph) -> tuple[int, list[tuple[int, int]]]:
  """Undirected edges ``(i, j)``, ``i < j``, of a square matrix's off-diagonal non-zeros."""
  A = np.asarray(graph, dtype=np.float64)
  if A.ndim != 2 or A.shape[0] != A.shape[1]:
    raise ValueError(f"the graph must be a square matrix, got shape {A.shape}.")
  if not np.all(np.isfinite(A)):
    raise ValueError("the graph matrix has NaN or infinite entries.")
  B = A != 0
  np.fill_diagonal(B, False)
  if not np.array_equal(B, B.T):
    raise ValueError(
      "the graph must be undirected: its off-diagonal non-zero pattern is not symmetric "
      "(symmetrise an adjacency with A | A.T)."
    )
  ii, jj = np.nonzero(np.triu(B, 1))
  return A.shape[0], [(int(i), int(j)) for i, j in zip(ii, jj, strict=True)]


def _misra_gries_colouring(n: int, edges: list[tuple[int, int]]) -> dict[tuple[int, int], int]:
  """A proper edge colouring with at most Δ + 1 colours (Misra & Gries, 1992)."""
  deg = np.zeros(n, dtype=int)
  for i, j in edges:
    deg[i] += 1
    deg[j] += 1
  colours = range(int(deg.max()) + 1)
  # at[u][c] = the neighbour joined to u by the edge of colour c.
  at: list[dict[int, int]] = [{} for _ in range(n)]
  nbrs: list[list[int]] = [[] for _ in range(n)]
  for i, j in edges:
    nbrs[i].append(j)
    nbrs[j].append(i)

  def colour_of(u, w):
    for c, x in at[u].items():
      if x == w:
        return c
    return None

  def free(u, c):
    return c not in at[u]

  def first_free(u):
    return next(c for c in colours if free(u, c))

  def set_colour(u, w, c):
    at[u][c] = w
    at[w][c] = u

  def clear(u, w):
    c = colour_of(u, w)
    if c is not None:
      del at[u][c]
      del at[w][c]

  for u, v in edges:
    # A maximal fan of u starting at v: colour(u, fan[i+1]) is free on fan[i].
    fan = [v]
    while True:
      nxt = next(
        (
          w
          for w in nbrs[u]
          if w not in fan and (c := colour_of(u, w)) is not None and free(fan[-1], c)
        ),
        None,
      )
      if nxt is None:
        break
      fan.append(nxt)
    c = first_free(u)
    d = first_free(fan[-1])
    # Invert the cd_u path (edges coloured d, c, d, ... starting at u).
    path, x, want = [], u, d
    while want in at[x]:
      y = at[x][want]
      path.append((x, y, want))
      x, want = y, (c if want == d else d)
    for x, y, _ in path:
      clear(x, y)
    for x, y, col in path:
      set_colour(x, y, c if col == d else d)
    # The longest prefix of the fan that is still a fan, cut at a node where d is free.
    k = None
    for i, w in enumerate(fan):
      if i > 0:
        cw = colour_of(u, w)
        if cw is None or not free(fan[i - 1], cw):
          break
      if free(w, d):
        k = i
        break
    if k is None:
      raise RuntimeError(f"edge colouring found no fan end at edge ({u}, {v}); please report.")
    shifted = [colour_of(u, fan[i + 1]) for i in range(k)]
    for i in range(1, k + 1):
      clear(u, fan[i])
    for i in range(k):
      set_colour(u, fan[i], shifted[i])
    set_colour(u, fan[k], d)

  return {(i, j): colour_of(i, j) for i, j in edges}


def _bipartition(n: int, edges: list[tuple[int, int]]) -> list[int] | None:
  """A 2-colouring of the nodes (side 0 or 1) if the graph is bipartite, else None."""
  nbrs: list[list[int]] = [[] for _ in range(n)]
  for i, j in edges:
    nbrs[i].append(j)
    nbrs[j].append(i)
  side = [-1] * n
  for s in range(n):
    if side[s] >= 0:
      continue
    side[s], stack = 0, [s]
    while stack:
      u = stack.pop()
      for w in nbrs[u]:
        if side[w] < 0:
          side[w] = 1 - side[u]
          stack.append(w)
        elif side[w] == side[u]:
          return None
  return side


def _konig_colouring(n: int, edges: list[tuple[int, int]]) -> dict[tuple[int, int], int]:
  """A proper edge colouring of a bipartite graph with exactly Δ colours (König, 1916).

  Each edge (u, v) takes a colour a free at u; if a is taken at v, the path from v
  alternating colours a and b (b free at v) has its two colours swapped first. In a
  bipartite graph that path cannot end at u, so a becomes free at both ends.
  """
  deg = np.zeros(n, dtype=int)
  for i, j in edges:
    deg[i] += 1
    deg[j] += 1
  delta = int(deg.max())
  at: list[dict[int, int]] = [{} for _ in range(n)]  # at[u][c] = neighbour by colour c
  for u, v in edges:
    a = next(c for c in range(delta) if c not in at[u])
    if a in at[v]:
      b = next(c for c in range(delta) if c not in at[v])
      path, x, want = [], v, a
      while want in at[x]:
        y = at[x][want]
        path.append((x, y, want))
        x, want = y, (b if want == a else a)
      for x, y, c in path:
        del at[x][c]
        del at[y][c]
      for x, y, c in path:
        c2 = b if c == a else a
        at[x][c2] = y
        at[y][c2] = x
    at[u][a] = v
    at[v][a] = u
  return {(i, j): next(c for c, w in at[i].items() if w == j) for i, j in edges}


def _exact_colouring(
  n: int, edges: list[tuple[int, int]], k: int, max_nodes: int
) -> dict[tuple[int, int], int] | None:
  """A proper edge colouring with k colours by backtracking, or None if none was found.

  DSATUR order (the uncoloured edge with the fewest colours left goes first); the edges
  of one node of maximum degree are fixed to colours 0..Δ−1 (any colouring can be
  relabelled so). Gives up (None) after ``max_nodes`` search nodes.
  """
  inc: list[list[int]] = [[] for _ in range(n)]
  for e, (i, j) in enumerate(edges):
    inc[i].append(e)
    inc[j].append(e)
  used = [set() for _ in range(n)]
  colour = [-1] * len(edges)
  hub = max(range(n), key=lambda u: len(inc[u]))
  for c, e in enumerate(inc[hub]):
    if c >= k:
      return None
    i, j = edges[e]
    colour[e] = c
    used[i].add(c)
    used[j].add(c)
  budget = [max_nodes]

  def search(left: int) -> bool:
    if left == 0:
      return True
    budget[0] -= 1
    if budget[0] < 0:
      return False
    best, best_free = -1, None
    for e, (i, j) in enumerate(edges):
      if colour[e] < 0:
        free = [c for c in range(k) if c not in used[i] and c not in used[j]]
        if best_free is None or len(free) < len(best_free):
          best, best_free = e, free
          if not free:
            return False
    i, j = edges[best]
    for c in best_free:
      colour[best] = c
      used[i].add(c)
      used[j].add(c)
      if search(left - 1):
        return True
      used[i].discard(c)
      used[j].discard(c)
      colour[best] = -1
    return False

  if not search(sum(c < 0 for c in colour)):
    return None
  return {edges[e]: colour[e] for e in range(len(edges))}


def matching_decomposition(graph, *, max_search_nodes: int = 20_000) -> list[list[tuple[int, int]]]:
  r"""Splits an undirected graph into the fewest disjoint matchings it can find.

  The edges are the off-diagonal non-zeros of ``graph`` (an adjacency matrix or
  a mixing matrix W of the same graph). A proper edge colouring assigns each
  edge a colour so that edges sharing a node differ; each colour class is a
  matching, and at least Δ (the maximum degree) are needed. This function uses

  1. König's colouring when the graph is bipartite (even rings, tori with even
     sides, hypercubes, trees): exactly Δ matchings, the minimum;
  2. otherwise Misra–Gries' colouring (Misra & Gries, 1992; Vizing's bound,
     at most Δ + 1) and, when that takes Δ + 1, a backtracking search for a
     Δ-colouring, bounded by ``max_search_nodes`` (it finds one, or proves none
     exists, quickly on graphs of tens of nodes).

  So the count is Δ (optimal) or Δ + 1, and Δ + 1 only when the search found no
  Δ-colouring (e.g. odd rings, which need Δ + 1 = 3). MATCHA's authors split
  their graphs by repeated perfect matchings and a greedy pass, which can take
  more: on their 8-node graph (Fig. 1a, Δ = 5) they use 5, and on an 8-ring 2,
  as this function does. MATCHA (Wang et al., 2019) activates these matchings
  independently, so fewer matchings spend the budget C_b on fewer, larger ones.

  Args:
    graph: square matrix whose off-diagonal non-zeros are the (undirected) edges.
    max_search_nodes: bound on the Δ-colouring search of non-bipartite graphs
      (0 keeps Misra–Gries' colouring as it is).

  Returns:
    A list of matchings, each a list of edges ``(i, j)`` with ``i < j``; the
    matchings are non-empty, pairwise disjoint and cover every edge.

  Example:
    >>> from coopjax import topology
    >>> len(topology.matching_decomposition(topology.ring(8)))  # bipartite: Δ = 2
    2
    >>> len(topology.matching_decomposition(topology.ring(7)))  # odd ring needs Δ + 1
    3

  References:
    D. Kőnig, "Über Graphen und ihre Anwendung auf Determinantentheorie und
    Mengenlehre", Math. Annalen 77, 1916; J. Misra and D. Gries, "A constructive
    proof of Vizing's theorem", Information Processing Letters 41(3), 1992;
    J. Wang, A. K. Sahu, Z. Yang, G. Joshi and S. Kar, "MATCHA: Speeding up
    decentralized SGD via matching decomposition sampling", 2019 (arXiv 1905.09435).
  """
  max_search_nodes = check_int("max_search_nodes", max_search_nodes, 0)
  n, edges = _edges(graph)
  if not edges:
    return []
  deg = np.zeros(n, dtype=int)
  for i, j in edges:
    deg[i] += 1
    deg[j] += 1
  delta = int(deg.max())
  if _bipartition(n, edges) is not None:
    col = _konig_colouring(n, edges)
  else:
    col = _misra_gries_colouring(n, edges)
    if len(set(col.values())) > delta and max_search_nodes > 0:
      col = _exact_colouring(n, edges, delta, max_search_nodes) or col
  classes: dict[int, list[tuple[int, int]]] = {}
  for i, j in edges:
    classes.setdefault(col[(i, j)], []).append((i, j))
  matchings = [sorted(classes[c]) for c in sorted(classes)]
  seen = [0] * n
  for matching in matchings:
    for i, j in matching:
      seen[i] += 1
      seen[j] += 1
    if max(seen) > 1:
      raise RuntimeError("edge colouring failed to produce matchings; please report this graph.")
    seen = [0] * n
  return matchings


def matching_laplacian(matching, m: int) -> np.ndarray:
  r"""Laplacian of a matching on m nodes: ``L = Σ_{(i,j)} (e_i − e_j)(e_i − e_j)ᵀ``.

  Its edges are disjoint, so ``L² = 2L`` and ``L x`` at node i is
  ``x_i − x_{π(i)}`` with π the matching's involution (π(i) = i off the matching).

  Examples:
    >>> matching_laplacian([(0, 1)], 3)
    array([[ 1., -1.,  0.],
           [-1.,  1.,  0.],
           [ 0.,  0.,  0.]])
  """
  m = check_int("m", m)
  L = np.zeros((m, m))
  for i, j in matching:
    L[i, i] += 1.0
    L[j, j] += 1.0
    L[i, j] -= 1.0
    L[j, i] -= 1.0
  return L


def matching_permutation(matching, m: int) -> list[int]:
  """The involution π of a matching: ``π(i) = j`` for each edge ``(i, j)``, else ``π(i) = i``.

  Examples:
    >>> matching_permutation([(0, 1), (2, 3)], 5)
    [1, 0, 3, 2, 4]
  """
  m = check_int("m", m)
  perm = list(range(m))
  for i, j in matching:
    perm[i], perm[j] = j, i
  return perm
