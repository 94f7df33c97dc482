r"""The exact solver's algorithm: a closed form, then Wolfe's method.

Solves :math:`\min_{w \in \Delta} w^\top (K + \epsilon I) w` on a
normalised Gram matrix :math:`K` (see :func:`core`). Where it runs (XLA, or
one Pallas kernel on CUDA GPUs) is chosen in :mod:`exact`; both run this code.

References:
  Wolfe, `Finding the nearest point in a polytope
  <https://doi.org/10.1007/BF01580381>`_, Mathematical Programming 11, 1976.
"""

from typing import Callable, Tuple

import jax
import jax.numpy as jnp

# Stage 1 of the exact solver is accepted only if its KKT residual (relative,
# on the ridged Gram) is below this.
_CLOSED_FORM_ACCEPT = 2e-7
# An affine minimiser whose objective exceeds the current point's by more
# than this (relative to the largest diagonal, 1) is a failed solve.
_AFFINE_SLACK = 1e-6
# Refinement steps of each affine-minimiser solve.
_REFINEMENT_STEPS = 2


# The exact solver's core is written with element-wise ops, reductions and
# selects only (no gathers, scatters or dynamic indexing), so that the same
# code runs under XLA (CPU, TPU, or GPU without Pallas) and, on a GPU, inside a
# single Pallas kernel. On the GPU that matters more than the arithmetic: each
# trip of an XLA while loop, and each lax.cond, copies a predicate to the host
# and waits for it, which stalls the training step's launch pipeline
# (benchmarks/RESULTS.md, "Short steps: where the host time goes").


def cholesky_factor(a: jax.Array) -> Callable[[jax.Array], jax.Array]:
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


def lapack_cholesky_factor(a: jax.Array
                           ) -> Callable[[jax.Array], jax.Array]:
  """The XLA path's factorisation: Cholesky from the platform's solver library.

  The same factorisation as :func:`cholesky_factor` (so the same numerics,
  up to summation order), from LAPACK on the CPU and cuSOLVER on a GPU.
  """
  factor = jax.scipy.linalg.cho_factor(a, lower=True)
  return lambda b: jax.scipy.linalg.cho_solve(factor, b)


def core(k: jax.Array, valid: jax.Array, tolerance: jax.typing.ArrayLike,
         regularization: jax.typing.ArrayLike,
         max_iterations: jax.typing.ArrayLike,
         factor: Callable[[jax.Array], Callable[[jax.Array], jax.Array]]
         ) -> Tuple[jax.Array, jax.Array]:
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
                       jnp.where(negative, jnp.float32(0),
                                 jnp.float32(jnp.inf)))
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
