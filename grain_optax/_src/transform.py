"""``grain()``: GRAIN as an optax gradient transformation."""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from grain_optax._src import combine as combine_lib
from grain_optax._src import gram as gram_lib
from grain_optax._src import sharding as sharding_lib
from grain_optax._src import solvers
from grain_optax._src import validation


class GrainState(NamedTuple):
  """State of :func:`grain`: what the last update did, for logging.

  Every field describes the most recent call of ``update`` (zeros and uniform
  weights before the first one).

  Attributes:
    count: ``[]`` int32, number of updates so far.
    weights: ``[num_groups]`` float32 convex weights of the last update (zero
      for excluded groups), or ``None`` when ``num_groups`` was not given to
      :func:`grain`: the group count is then known only inside ``update``,
      and a state's shapes are fixed by ``init``, so the weights are not
      recorded (give ``num_groups`` to log them). ``None`` is an empty
      subtree: the state still saves and restores with orbax, passes through
      ``jax.lax.cond`` and ``jit``, and every other field is recorded.
    kkt_residual: ``[]`` float32 relative KKT residual of the weights (see
      :func:`kkt_residual`); near 1e-7 or below for the exact solver.
    norm_ratio: ``[]`` float32 :math:`\\|d\\| / \\|\\bar g\\|`, the norm of the
      applied update over the norm of the plain mean of the (finite) groups;
      at most 1; 0 when the mean is zero.
    min_cosine: ``[]`` float32 smallest cosine between the update :math:`d`
      and a group gradient; non-negative by construction (GRAIN's guarantee),
      0 when :math:`d = 0`. Compare with the same statistic for the mean to see
      how much conflict there was.
    mean_min_cosine: ``[]`` float32 smallest cosine between the plain mean and
      a group gradient; negative when the mean would have raised some group's
      loss to first order.
    num_nonfinite: ``[]`` int32, groups excluded from the last update because
      their gradient held NaN or infinity (or overflowed float32 in the Gram).
    solver_iterations: ``[]`` int32 iterations of the QP solver.
  """
  count: jax.Array
  weights: Optional[jax.Array]
  kkt_residual: jax.Array
  norm_ratio: jax.Array
  min_cosine: jax.Array
  mean_min_cosine: jax.Array
  num_nonfinite: jax.Array
  solver_iterations: jax.Array


def _statistics(k, weights, valid):
  """Norm ratio and worst cosines from the normalised Gram, O(m^2)."""
  n = jnp.maximum(jnp.sum(valid), 1)
  mean_w = jnp.where(valid, 1.0 / n, 0.0)
  diag = jnp.diagonal(k)
  norms = jnp.sqrt(jnp.maximum(diag, 0.0))

  def worst_cosine(w):
    kw = jnp.dot(k, w, precision=jax.lax.Precision.HIGHEST)
    sq = jnp.maximum(jnp.dot(w, kw, precision=jax.lax.Precision.HIGHEST), 0.0)
    denom = jnp.sqrt(sq) * norms
    cos = jnp.where(valid & (denom > 0), kw / jnp.where(denom > 0, denom, 1.0),
                    jnp.inf)
    worst = jnp.min(cos)
    return jnp.where(jnp.isfinite(worst), jnp.clip(worst, -1.0, 1.0), 0.0), sq

  min_cos, d_sq = worst_cosine(weights)
  mean_min_cos, mean_sq = worst_cosine(mean_w)
  ratio = jnp.where(mean_sq > 0, jnp.sqrt(d_sq / jnp.where(mean_sq > 0, mean_sq, 1.0)), 0.0)
  return ratio, min_cos, mean_min_cos


