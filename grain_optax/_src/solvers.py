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

import concurrent.futures
import contextlib
import functools
import os
import warnings
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import jaxopt
import numpy as np
import optax

_HIGHEST = jax.lax.Precision.HIGHEST
SOLVERS = ('exact', 'projected_gradient')
_DEFAULT_TOLERANCE = {'exact': 1e-7, 'projected_gradient': 1e-6}


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
      ``'exact'``: 1 when the closed form settles it; projected-gradient
      steps for ``'projected_gradient'``).
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
    if tuple(np.shape(mask)) != (gram.shape[0],):
      raise ValueError(
          f'grain_optax: mask has shape {tuple(np.shape(mask))}, but the Gram '
          f'matrix has {gram.shape[0]} groups; expected shape '
          f'({gram.shape[0]},), True for the groups to include.')
    valid = valid & jnp.asarray(mask, bool)
  pair = valid[:, None] & valid[None, :]
  gram = jnp.where(pair & jnp.isfinite(gram), gram, 0.0)
  scale = jnp.max(jnp.diagonal(gram))
  scale = jnp.where(scale > 0, scale, 0.0)
  # XLA may turn x / c into x * (1 / c), and 1 / c is subnormal (flushed to
  # zero) for c above 8.5e37: bring huge and tiny scales nearer 1 first by an
  # exact power of two.
  pre = jnp.where(scale > 2.0**64, jnp.float32(2.0**-64),
                  jnp.where((scale > 0) & (scale < 2.0**-64),
                            jnp.float32(2.0**64), jnp.float32(1)))
  normalized = (gram * pre) / jnp.where(scale > 0, scale * pre, 1.0)
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


# The exact solver's core is written with element-wise ops, reductions and
# selects only (no gathers, scatters or dynamic indexing), so that the same
# code runs under XLA (CPU, TPU, or GPU without Pallas) and, on a GPU, inside a
# single Pallas kernel. On the GPU that matters more than the arithmetic: each
# trip of an XLA while loop, and each lax.cond, copies a predicate to the host
# and waits for it, which stalls the training step's launch pipeline
# (measured on an H100: a GRAIN step spent 9.6 ms of 33 ms idle that way).


def _cholesky_factor(a):
  """Cholesky factors of a symmetric positive definite ``a``; returns a solver.

  Written with element-wise ops, reductions and selects only (see above), so
  the same code runs under XLA and inside the Pallas kernel: one set of
  numerics on every backend. Right-looking: step ``k`` takes column ``k`` of
  the Schur complement and subtracts its outer product. The returned function
  solves ``a x = b`` by forward and back substitution (``2n`` steps), which
  keeps the error of an ill-conditioned solve in its ill-conditioned
  directions (an explicit inverse spreads it over all of them). A
  non-positive pivot gives non-finite output, which the caller treats as a
  failed solve.
  """
  n = a.shape[0]
  rows = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
  idx = jax.lax.broadcasted_iota(jnp.int32, (n,), 0)
  zero = jnp.zeros((), a.dtype)

  def factor_step(k, carry):
    c, low = carry
    col = jnp.sum(jnp.where(cols == k, c, zero), axis=1)
    pivot = jnp.sum(jnp.where(idx == k, col, zero))
    l = jnp.where(idx >= k, col / jnp.sqrt(pivot), zero)
    c = c - l[:, None] * l[None, :]
    low = jnp.where(cols == k, l[:, None], low)
    return c, low

  _, low = jax.lax.fori_loop(0, n, factor_step, (a, jnp.zeros_like(a)))
  diag = jnp.sum(jnp.where(rows == cols, low, zero), axis=1)

  def solve(b):
    def forward(k, y):
      l = jnp.sum(jnp.where(cols == k, low, zero), axis=1)
      yk = jnp.sum(jnp.where(idx == k, y, zero)) / jnp.sum(
          jnp.where(idx == k, diag, zero))
      return jnp.where(idx == k, yk, jnp.where(idx > k, y - l * yk, y))

    def backward(j, x):
      k = n - 1 - j
      l = jnp.sum(jnp.where(rows == k, low, zero), axis=0)
      xk = jnp.sum(jnp.where(idx == k, x, zero)) / jnp.sum(
          jnp.where(idx == k, diag, zero))
      return jnp.where(idx == k, xk, jnp.where(idx < k, x - l * xk, x))

    y = jax.lax.fori_loop(0, n, forward, b)
    return jax.lax.fori_loop(0, n, backward, y)

  return solve


