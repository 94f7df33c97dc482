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

:func:`min_norm_weights` is the public entry point; :class:`SolverOptions`
is the solver's options as one value, which every entry point accepts and
:func:`check_options` checks once. :func:`solve_normalized` solves a Gram that
:func:`normalize_gram` prepared. The exact solver's algorithm is in
:mod:`wolfe`, where it runs in :mod:`exact`.
"""

from typing import Any, Literal, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from grain_optax._src import exact
from grain_optax._src import validation

_HIGHEST = jax.lax.Precision.HIGHEST
Solver = Literal['exact', 'projected_gradient']
SOLVERS = ('exact', 'projected_gradient')
DEFAULT_TOLERANCE = {'exact': 1e-7, 'projected_gradient': 1e-6}


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


def _square_gram(gram: Any) -> jax.Array:
  """``gram`` as a float32 ``[m, m]`` array with ``m >= 1``."""
  gram = jnp.asarray(gram)
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
    raise ValueError(
        f'grain_optax: the Gram matrix must be square [m, m]; got shape '
        f'{gram.shape}.')
  if gram.shape[0] < 1:
    raise ValueError('grain_optax: the Gram matrix is empty (m = 0 groups).')
  return gram.astype(jnp.float32)


def _check_gram_mask(mask: Any, num_groups: int) -> None:
  """Checks that a solver's ``mask`` has shape ``[num_groups]``."""
  if mask is not None and tuple(np.shape(mask)) != (num_groups,):
    raise ValueError(
        f'grain_optax: mask has shape {tuple(np.shape(mask))}, but the Gram '
        f'matrix has {num_groups} groups; expected shape '
        f'({num_groups},), True for the groups to include.')


def normalize_gram(gram: jax.typing.ArrayLike,
                   mask: Optional[jax.typing.ArrayLike] = None
                   ) -> Tuple[jax.Array, jax.Array, jax.Array]:
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
  gram = _square_gram(gram)
  valid = jnp.isfinite(jnp.diagonal(gram))
  _check_gram_mask(mask, gram.shape[0])
  if mask is not None:
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


def kkt_residual(gram: jax.typing.ArrayLike, weights: jax.typing.ArrayLike,
                 mask: Optional[jax.typing.ArrayLike] = None) -> jax.Array:
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


def uniform(valid: jax.Array) -> jax.Array:
  """Uniform weights over the ``valid`` groups (all zero if there are none)."""
  n = jnp.sum(valid)
  return jnp.where(valid, 1.0 / jnp.maximum(n, 1), 0.0).astype(jnp.float32)


def static_number(x: Any) -> Optional[float]:
  """``x`` as a Python float if it is known at trace time, else None."""
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


class SolverOptions(NamedTuple):
  """The min-norm solver's options, as one value.

  Every entry point takes it as ``solver_options=``: :func:`grain`,
  :func:`accumulate`, :func:`grain_value_and_grad`, :func:`min_norm_point`
  and :func:`min_norm_weights`. Their flat keywords (``solver=``,
  ``tolerance=``, ...) are sugar for it (``optax.inject_hyperparams`` needs
  them); giving ``solver_options`` with a flat solver keyword that differs
  from its default is a ``ValueError``. The numeric options may be arrays, as
  ``optax.inject_hyperparams`` makes them (traced inside ``jit``), except the
  projected-gradient solver's iteration cap, which jaxopt needs static.

  Attributes:
    solver: ``'exact'`` or ``'projected_gradient'``.
    tolerance: the solver's tolerance; None for its default.
    max_iterations: the solver's iteration cap; None for its default.
    regularization: the exact solver's ridge.
    stepsize: the projected-gradient solver's step (0: line search).
    exact_backend: where the exact solver runs; None for the environment's
      default, read at trace time.
    gram_backend: how the Gram matrix is computed: ``'auto'`` (the GPU
      kernel where it applies, XLA's dots elsewhere) or ``'xla'``; None for
      the environment's default, read at trace time.

  Example:
    >>> import jax.numpy as jnp
    >>> import grain_optax
    >>> options = grain_optax.SolverOptions(tolerance=1e-6, gram_backend='xla')
    >>> tx = grain_optax.grain(solver_options=options)
    >>> sol = grain_optax.min_norm_weights(jnp.eye(2), solver_options=options)
    >>> [float(w) for w in sol.weights]
    [0.5, 0.5]
  """
  solver: Solver = 'exact'
  tolerance: Optional[jax.typing.ArrayLike] = None
  max_iterations: Optional[jax.typing.ArrayLike] = None
  regularization: jax.typing.ArrayLike = 1e-7
  stepsize: jax.typing.ArrayLike = 0.0
  exact_backend: Optional[exact.Backend] = None
  gram_backend: Optional[str] = None


