r"""Minimum-norm convex weights: the simplex QP on a Gram matrix.

Given a Gram matrix :math:`K_{ij} = \langle g_i, g_j \rangle` of :math:`m`
group gradients, the solvers here compute

.. math::
  w^\star = \operatorname*{argmin}_{w \in \Delta_m} w^\top K w,
  \qquad \Delta_m = \{w \in \mathbb{R}^m : w \ge 0,\ \textstyle\sum_i w_i = 1\},

so that :math:`d = \sum_i w^\star_i g_i` is the minimum-norm point of the convex
hull of the group gradients. Optimality (KKT) needs only :math:`K`:
:math:`(K w)_i \ge w^\top K w` for all :math:`i`, with equality where
:math:`w_i > 0`; that is :math:`\langle d, g_i\rangle \ge \|d\|^2` for every
group.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import jaxopt
import optax

_HIGHEST = jax.lax.Precision.HIGHEST
SOLVERS = ('exact', 'active_set', 'projected_gradient')
_DEFAULT_TOLERANCE = {'exact': 1e-7, 'active_set': 1e-7,
                      'projected_gradient': 1e-6}


class MinNormSolution(NamedTuple):
  """Result of :func:`min_norm_weights`.

  Attributes:
    weights: ``[m]`` float32 convex weights on the simplex; zero for groups
      excluded by ``mask`` or by a non-finite Gram diagonal. All zero if every
      group is excluded.
    kkt_residual: ``[]`` float32 relative KKT residual
      :math:`\\max_i (w^\\top K w - (K w)_i) / \\max_i K_{ii}` over the included
      groups; 0 at an exact optimum (and for an all-zero Gram).
    num_iterations: ``[]`` int32 iterations the solver ran (linear solves for
      ``'exact'``, projected-gradient steps for ``'projected_gradient'``).
  """
  weights: jax.Array
  kkt_residual: jax.Array
  num_iterations: jax.Array


def _dot(a, b):
  return jnp.dot(a, b, precision=_HIGHEST)


def _check_gram(gram) -> jax.Array:
  gram = jnp.asarray(gram)
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
    raise ValueError(
        f'grain_optax: the Gram matrix must be square [m, m]; got shape '
        f'{gram.shape}.')
  if gram.shape[0] < 1:
    raise ValueError('grain_optax: the Gram matrix is empty (m = 0 groups).')
  return gram.astype(jnp.float32)


def normalize_gram(gram, mask=None):
  """Sanitises and scales a Gram matrix for the solvers.

  Groups whose diagonal entry is not finite, or whose ``mask`` entry is False,
  are excluded: their rows and columns are zeroed. The rest is symmetrised and
  divided by its largest diagonal entry (the minimiser is scale invariant; the
  solvers' tolerances are not).

  Args:
    gram: ``[m, m]`` Gram matrix.
    mask: optional ``[m]`` bool array, False for groups to exclude.

  Returns:
    ``(normalized_gram, valid, scale)``: the ``[m, m]`` float32 matrix with unit
    largest diagonal (all zero if ``scale`` is 0), the ``[m]`` bool mask of
    included groups and the ``[]`` float32 scale that was divided out.
  """
  gram = _check_gram(gram)
  valid = jnp.isfinite(jnp.diagonal(gram))
  if mask is not None:
    valid = valid & jnp.asarray(mask, bool)
  pair = valid[:, None] & valid[None, :]
  gram = jnp.where(pair & jnp.isfinite(gram), gram, 0.0)
  scale = jnp.max(jnp.diagonal(gram))
  scale = jnp.where(scale > 0, scale, 0.0)
  normalized = gram / jnp.where(scale > 0, scale, 1.0)
  # Symmetrise after scaling: K + K^T can overflow float32 for huge Grams.
  normalized = 0.5 * (normalized + normalized.T)
  return normalized, valid, scale


def kkt_residual(gram, weights, mask=None) -> jax.Array:
  r"""Relative KKT residual of convex weights for the min-norm QP.

  .. math::
    r(w) = \max_{i} \frac{w^\top K w - (K w)_i}{\max_j K_{jj}} \ \ (\ge 0),

  the largest amount by which a group's inner product with
  :math:`d = \sum_i w_i g_i` falls short of :math:`\|d\|^2`, relative to the
  largest squared group norm. It is zero at the optimum. Excluded groups
  (``mask`` False or non-finite diagonal) are ignored.

  Args:
    gram: ``[m, m]`` Gram matrix.
    weights: ``[m]`` weights on the simplex.
    mask: optional ``[m]`` bool array of groups to include.

  Returns:
    A ``[]`` float32 residual.

  Example:
    >>> import jax.numpy as jnp
    >>> import grain_optax
    >>> K = jnp.array([[1., 0.], [0., 1.]])
    >>> float(grain_optax.kkt_residual(K, jnp.array([0.5, 0.5])))
    0.0
    >>> float(grain_optax.kkt_residual(K, jnp.array([1., 0.])))
    1.0
  """
  k, valid, _ = normalize_gram(gram, mask)
  w = jnp.asarray(weights, jnp.float32)
  kw = _dot(k, w)
  obj = _dot(w, kw)
  gap = jnp.where(valid, obj - kw, -jnp.inf)
  return jnp.maximum(jnp.max(gap), 0.0)


def _uniform(valid):
  n = jnp.sum(valid)
  return jnp.where(valid, 1.0 / jnp.maximum(n, 1), 0.0).astype(jnp.float32)


# How ``_full_support`` solves its [m, m] system: 'cholesky' (XLA / cuSOLVER),
# 'lu' (jnp.linalg.solve) or 'pallas' (one Gauss-Jordan kernel; GPU only,
# experimental). Read at trace time.
_LINEAR_SOLVE = 'cholesky'


def _gauss_jordan_kernel(a_ref, b_ref, y_ref):
  """Solves a y = b for a symmetric positive definite a, in one kernel."""
  a = a_ref[...]
  b = b_ref[...]
  n = a.shape[0]
  rows = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
  idx = jax.lax.broadcasted_iota(jnp.int32, (n,), 0)

  def body(i, carry):
    a, b = carry
    row = jnp.sum(jnp.where(rows == i, a, 0.0), axis=0)
    col = jnp.sum(jnp.where(cols == i, a, 0.0), axis=1)
    inv = 1.0 / jnp.sum(jnp.where(idx == i, row, 0.0))
    row = row * inv
    bi = jnp.sum(jnp.where(idx == i, b, 0.0)) * inv
    f = jnp.where(idx == i, 0.0, col)
    a = jnp.where(rows == i, row[None, :], a - f[:, None] * row[None, :])
    b = jnp.where(idx == i, bi, b - f * bi)
    return a, b

  _, y = jax.lax.fori_loop(0, n, body, (a, b))
  y_ref[...] = y


def _pallas_solve(a, b, interpret=False):
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  m = a.shape[0]
  n = max(16, 1 << (m - 1).bit_length())
  a_pad = jnp.eye(n, dtype=jnp.float32).at[:m, :m].set(a)
  b_pad = jnp.zeros([n], jnp.float32).at[:m].set(b)
  y = pl.pallas_call(
      _gauss_jordan_kernel,
      out_shape=jax.ShapeDtypeStruct((n,), jnp.float32),
      interpret=interpret)(a_pad, b_pad)
  return y[:m]


def _solve_spd(a, b):
  if _LINEAR_SOLVE == 'cholesky':
    factor = jnp.linalg.cholesky(a)
    return jax.scipy.linalg.cho_solve((factor, True), b)
  if _LINEAR_SOLVE == 'lu':
    return jnp.linalg.solve(a, b)
  if _LINEAR_SOLVE in ('pallas', 'pallas_interpret'):
    return _pallas_solve(a, b, interpret=_LINEAR_SOLVE == 'pallas_interpret')
  raise ValueError(_LINEAR_SOLVE)


def _full_support(k, valid, regularization):
  """Affine minimiser with every included group in the support.

  Solves :math:`(K + \\epsilon I)\\,y = \\mathbb{1}` over the included groups
  (an identity row and a zero right-hand side for the excluded ones) and
  returns ``(w, ok)`` with :math:`w = y / \\mathbf{1}^\\top y`. When every
  included weight is positive, ``w`` is the minimiser: it satisfies
  :math:`(K w)_i = w^\\top K w` for all included groups (up to the ridge), so
  KKT holds with equality. Straight-line code: one ``[m, m]`` Cholesky
  factorisation, two triangular solves and a few fused element-wise ops, no
  loop and no host synchronisation.
  """
  a = k + jnp.diag(jnp.where(valid, regularization, 1.0).astype(jnp.float32))
  y = _solve_spd(a, valid.astype(jnp.float32))
  total = jnp.sum(y)
  w = y / jnp.where(total > 0, total, 1.0)
  ok = (jnp.isfinite(total) & (total > 0)
        & jnp.all(jnp.where(valid, w > 0, True)))
  return jnp.where(valid, w, 0.0), ok


def _exact_active_set(k, valid, tolerance, max_iterations, regularization,
                      *, start_at_vertex=False):
  """Primal active-set method (Wolfe's min-norm-point algorithm) on the simplex.

  Without ``start_at_vertex``, the first iteration solves for the affine
  minimiser with every included group in the support; when it has full
  support that single ``[m, m]`` linear solve is the answer and the loop ends.
  Otherwise (or from the start with ``start_at_vertex``) the method runs
  Wolfe's algorithm from the vertex of smallest norm: a major cycle adds the
  group that violates KKT most; a minor cycle moves towards the affine
  minimiser of the support until a weight hits zero and drops it. Supports
  stay affinely independent, so every solve is well posed. A tiny ridge
  ``regularization * I`` keeps near-dependent supports solvable and picks the
  smallest-``||w||`` minimiser when it is not unique (identical groups get
  equal weights); it moves the KKT residual by at most ``regularization / 4``.
  """
  m = k.shape[0]
  eye = jnp.eye(m, dtype=jnp.float32)
  a = k + regularization * eye

  def affine_minimizer(support):
    sf = support.astype(jnp.float32)
    system = a * (sf[:, None] * sf[None, :]) + eye * (1.0 - sf)
    y = jnp.linalg.solve(system, sf)
    total = jnp.sum(y)
    ok = jnp.isfinite(total) & (total > 0)
    return y / jnp.where(ok, total, 1.0), ok

  diag = jnp.where(valid, jnp.diagonal(k), jnp.inf)
  vertex = jax.nn.one_hot(jnp.argmin(diag), m, dtype=jnp.float32)

  def cond(state):
    _, _, it, done = state
    return (~done) & (it < max_iterations)

  def body(state):
    w, support, it, _ = state
    alpha, ok = affine_minimizer(support)
    positive = jnp.all(jnp.where(support, alpha > 0, True)) & ok
    # Major cycle: alpha is strictly inside the simplex face; add the most
    # violating group, or stop at a KKT point.
    grad = _dot(a, alpha)
    obj = _dot(alpha, grad)
    candidates = jnp.where(valid & ~support, grad, jnp.inf)
    j = jnp.argmin(candidates)
    add = candidates[j] < obj - tolerance
    support_major = support.at[j].set(support[j] | add)
    # Minor cycle: move from w towards alpha until a weight reaches zero.
    negative = support & (alpha <= 0)
    denom = w - alpha
    ratios = jnp.where(negative & (denom > 0), w / jnp.where(denom > 0, denom, 1.0),
                       jnp.where(negative, 0.0, jnp.inf))
    theta = jnp.clip(jnp.min(ratios), 0.0, 1.0)
    w_minor = w + theta * (alpha - w)
    drop = (negative & (ratios <= theta)) | (support & (w_minor <= 0))
    w_minor = jnp.where(drop, 0.0, w_minor)
    w_minor = w_minor / jnp.sum(w_minor)
    support_minor = support & ~drop

    new_w = jnp.where(positive, alpha, w_minor)
    new_support = jnp.where(positive, support_major, support_minor)
    done = (positive & ~add) | ~ok
    new_w = jnp.where(ok, new_w, w)
    if not start_at_vertex:
      # After a failed full-support attempt, restart from the best vertex.
      restart = (it == 0) & ~(positive & ok)
      new_w = jnp.where(restart, vertex, new_w)
      new_support = jnp.where(restart, vertex > 0, new_support)
      done = done & ~restart
    return new_w, new_support, it + 1, done

  if start_at_vertex:
    init = (vertex, vertex > 0, jnp.zeros([], jnp.int32), jnp.zeros([], bool))
  else:
    init = (_uniform(valid), valid, jnp.zeros([], jnp.int32),
            jnp.zeros([], bool))
  w, _, iterations, _ = jax.lax.while_loop(cond, body, init)
  w = jnp.where(valid, jnp.maximum(w, 0.0), 0.0)
  return w / jnp.sum(w), iterations


def _exact(k, valid, tolerance, max_iterations, regularization):
  """Closed-form full-support solve; the active set only if it fails."""
  w_full, ok = _full_support(k, valid, regularization)

  def fallback(_):
    w, it = _exact_active_set(k, valid, tolerance, max_iterations,
                              regularization, start_at_vertex=True)
    return w, it + 1

  def accept(_):
    return w_full, jnp.ones([], jnp.int32)

  return jax.lax.cond(ok, accept, fallback, None)


def _projected_gradient(k, valid, tolerance, max_iterations, stepsize):
  """jaxopt's ProjectedGradient with optax's Euclidean simplex projection."""

  def objective(w, k):
    return _dot(w, _dot(k, w))

  def projection(w, valid):
    # Excluded groups are pushed far below the simplex threshold, so the
    # projection gives them exactly zero weight.
    return optax.projections.projection_simplex(jnp.where(valid, w, -1e9))

  pg = jaxopt.ProjectedGradient(
      fun=objective, projection=projection, tol=tolerance,
      maxiter=max_iterations, stepsize=stepsize, implicit_diff=False,
      jit=True)
  w, state = pg.run(_uniform(valid), valid, k)
  w = jnp.where(valid, jnp.maximum(w, 0.0), 0.0)
  return w / jnp.sum(w), jnp.asarray(state.iter_num, jnp.int32)


def min_norm_weights(
    gram: jax.Array,
    *,
    solver: str = 'exact',
    mask: Optional[jax.Array] = None,
    tolerance: Optional[float] = None,
    max_iterations: Optional[int] = None,
    regularization: float = 1e-7,
    stepsize: float = 0.0,
) -> MinNormSolution:
  r"""Convex weights of the minimum-norm point of the groups' convex hull.

  Solves the simplex-constrained QP

  .. math::
    \min_{w \in \Delta_m} w^\top K w

  on :math:`K` divided by its largest diagonal entry, inside ``jit`` with no
  host round-trip.

  Solvers:

  * ``'exact'`` (default): a primal active-set method (Wolfe's min-norm-point
    major and minor cycles). It starts with every group in the support, so in
    the common case where the minimiser has full support a single ``[m, m]``
    linear solve settles it; otherwise it ends in at most a few ``m`` solves.
    Reaches the float32 KKT floor (about 1e-7 relative).
  * ``'projected_gradient'``: jaxopt's ``ProjectedGradient`` (accelerated, with
    backtracking line search unless ``stepsize > 0``) using optax's Euclidean
    projection onto the simplex. Approximate: stops at ``tolerance`` on the
    fixed-point error or after ``max_iterations`` steps.

  Degenerate inputs: an all-zero Gram gives uniform weights (any convex weights
  are optimal and the combination is zero); groups whose diagonal is NaN or
  infinite are excluded (weight 0); if all groups are excluded the weights are
  all zero. Non-unique minimisers (e.g. identical groups) get the one of
  smallest :math:`\|w\|` up to the solver's tolerance.

  Args:
    gram: ``[m, m]`` Gram matrix, e.g. from :func:`gram_matrix`.
    solver: ``'exact'`` or ``'projected_gradient'``.
    mask: optional ``[m]`` bool array; False excludes a group.
    tolerance: ``'exact'``: a group joins the support if its KKT violation
      exceeds this (relative to the largest diagonal); default 1e-7.
      ``'projected_gradient'``: jaxopt's ``tol``; default 1e-6.
    max_iterations: iteration cap; default ``8 * m + 16`` for ``'exact'`` and
      1000 for ``'projected_gradient'`` (must be a Python int for the latter).
    regularization: ``'exact'`` only: ridge added to the normalised Gram
      (moves the KKT residual by at most a quarter of it).
    stepsize: ``'projected_gradient'`` only: fixed step size, or 0 for
      jaxopt's line search.

  Returns:
    A :class:`MinNormSolution` ``(weights, kkt_residual, num_iterations)``.

  Raises:
    ValueError: for a non-square Gram or an unknown solver.

  Example:
    >>> import jax.numpy as jnp
    >>> import grain_optax
    >>> g = jnp.array([[1., 0.], [0., 3.]])   # two conflicting-size groups
    >>> sol = grain_optax.min_norm_weights(g @ g.T)
    >>> [round(float(w), 3) for w in sol.weights]
    [0.9, 0.1]
    >>> bool(sol.kkt_residual < 1e-6)
    True
  """
  if solver not in SOLVERS:
    raise ValueError(
        f'grain_optax: unknown solver {solver!r}; choose one of {SOLVERS}.')
  k, valid, _ = normalize_gram(gram, mask)
  m = k.shape[0]
  if tolerance is None:
    tolerance = _DEFAULT_TOLERANCE[solver]
  if solver in ('exact', 'active_set'):
    if max_iterations is None:
      max_iterations = 8 * m + 16
    if solver == 'exact':
      w, iterations = _exact(k, valid, tolerance, max_iterations,
                             regularization)
    else:
      w, iterations = _exact_active_set(k, valid, tolerance, max_iterations,
                                        regularization)
  else:
    if max_iterations is None:
      max_iterations = 1000
    w, iterations = _projected_gradient(k, valid, tolerance, max_iterations,
                                        stepsize)
  any_valid = jnp.any(valid)
  zero_gram = jnp.all(k == 0)
  w = jnp.where(zero_gram, _uniform(valid), w)
  w = jnp.where(any_valid, w, 0.0)
  w = jnp.where(jnp.isfinite(w), w, _uniform(valid))
  kw = _dot(k, w)
  gap = jnp.where(valid, _dot(w, kw) - kw, -jnp.inf)
  residual = jnp.where(any_valid, jnp.maximum(jnp.max(gap), 0.0), 0.0)
  return MinNormSolution(w, residual.astype(jnp.float32), iterations)