def _lapack_cholesky_factor(a):
  """The XLA path's factorisation: Cholesky from the platform's solver library.

  The same factorisation as :func:`_cholesky_factor` (so the same numerics,
  up to summation order), from LAPACK on the CPU and cuSOLVER on a GPU.
  """
  factor = jax.scipy.linalg.cho_factor(a, lower=True)
  return lambda b: jax.scipy.linalg.cho_solve(factor, b)


def _exact_core(k, valid, tolerance, regularization, max_iterations,
                factor):
  """Closed-form full-support solve, then Wolfe's algorithm if it fails.

  Args:
    k: ``[n, n]`` normalised Gram (zero rows and columns for excluded groups).
    valid: ``[n]`` float32, 1 for included groups, 0 otherwise.
    tolerance: KKT tolerance for adding a group (relative).
    regularization: ridge added to the diagonal.
    max_iterations: cap on Wolfe iterations (a Python int).
    factor: ``factor(a)`` for a symmetric positive definite ``a`` returns a
      function solving ``a x = b``.

  Returns:
    ``(w, iterations)``: ``[n]`` float32 weights (not yet symmetrised or
    renormalised) and the int32 number of linear solves.

  The problem solved is :math:`\\min_{w \\in \\Delta} w^\\top A w` with
  :math:`A = K + \\epsilon I` (strictly convex, so the minimiser is unique;
  its KKT residual on :math:`K` is at most :math:`\\epsilon / 4`).

  Stage 1 solves :math:`A y = 1` over every included group; if all
  :math:`y_i > 0` then :math:`w = y / 1^\\top y` satisfies
  :math:`(Aw)_i = w^\\top A w` for every group: the KKT point, in one solve.

  Otherwise stage 2 runs Wolfe's min-norm-point algorithm. A major cycle adds
  the group that violates KKT most; a minor cycle moves from the current
  point towards the affine minimiser of the support until a weight reaches
  zero and drops that group. The affine minimiser of a support :math:`S` is
  computed relative to a reference group :math:`r \\in S` (the one of largest
  weight): with :math:`\\beta` over :math:`S \\setminus r`,
  :math:`\\alpha_r = 1 - 1^\\top\\beta` and
  :math:`M \\beta = A_{S r} - A_{rr}`, :math:`M` the Gram matrix of the
  differences :math:`g_i - g_r` (plus the ridge), which is positive definite
  for any support of distinct groups. Unlike the system
  :math:`A_S y = 1`, it stays well posed when the minimum-norm point of the
  support's affine hull is the origin (conflicting groups on a low-rank
  Gram: the case that matters most for GRAIN).

  Starts: when stage 1's solve is accurate and at most half of its weights
  vanish, from the uniform weights on the groups stage 1 kept (usually one or
  two more solves settle it). Such a support can be affinely dependent (more
  groups than the rank of :math:`K` plus one), where the solve is
  ill-conditioned: every affine minimiser is therefore checked to be no worse
  than the current point (it cannot be, exactly), and a failed check, or an
  interior start that has not finished within ``2 * vanishing + 4`` trips,
  restarts from the vertex of smallest norm. From a vertex, supports stay
  affinely independent, and Wolfe's method decreases the objective strictly
  at every major cycle, so it cannot cycle. The loop ends only when no group
  violates KKT by more than ``tolerance`` (or at ``max_iterations``).
  ``iterations`` counts the linear solves.
  """
  n = k.shape[0]
  idx = jax.lax.broadcasted_iota(jnp.int32, (n,), 0)
  eye = (jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
         == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1))
  a = jnp.where(eye, k + regularization, k)
  diag = jnp.sum(jnp.where(eye, a, 0.0), axis=1)

  def matvec(x):
    return jnp.sum(a * x[None, :], axis=1)

  def first_index(mask):
    return jnp.min(jnp.where(mask, idx, n))

  # Stage 1: the closed form over every included group.
  system = jnp.where(eye, jnp.where(valid > 0, a, 1.0),
                     a * valid[:, None] * valid[None, :])
  y = factor(system)(valid)
  total = jnp.sum(y)
  ok = (total > 0) & (total < jnp.inf)
  alpha = y / jnp.where(ok, total, 1.0)
  kw = matvec(alpha)
  residual = jnp.max(jnp.where(valid > 0, jnp.sum(alpha * kw) - kw, -jnp.inf))
  usable = ok & (residual <= _CLOSED_FORM_ACCEPT)
  accept = usable & (jnp.min(jnp.where(valid > 0, alpha, 1.0)) > 0)

  masked_diag = jnp.where(valid > 0, diag, jnp.inf)
  vertex = (idx == first_index(masked_diag == jnp.min(masked_diag))).astype(
      jnp.float32)

  def affine_minimizer(support, w):
    """Affine minimiser of the support, relative to its heaviest group."""
    heaviest = jnp.max(jnp.where(support > 0, w, -jnp.inf))
    e = (idx == first_index((support > 0) & (w == heaviest))).astype(
        jnp.float32)
    rest = support * (1.0 - e)
    ar = matvec(e)
    arr = jnp.sum(e * ar)
    diff = a - ar[:, None] - ar[None, :] + arr
    system = jnp.where(eye, jnp.where(rest > 0, diff, 1.0),
                       diff * rest[:, None] * rest[None, :])
    solve = factor(system)
    beta = solve((arr - ar) * rest) * rest
    alpha = beta + e * (1.0 - jnp.sum(beta))
    # Iterative refinement against residuals taken from A itself (not from
    # the differenced matrix, whose entries carry cancellation errors): the
    # affine minimiser has (A alpha)_i equal over the support.
    def refine(_, alpha):
      aa = matvec(alpha)
      delta = solve((jnp.sum(e * aa) - aa) * rest) * rest
      return alpha + delta - e * jnp.sum(delta)

    alpha = jax.lax.fori_loop(0, _REFINEMENT_STEPS, refine, alpha)
    # (A min over a select, not jnp.all: Pallas' Triton lowering has no
    # reduce_and.)
    finite = jnp.min(jnp.where(jnp.isfinite(alpha), jnp.float32(1),
                                 jnp.float32(0))) > 0
    return alpha, finite

  def cond(state):
    return (state[3] == 0) & (state[2] < max_iterations)

  def body(state):
    w, support, it, _, phase, blocked, last_added, best = state
    alpha, ok = affine_minimizer(support, w)
    kw = matvec(w)
    obj_w = jnp.sum(w * kw)
    ka = matvec(alpha)
    obj = jnp.sum(alpha * ka)
    # The affine minimiser is no worse than w, which lies in the same affine
    # hull; anything else is a numerically failed solve.
    sane = ok & (obj <= obj_w + _AFFINE_SLACK)
    positive = sane & (jnp.min(jnp.where(support > 0, alpha, 1.0)) > 0)
    # Major cycle: alpha lies inside the face; add the most violating group
    # (not a blocked one; see below). Progress (a lower objective than at any
    # earlier major cycle) unblocks every group.
    progress = positive & (obj < best)
    blocked = jnp.where(progress, jnp.zeros_like(blocked), blocked)
    best = jnp.where(progress, obj, best)
    candidates = jnp.where((valid > 0) & (support == 0) & (blocked == 0), ka,
                           jnp.inf)
    lowest = jnp.min(candidates)
    j = first_index(candidates == lowest)
    add = lowest < obj - tolerance
    support_major = jnp.where((idx == j) & add, 1.0, support)
    # Minor cycle: move from w towards alpha until a weight reaches zero.
    negative = (support > 0) & (alpha <= 0)
    denom = w - alpha
    ratios = jnp.where(negative & (denom > 0),
                       w / jnp.where(denom > 0, denom, 1.0),
                       jnp.where(negative, jnp.float32(0), jnp.float32(jnp.inf)))
    theta = jnp.clip(jnp.min(ratios), 0.0, 1.0)
    w_minor = w + theta * (alpha - w)
    drop = (negative & (ratios <= theta)) | ((support > 0) & (w_minor <= 0))
    w_minor = jnp.where(drop, 0.0, w_minor)
    w_minor = w_minor / jnp.sum(w_minor)
    support_minor = jnp.where(drop, 0.0, support)
    # Anti-cycling: in exact arithmetic the group a major cycle adds keeps a
    # positive weight. If rounding makes the next minor cycle drop it again
    # without moving (theta = 0), adding it cannot make progress at this
    # precision: block it until the objective decreases. Each such trip blocks
    # one more group, and the objective decreases strictly between unblocks,
    # so the loop cannot cycle.
    stalled = (~positive & sane & (theta <= 0)
               & (jnp.sum(jnp.where(idx == last_added, drop, False)
                          .astype(jnp.float32)) > 0))
    blocked = jnp.where(stalled & (idx == last_added), 1.0, blocked)
    last_added = jnp.where(positive & add, j, -1).astype(jnp.int32)

    new_w = jnp.where(positive, alpha, w_minor)
    new_support = jnp.where(positive, support_major, support_minor)
    done = (positive & ~add).astype(jnp.int32)
    # A failed solve, or an interior start past its budget, restarts from the
    # vertex; a failed solve from a vertex start ends the loop (it has not
    # been seen; the KKT residual then reports it).
    restart = (phase == 1) & (~sane | ((it >= restart_at) & (done == 0)))
    give_up = (phase == 0) & ~sane
    new_w = jnp.where(restart, vertex, jnp.where(give_up, w, new_w))
    new_support = jnp.where(restart, vertex,
                            jnp.where(give_up, support, new_support))
    done = jnp.where(give_up, 1, jnp.where(restart, 0, done))
    phase = jnp.where(restart, 0, phase)
    blocked = jnp.where(restart, jnp.zeros_like(blocked), blocked)
    best = jnp.where(restart, jnp.float32(jnp.inf), best)
    return new_w, new_support, it + 1, done, phase, blocked, last_added, best

  count = jnp.sum(valid)
  vanishing = jnp.sum(((valid > 0) & (alpha <= 0)).astype(jnp.float32))
  kept = ((valid > 0) & (alpha > 0)).astype(jnp.float32)
  interior = usable & (vanishing <= jnp.maximum(2.0, count / 2)) & (
      jnp.sum(kept) > 0)
  restart_at = (2 * vanishing + 4).astype(jnp.int32)
  w0 = jnp.where(accept, alpha, jnp.where(
      interior, kept / jnp.maximum(jnp.sum(kept), 1.0), vertex))
  s0 = jnp.where(interior, kept, vertex)
  init = (w0, s0, jnp.ones([], jnp.int32), accept.astype(jnp.int32),
          interior.astype(jnp.int32), jnp.zeros_like(valid),
          jnp.full([], -1, jnp.int32), jnp.full([], jnp.inf, jnp.float32))
  w, _, iterations, _, _, _, _, _ = jax.lax.while_loop(cond, body, init)
  return w, iterations