def check_solver(solver: Any, caller: str) -> None:
  """Raises ValueError if ``solver`` is not one of :data:`SOLVERS`."""
  if solver not in SOLVERS:
    raise ValueError(
        f'{caller}: unknown solver {solver!r}; choose one of {SOLVERS}.')


def _is_default(value: Any, default: Any) -> bool:
  """Whether a flat keyword was left at (or set to) its default."""
  if value is default:
    return True
  plain = (int, float, str)
  return (isinstance(value, plain) and isinstance(default, plain)
          and value == default)


def merge_options(solver_options: Optional[SolverOptions], *, caller: str,
                  **flat: Any) -> SolverOptions:
  """``solver_options``, or an entry point's flat solver keywords as one.

  The flat keywords (``solver=``, ``tolerance=``, ...) are sugar for
  ``solver_options``; they may be given with it only at their defaults.

  Raises:
    TypeError: if ``solver_options`` is not a :class:`SolverOptions`.
    ValueError: if ``solver_options`` and a flat keyword that differs from
      its default are both given.
  """
  if solver_options is None:
    return SolverOptions(**flat)
  if not isinstance(solver_options, SolverOptions):
    raise TypeError(
        f'{caller}: solver_options must be a grain_optax.SolverOptions, got '
        f'{type(solver_options).__name__}.')
  defaults = SolverOptions()
  for name, value in flat.items():
    if not _is_default(value, getattr(defaults, name)):
      raise ValueError(
          f'{caller}: got both solver_options and {name}={value!r}; give '
          f'{name} in one place: solver_options=SolverOptions(..., '
          f'{name}=...), or the flat keywords without solver_options.')
  return solver_options


def _check_max_iterations(max_iterations: Any, solver: str,
                           caller: str) -> Any:
  """A transformation's ``max_iterations``: an int >= 1, None or an array.

  Arrays (``optax.inject_hyperparams`` makes them) are passed on, except
  with ``'projected_gradient'``, whose loop bound jaxopt needs static.
  """
  if validation.is_int_like(max_iterations) or isinstance(
      max_iterations, (bool, float, np.bool_, np.floating)):
    # Python and NumPy scalars: an int >= 1 (a float or a bool is an error).
    return validation.positive_int(max_iterations, 'max_iterations', caller)
  if max_iterations is not None and solver == 'projected_gradient':
    raise ValueError(
        f"{caller}: with solver='projected_gradient', max_iterations must "
        f'be a Python int (jaxopt needs a static loop bound), got '
        f'{max_iterations!r}. With optax.inject_hyperparams, pass '
        "static_args=('max_iterations',).")
  return max_iterations


def check_options(options: SolverOptions, *, caller: str) -> SolverOptions:
  """``options`` checked once, where a transformation is built.

  Raises:
    ValueError: for an unknown solver or exact-solver backend, or
      ``'projected_gradient'`` with a ``max_iterations`` that is not a Python
      int.
  """
  check_solver(options.solver, caller)
  if options.exact_backend is not None:
    exact.resolve_backend(options.exact_backend)
  return options._replace(max_iterations=_check_max_iterations(
      options.max_iterations, options.solver, caller))


