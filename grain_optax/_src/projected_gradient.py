"""The ``'projected_gradient'`` solver: jaxopt on the simplex QP.

jaxopt's ``ProjectedGradient`` (accelerated, with a backtracking line search
unless the step is fixed) with optax's Euclidean projection onto the simplex.
:mod:`solvers` imports this module only when the solver is traced: importing
jaxopt warns that it is no longer maintained, which ``import grain_optax``
should not.
"""

from typing import Tuple, Union

import jax
import jax.numpy as jnp
import jaxopt
import optax

_HIGHEST = jax.lax.Precision.HIGHEST


def _dot(a, b):
  return jnp.dot(a, b, precision=_HIGHEST)


def solve(k: jax.Array, valid: jax.Array, init: jax.Array,
          tolerance: jax.typing.ArrayLike, max_iterations: int,
          stepsize: Union[float, jax.Array]) -> Tuple[jax.Array, jax.Array]:
  """Projected gradient on a normalised Gram, from ``init``.

  Args:
    k: ``[m, m]`` normalised Gram.
    valid: ``[m]`` bool, the groups that take part.
    init: ``[m]`` float32 starting weights on the simplex of ``valid``.
    tolerance: jaxopt's ``tol`` on the fixed-point error.
    max_iterations: the iteration cap (a Python int: jaxopt sizes its loop).
    stepsize: a Python float (0: the line search), or an array known only at
      run time (``optax.inject_hyperparams``), where 0 selects the line
      search and both variants are compiled.

  Returns:
    ``(weights, iterations)``: ``[m]`` float32 weights on the simplex and the
    int32 number of steps.
  """
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
    w, state = pg.run(init.astype(dtype), valid, k)
    return w, jnp.asarray(state.iter_num, jnp.int32)

  if isinstance(stepsize, float):
    w, iterations = run(stepsize)
  else:
    fixed = jnp.asarray(stepsize, dtype)
    w, iterations = jax.lax.cond(
        fixed > 0, lambda: run(lambda _: fixed), lambda: run(0.0))
  w = jnp.where(valid, jnp.maximum(w, 0.0), 0.0).astype(jnp.float32)
  return w / jnp.sum(w), iterations