# Stage 1 of the exact solver is accepted only if its KKT residual (relative,
# on the ridged Gram) is below this.
_CLOSED_FORM_ACCEPT = 2e-7
# An affine minimiser whose objective exceeds the current point's by more
# than this (relative to the largest diagonal, 1) is a failed solve.
_AFFINE_SLACK = 1e-6
# Refinement steps of each affine-minimiser solve.
_REFINEMENT_STEPS = 2


def _exact_kernel(k_ref, v_ref, p_ref, w_ref, it_ref):
  """Pallas kernel: the whole exact solver on one padded [n, n] Gram."""
  params = p_ref[...]
  idx = jax.lax.broadcasted_iota(jnp.int32, params.shape, 0)
  tolerance = jnp.sum(jnp.where(idx == 0, params, 0.0))
  regularization = jnp.sum(jnp.where(idx == 1, params, 0.0))
  max_iterations = jnp.sum(jnp.where(idx == 2, params, 0.0)).astype(jnp.int32)
  w, iterations = _exact_core(k_ref[...], v_ref[...], tolerance,
                              regularization, max_iterations, _cholesky_factor)
  w_ref[...] = w
  it_ref[...] = jnp.full(it_ref.shape, iterations, jnp.int32)


def _exact_pallas(k, valid_f, tolerance, regularization, max_iterations,
                  interpret=False):
  """Runs :func:`_exact_core` in one Pallas kernel (one launch, no host sync)."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  m = k.shape[0]
  n = max(16, 1 << (m - 1).bit_length())
  k_pad = jnp.zeros((n, n), jnp.float32).at[:m, :m].set(k)
  v_pad = jnp.zeros((n,), jnp.float32).at[:m].set(valid_f)
  params = jnp.zeros((16,), jnp.float32).at[0].set(tolerance).at[1].set(
      regularization).at[2].set(jnp.asarray(max_iterations, jnp.float32))
  w, it = pl.pallas_call(
      _exact_kernel,
      out_shape=(jax.ShapeDtypeStruct((n,), jnp.float32),
                 jax.ShapeDtypeStruct((16,), jnp.int32)),
      interpret=interpret)(k_pad, v_pad, params)
  return w[:m], it[0]


# Where the exact solver runs: 'auto' (a Pallas kernel on CUDA GPUs where it
# compiles and runs, XLA elsewhere), 'xla' or 'pallas_interpret' (for tests).
# Read at trace time. The environment variable GRAIN_OPTAX_EXACT_BACKEND
# ('auto' or 'xla') sets the default for the process.
_EXACT_BACKENDS = ('auto', 'xla', 'pallas_interpret')


def _backend_from_environment() -> str:
  name = os.environ.get('GRAIN_OPTAX_EXACT_BACKEND', 'auto').strip().lower()
  if name not in ('auto', 'xla'):
    raise ValueError(
        f'grain_optax: GRAIN_OPTAX_EXACT_BACKEND={name!r} is not a backend; '
        "use 'auto' (the default) or 'xla'.")
  return name


_EXACT_BACKEND = _backend_from_environment()


@contextlib.contextmanager
def exact_backend(name: str):
  """Within the block, functions *traced* run the exact solver on ``name``.

  For tests and benchmarks: ``'auto'`` (the default: a Pallas kernel on CUDA
  GPUs, XLA elsewhere), ``'xla'``, or ``'pallas_interpret'`` (the GPU kernel
  interpreted, on any device). Functions already compiled keep their backend.
  """
  global _EXACT_BACKEND  # pylint: disable=global-statement
  if name not in _EXACT_BACKENDS:
    raise ValueError(f'grain_optax: unknown exact-solver backend {name!r}; '
                     f'choose one of {_EXACT_BACKENDS}.')
  saved = _EXACT_BACKEND
  _EXACT_BACKEND = name
  try:
    yield
  finally:
    _EXACT_BACKEND = saved


@functools.lru_cache(maxsize=None)
def _gpu_present() -> bool:
  try:
    return bool(jax.devices('gpu'))
  except RuntimeError:
    return False


def _probe_pallas(interpret: bool = False) -> np.ndarray:
  """Builds and runs the kernel on a 2-group problem whose answer is known."""
  k = np.array([[1.0, 0.0], [0.0, 9.0]], np.float32)
  if not interpret:
    k = jax.device_put(k, jax.devices('gpu')[0])
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    w, _ = jax.jit(lambda k: _exact_pallas(
        k, jnp.ones(2, jnp.float32), 1e-7, 1e-7, 32, interpret=interpret))(k)
    w = np.asarray(w)
  if not np.allclose(w / w.sum(), [0.9, 0.1], atol=1e-5):
    raise RuntimeError(f'the kernel returned {w}, expected [0.9, 0.1]')
  return w


@functools.lru_cache(maxsize=None)
def _pallas_usable() -> bool:
  """Whether the Pallas kernel compiles, runs and is right on this GPU.

  Checked once per process on a 2-group problem with a known answer. Pallas'
  GPU backends change between JAX releases (the Triton one is deprecated):
  where the kernel cannot be built, the exact solver runs under XLA instead,
  with a warning, rather than failing the training step. The probe runs in
  a worker thread: this is called while a training step is being traced, and
  tracing contexts are per thread, so the probe runs eagerly there.
  """
  try:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      pool.submit(_probe_pallas).result()
    return True
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(
        'grain_optax: the exact solver\'s Pallas GPU kernel is unavailable on '
        f'this JAX ({jax.__version__}): {type(e).__name__}: {e}. The same '
        'algorithm runs under XLA instead (correct, with a few more '
        'microseconds per step).', RuntimeWarning, stacklevel=2)
    return False


# The kernel runs as one GPU program, so its n^3 factorisation is serial
# work: measured on an H200 (benchmarks/qp_solvers.py), 0.02-0.04 ms of device
# time up to m = 32, but 0.54 ms at m = 64 and 5.1 ms at m = 128, where XLA's
# cuSOLVER path takes 0.11 and 0.63 ms. Larger problems run under XLA.
_KERNEL_MAX_GROUPS = 32


def _exact(k, valid, tolerance, max_iterations, regularization):
  """The exact solver: weights on the simplex and the number of solves."""
  valid_f = valid.astype(jnp.float32)
  tolerance = jnp.asarray(tolerance, jnp.float32)
  regularization = jnp.asarray(regularization, jnp.float32)

  def on_xla(k, valid_f, tolerance, regularization):
    return _exact_core(k, valid_f, tolerance, regularization, max_iterations,
                       _lapack_cholesky_factor)

  def on_pallas(k, valid_f, tolerance, regularization):
    try:
      return _exact_pallas(k, valid_f, tolerance, regularization,
                           max_iterations)
    except ValueError:
      # Pallas cannot type its outputs in this context (e.g. inside
      # ``jax.shard_map`` with ``check_vma=True`` on JAX versions whose
      # ShapeDtypeStruct needs the manual axes spelled out): same algorithm
      # under XLA instead.
      return on_xla(k, valid_f, tolerance, regularization)

  args = (k, valid_f, tolerance, regularization)
  if _EXACT_BACKEND == 'xla':
    w, iterations = on_xla(*args)
  elif _EXACT_BACKEND == 'pallas_interpret':
    w, iterations = _exact_pallas(*args, max_iterations, interpret=True)
  elif k.shape[0] <= _KERNEL_MAX_GROUPS and _gpu_present() and _pallas_usable():
    # platform_dependent picks the branch for the device the computation
    # lands on (a jit may target the CPU on a GPU host).
    w, iterations = jax.lax.platform_dependent(
        *args, cuda=on_pallas, default=on_xla)
  else:
    # No GPU at all: never trace the Pallas branch.
    w, iterations = on_xla(*args)
  # Identical groups (equal rows of K, bit for bit) get equal weights: the
  # average over each class of duplicates changes neither d nor K w.
  same = ((k == jnp.diagonal(k)[:, None]) & (k == jnp.diagonal(k)[None, :])
          & valid[:, None] & valid[None, :])
  w = jnp.where(valid, jnp.maximum(w, 0.0), 0.0)
  w = _dot(same.astype(jnp.float32), w) / jnp.maximum(
      jnp.sum(same, axis=1), 1).astype(jnp.float32)
  w = jnp.where(valid, w, 0.0)
  return w / jnp.sum(w), iterations


def _static_number(x):
  """``x`` as a Python float if it is known at trace time, else None."""
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def _projected_gradient(k, valid, tolerance, max_iterations, stepsize):
  """jaxopt's ProjectedGradient with optax's Euclidean simplex projection."""
  # jaxopt builds parts of its state from Python floats, which are float64
  # in x64 mode: run it in the default float type of the mode, so that its
  # loop carries keep one dtype, and return float32.
  dtype = jnp.zeros(0).dtype
  k = k.astype(dtype)

  def objective(w, k):
    return _dot(w, _dot(k, w))

  def projection(w, valid):
    # Excluded groups are pushed far below the simplex threshold, so the
    # projection gives them exactly zero weight.
    return optax.projections.projection_simplex(
        jnp.where(valid, w, jnp.asarray(-1e9, w.dtype)))

  def run(step):
    pg = jaxopt.ProjectedGradient(
        fun=objective, projection=projection, tol=tolerance,
        maxiter=max_iterations, stepsize=step, implicit_diff=False,
        jit=True)
    w, state = pg.run(_uniform(valid).astype(dtype), valid, k)
    return w, jnp.asarray(state.iter_num, jnp.int32)

  if _static_number(stepsize) is None:
    # Injected (optax.inject_hyperparams): 0 selects the line search at run
    # time, so both variants are compiled.
    fixed = jnp.asarray(stepsize, dtype)
    w, iterations = jax.lax.cond(
        fixed > 0, lambda: run(lambda _: fixed), lambda: run(0.0))
  else:
    w, iterations = run(_static_number(stepsize))
  w = jnp.where(valid, jnp.maximum(w, 0.0), 0.0).astype(jnp.float32)
  return w / jnp.sum(w), iterations


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

  on :math:`K` divided by its largest diagonal entry, inside ``jit``.

  Solvers:

  * ``'exact'`` (default): first the closed form over the full support,
    :math:`w \propto (K + \epsilon I)^{-1}\mathbb{1}`, which is the answer
    whenever every weight comes out positive (the common case for group
    gradients of dimension much larger than m); otherwise Wolfe's
    min-norm-point active-set algorithm (major and minor cycles), started on
    the groups whose closed-form weight is positive when at most half of
    them vanish, else from the best vertex. Reaches
    the float32 KKT floor (about 1e-7 relative). On CUDA GPUs the whole
    algorithm runs as one Pallas kernel: no host round trip inside a training
    step, about 15-25 microseconds of device time for a full-support solve up
    to m = 32 on an H100. Elsewhere it runs under XLA with Cholesky solves
    (LAPACK or cuSOLVER), the same factorisation the kernel computes.
  * ``'projected_gradient'``: jaxopt's ``ProjectedGradient`` (accelerated, with
    backtracking line search unless ``stepsize > 0``) using optax's Euclidean
    projection onto the simplex. Approximate: stops at ``tolerance`` on the
    fixed-point error or after ``max_iterations`` steps.

  Degenerate inputs: an all-zero Gram gives uniform weights (any convex weights
  are optimal and the combination is zero); groups whose diagonal is NaN or
  infinite are excluded (weight 0); if all groups are excluded the weights are
  all zero. Identical groups (equal rows of the Gram matrix) get equal
  weights (``'exact'``); other non-unique minimisers get one of small
  :math:`\|w\|` (the ridge ``regularization`` picks it).

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
  if solver == 'exact':
    if max_iterations is None:
      max_iterations = 8 * m + 16
    w, iterations = _exact(k, valid, tolerance, max_iterations,
                           regularization)
  else:
    if max_iterations is None:
      max_iterations = 1000
    if _static_number(max_iterations) is None:
      raise ValueError(
          "grain_optax: solver='projected_gradient' needs max_iterations as a "
          'Python int (jaxopt sizes its loop with it), but it is traced; with '
          "optax.inject_hyperparams, pass static_args=('max_iterations',).")
    max_iterations = int(max_iterations)
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