def min_norm_weights(
    gram: jax.typing.ArrayLike,
    *,
    solver: Solver = 'exact',
    mask: Optional[jax.typing.ArrayLike] = None,
    tolerance: Optional[jax.typing.ArrayLike] = None,
    max_iterations: Optional[jax.typing.ArrayLike] = None,
    regularization: jax.typing.ArrayLike = 1e-7,
    stepsize: jax.typing.ArrayLike = 0.0,
    exact_backend: Optional[exact.Backend] = None,
    solver_options: Optional[SolverOptions] = None,
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
    algorithm runs as one Pallas kernel (no host round trip inside a training
    step; ``exact_backend``); elsewhere it runs under XLA with Cholesky solves
    (LAPACK or cuSOLVER), the same factorisation the kernel computes.
  * ``'projected_gradient'``: jaxopt's ``ProjectedGradient`` (accelerated, with
    backtracking line search unless ``stepsize > 0``) using optax's Euclidean
    projection onto the simplex. Approximate: stops at ``tolerance`` on the
    fixed-point error or after ``max_iterations`` steps.

  Derivatives: the weights are differentiable in the Gram matrix (and so
  in the group gradients), in forward and reverse mode (``jax.grad``
  through a :func:`grain` step, meta-gradients). ``'exact'``: by the
  implicit function theorem on the support (one linear solve of its KKT
  system; zero derivative off the support), not through the solver's loop.
  ``'projected_gradient'``: through its iterations, which is accurate only
  once they have converged (a fixed ``stepsize`` and a tight ``tolerance``).

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
    exact_backend: ``'exact'`` only: where it runs, ``'auto'`` (a Pallas
      kernel on CUDA GPUs where it works, XLA elsewhere), ``'xla'`` or
      ``'pallas_interpret'`` (the kernel interpreted, on any device; for
      tests). None (default): the environment variable
      ``GRAIN_OPTAX_EXACT_BACKEND`` (``'auto'`` or ``'xla'``), else
      ``'auto'``. Read when the function is traced.
    solver_options: the options above as one :class:`SolverOptions`, in
      place of the flat keywords (its ``gram_backend`` is unused here).

  Returns:
    A :class:`MinNormSolution` ``(weights, kkt_residual, num_iterations)``.

  Raises:
    ValueError: for a non-square Gram, an unknown solver or backend, a mask
      of the wrong shape, or ``solver_options`` together with a flat solver
      keyword that differs from its default.

  Example:
    >>> import jax.numpy as jnp
    >>> import grain_optax
    >>> g = jnp.array([[1., 0.], [0., 3.]])   # two conflicting-size groups
    >>> sol = grain_optax.min_norm_weights(g @ g.T)
    >>> [round(float(w), 3) for w in sol.weights]
    [0.9, 0.1]
    >>> bool(sol.kkt_residual < 1e-6)
    True

  References:
    Wolfe, `Finding the nearest point in a polytope
    <https://doi.org/10.1007/BF01580381>`_, Mathematical Programming, 1976.

    Désidéri, `Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization <https://doi.org/10.1016/j.crma.2012.03.014>`_, Comptes
    Rendus Mathématique, 2012.

    Sener & Koltun, `Multi-task learning as multi-objective optimization
    <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018.
  """
  options = merge_options(
      solver_options, caller='grain_optax.min_norm_weights', solver=solver,
      tolerance=tolerance, max_iterations=max_iterations,
      regularization=regularization, stepsize=stepsize,
      exact_backend=exact_backend)
  options = check_options(options, caller='grain_optax.min_norm_weights')
  return solve(gram, mask, options)


def solve(gram: jax.typing.ArrayLike, mask: Optional[jax.typing.ArrayLike],
          options: SolverOptions) -> MinNormSolution:
  """:func:`min_norm_weights` with checked options (the Gram is checked)."""
  k, valid, _ = normalize_gram(gram, mask)
  return solve_normalized(k, valid, options)


def solve_normalized(k: jax.Array, valid: jax.Array,
                     options: SolverOptions) -> MinNormSolution:
  """:func:`solve` of the ``(k, valid)`` that :func:`normalize_gram` gave."""
  solver, tolerance, max_iterations, regularization, stepsize, backend = (
      options[:6])
  m = k.shape[0]
  if tolerance is None:
    tolerance = DEFAULT_TOLERANCE[solver]
  if solver == 'exact':
    if max_iterations is None:
      max_iterations = 8 * m + 16
    w, iterations = exact.solve(k, valid, tolerance, max_iterations,
                                regularization,
                                exact.resolve_backend(backend))
  else:
    if max_iterations is None:
      max_iterations = 1000
    if static_number(max_iterations) is None:
      raise ValueError(
          "grain_optax: solver='projected_gradient' needs max_iterations as a "
          'Python int (jaxopt sizes its loop with it), but it is traced; with '
          "optax.inject_hyperparams, pass static_args=('max_iterations',).")
    max_iterations = int(max_iterations)
    # Imported when this solver is traced (see projected_gradient).
    from grain_optax._src import projected_gradient  # pylint: disable=g-import-not-at-top
    step = static_number(stepsize)
    w, iterations = projected_gradient.solve(
        k, valid, uniform(valid), tolerance, max_iterations,
        stepsize if step is None else step)
  any_valid = jnp.any(valid)
  zero_gram = jnp.all(k == 0)
  w = jnp.where(zero_gram, uniform(valid), w)
  w = jnp.where(any_valid, w, 0.0)
  w = jnp.where(jnp.isfinite(w), w, uniform(valid))
  kw = _dot(k, w)
  gap = jnp.where(valid, _dot(w, kw) - kw, -jnp.inf)
  residual = jnp.where(any_valid, jnp.maximum(jnp.max(gap), 0.0), 0.0)
  return MinNormSolution(w, residual.astype(jnp.float32), iterations)