def initial_state(num_weights: Optional[int]) -> GrainState:
  """The :class:`GrainState` before any update: uniform weights, zeros.

  Args:
    num_weights: the length of ``weights``; 0 or None records no weights
      (``weights`` is None; a zero-size array would not save with orbax).
  """
  return GrainState(
      count=jnp.zeros([], jnp.int32),
      weights=(jnp.full([num_weights], 1.0 / num_weights, jnp.float32)
               if num_weights else None),
      kkt_residual=jnp.zeros([], jnp.float32),
      norm_ratio=jnp.zeros([], jnp.float32),
      min_cosine=jnp.zeros([], jnp.float32),
      mean_min_cosine=jnp.zeros([], jnp.float32),
      num_nonfinite=jnp.zeros([], jnp.int32),
      solver_iterations=jnp.zeros([], jnp.int32),
  )


def solution_state(previous: GrainState, gram, solution, *, mask=None,
                   record_weights: bool = True) -> GrainState:
  """The :class:`GrainState` describing one solve on ``gram``.

  Args:
    previous: the state before this update (its count is incremented; its
      weights are kept when ``record_weights`` is False).
    gram: the ``[m, m]`` Gram matrix that was solved.
    solution: the :class:`MinNormSolution` of that solve.
    mask: the ``[m]`` groups that took part (None: all); excluded groups are
      not counted as non-finite.
    record_weights: store ``solution.weights`` in the state.
  """
  k, valid, _ = solvers.normalize_gram(gram, mask)
  ratio, min_cos, mean_min_cos = _statistics(k, solution.weights, valid)
  considered = gram.shape[0] if mask is None else jnp.sum(mask)
  return GrainState(
      count=optax.safe_increment(previous.count),
      weights=solution.weights if record_weights else previous.weights,
      kkt_residual=jnp.asarray(solution.kkt_residual, jnp.float32),
      norm_ratio=ratio.astype(jnp.float32),
      min_cosine=min_cos.astype(jnp.float32),
      mean_min_cosine=mean_min_cos.astype(jnp.float32),
      num_nonfinite=(considered - jnp.sum(valid)).astype(jnp.int32),
      solver_iterations=jnp.asarray(solution.num_iterations, jnp.int32),
  )


def grain(
    *,
    num_groups: Optional[int] = None,
    solver: str = 'exact',
    tolerance: Optional[float] = None,
    max_iterations: Optional[int] = None,
    regularization: float = 1e-7,
    stepsize: float = 0.0,
    axis_name: Optional[sharding_lib.AxisName] = None,
    param_axis_name: Optional[sharding_lib.AxisName] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    param_sharding: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GRAIN: replace the mean of group gradients by their min-norm combination.

  Takes per-group updates :math:`g_1, \dots, g_m` (every leaf shaped
  ``[m, *param_shape]``, group axis first, e.g. from
  :func:`group_value_and_grad`) and returns

  .. math::
    d = \sum_{i=1}^m w_i g_i, \qquad
    w = \operatorname*{argmin}_{w \in \Delta_m} \Big\|\sum_i w_i g_i\Big\|^2
      = \operatorname*{argmin}_{w \in \Delta_m} w^\top K w,

  with :math:`K` the float32 Gram matrix (:func:`gram_matrix`) and the weights
  from :func:`min_norm_weights`. The update satisfies
  :math:`\langle d, g_i\rangle \ge \|d\|^2 \ge 0` for every group: to first
  order no group's loss rises. It goes first in a chain, turning the group axis
  into ordinary updates for the rest of the chain.

  Non-finite groups: a group whose gradient holds NaN or infinity is excluded
  (weight 0, contributing exactly zero) and counted in
  ``state.num_nonfinite``; if every group is non-finite the update is all
  zeros. NaN never reaches the update from a non-finite group.

  Args:
    num_groups: the number of groups :math:`m`. Optional; when given, the
      state records the weights of each step (``state.weights``) and ``update``
      checks the group count. With :func:`optax.inject_hyperparams`, list it in
      ``static_args``.
    solver: ``'exact'`` (active set; default) or ``'projected_gradient'``
      (jaxopt). See :func:`min_norm_weights`.
    tolerance: solver tolerance (see :func:`min_norm_weights`); may be injected.
    max_iterations: solver iteration cap (see :func:`min_norm_weights`).
    regularization: ridge for the exact solver; may be injected.
    stepsize: fixed step for the projected-gradient solver, 0 for line search.
    axis_name: the mesh axis (or tuple of axes) the groups are spread over:
      inside ``jax.shard_map`` a manual axis, each device passing its own
      ``[k, *param_shape]`` groups (``num_groups`` then counts all
      ``k * axis_size`` groups); under ``jax.jit`` an axis of the mesh that
      shards the group axis of ``[m, *param_shape]`` updates. None: read from
      the updates' types when their group axis is sharded over ``Explicit``
      mesh axes, otherwise no spreading.
    param_axis_name: inside ``jax.shard_map``, the axis (or axes) the
      parameters are sharded over (FSDP, tensor parallelism): the Gram matrix
      is the psum of the per-block partial Grams and no block is gathered.
    mesh: under ``jax.jit`` with ``Auto`` axes and no ``jax.set_mesh``
      context, the mesh that ``axis_name`` belongs to.
    param_sharding: under ``jax.jit`` with ``Auto`` axes, the params'
      ``PartitionSpec`` tree; leaves sharded along their dimensions (FSDP)
      keep that layout instead of being gathered. With ``Explicit`` axes it
      is read from ``params``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` accepts and
    ignores extra keyword arguments.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import grain_optax
    >>> params = {'w': jnp.zeros(2)}
    >>> tx = optax.chain(grain_optax.grain(num_groups=2), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> per_group = {'w': jnp.array([[1., 0.], [0., 2.]])}  # two groups
    >>> updates, state = tx.update(per_group, state, params)
    >>> [round(float(u), 4) for u in updates['w']]
    [-0.08, -0.04]
    >>> [round(float(w), 4) for w in state[0].weights]
    [0.8, 0.2]
  """
  if num_groups is not None and (
      not isinstance(num_groups, int) or num_groups < 1):
    raise ValueError(
        f'grain_optax.grain: num_groups must be a positive int, got '
        f'{num_groups!r} (with optax.inject_hyperparams, pass '
        "static_args=('num_groups',)).")
  if solver not in solvers.SOLVERS:
    raise ValueError(
        f'grain_optax.grain: unknown solver {solver!r}; choose one of '
        f'{solvers.SOLVERS}.')

  def init_fn(params):
    del params
    return initial_state(0 if num_groups is None else num_groups)

  sharding_lib.axes_tuple(axis_name, 'axis_name')
  sharding_lib.axes_tuple(param_axis_name, 'param_axis_name')

  def solve(gram):
    return solvers.min_norm_weights(
        gram, solver=solver, tolerance=tolerance,
        max_iterations=max_iterations, regularization=regularization,
        stepsize=stepsize)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    m = validation.group_count(updates)
    if params is not None:
      validation.check_matches_params(updates, params)
    plan = sharding_lib.make_plan(
        updates, axis_name=axis_name, param_axis_name=param_axis_name,
        mesh=mesh, param_sharding=param_sharding, params=params,
        caller='grain_optax.grain')
    if plan is not None and plan.kind == 'manual':
      local, m = m, plan.num_groups(m)
      if num_groups is not None and m != num_groups:
        raise ValueError(
            f'grain_optax.grain: each device has {local} groups on axis 0 and '
            f'axis {plan.axes} has {plan.size} devices, {m} groups in all, '
            f'but grain(num_groups={num_groups}) was asked for.')
    elif num_groups is not None and m != num_groups:
      raise ValueError(
          f'grain_optax.grain: the updates have {m} groups on axis 0, but '
          f'grain(num_groups={num_groups}) was asked for.')
    if plan is None:
      gram = gram_lib.gram_matrix(updates)
      sol = solve(gram)
      new_updates = combine_lib.combine(updates, sol.weights)
    else:
      new_updates, sol, gram = sharding_lib.run(plan, updates, solve)
    new_state = solution_state(state, gram, sol,
                               record_weights=num_groups is not None)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
