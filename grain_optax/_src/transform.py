"""``grain()``: GRAIN as an optax gradient transformation."""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
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
    # k has unit largest diagonal: below ||d|| = 1e-6 max_i ||g_i|| (the
    # solver's float32 floor), d is 0 and its direction is rounding noise.
    sq = jnp.where(sq > 1e-12, sq, 0.0)
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
  mask = validation.group_mask(mask, gram.shape[0],
                               'grain_optax.solution_state')
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


def make_solve(*, solver: str, tolerance: Any, max_iterations: Any,
               regularization: Any, stepsize: Any, caller: str):
  """``solve(gram, mask=None) -> MinNormSolution`` for the given options.

  The numeric options may be arrays, as ``optax.inject_hyperparams`` makes
  them (traced inside ``jit``); :func:`min_norm_weights` takes them so, except
  the projected-gradient solver's iteration cap, which jaxopt needs static.

  Raises:
    ValueError: for an unknown solver, or ``'projected_gradient'`` with a
      ``max_iterations`` that is not a Python int.
  """
  if solver not in solvers.SOLVERS:
    raise ValueError(
        f'{caller}: unknown solver {solver!r}; choose one of '
        f'{solvers.SOLVERS}.')
  if validation.is_int_like(max_iterations):
    max_iterations = validation.positive_int(max_iterations, 'max_iterations',
                                             caller)
  elif max_iterations is not None and solver == 'projected_gradient':
    raise ValueError(
        f"{caller}: with solver='projected_gradient', max_iterations must "
        f'be a Python int (jaxopt needs a static loop bound), got '
        f'{max_iterations!r}. With optax.inject_hyperparams, pass '
        "static_args=('max_iterations',).")

  def solve(gram, mask=None):
    return solvers.min_norm_weights(
        gram, solver=solver, mask=mask, tolerance=tolerance,
        max_iterations=max_iterations, regularization=regularization,
        stepsize=stepsize)

  return solve


def _leaf_flags(mask, updates, params, caller):
  """The ``mask`` option as one static bool per leaf of ``updates``."""
  if callable(mask):
    if params is None:
      raise ValueError(
          f'{caller}: mask is a function of the params, so update needs them: '
          'tx.update(updates, state, params).')
    mask = mask(params)
  try:
    full = jax.tree_util.tree_map(
        lambda flag, sub: jax.tree_util.tree_map(lambda _: flag, sub),
        mask, updates)
  except ValueError as e:
    raise ValueError(
        f'{caller}: mask must have the tree structure of the params (or be a '
        f'prefix of it), with a bool per leaf or subtree. {e}') from None
  flags = []
  for path, entry in jax.tree_util.tree_flatten_with_path(full)[0]:
    flag = None
    if isinstance(entry, (bool, np.bool_)) or (
        np.shape(entry) == () and getattr(entry, 'dtype', None) == np.bool_):
      try:
        flag = bool(entry)
      except jax.errors.ConcretizationTypeError:
        pass
    if flag is None:
      raise ValueError(
          f'{caller}: mask entry for leaf {validation.leaf_name(path)} is '
          f'{entry!r}; the mask must hold Python bools (it decides shapes at '
          'trace time). With optax.inject_hyperparams, pass '
          "static_args=('mask',).")
    flags.append(flag)
  if not any(flags):
    raise ValueError(f'{caller}: mask is False for every leaf; nothing to '
                     'train.')
  return flags


def _full_group_mask(plan, local_mask, local):
  """Inside shard_map: the ``[m]`` mask of all groups, device-major."""
  index = jax.lax.axis_index(plan.axes)
  full = jnp.zeros([local * plan.size], jnp.int32)
  full = jax.lax.dynamic_update_slice(
      full, local_mask.astype(jnp.int32), (index * local,))
  return jax.lax.psum(full, plan.axes) > 0


def grain(
    *,
    num_groups: Optional[int] = None,
    mask: Any = None,
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
  ``state.num_nonfinite``; NaN never reaches the update from a non-finite
  group while another group is finite. If every group that takes part is
  non-finite, the update is all NaN (as the plain mean would be), so that
  ``optax.chain(grain(), optax.apply_if_finite(inner, n))`` sees the step and
  skips it.

  Empty groups: the update is 0 whenever 0 lies in the convex hull of the
  groups, e.g. when one group's gradient is zero because all its examples are
  padding. Pass ``group_mask`` to ``update`` (``[m]`` bool, False for groups
  to leave out) to exclude such groups: they get weight 0 and are not counted
  as non-finite; if no group takes part the update is zero.

  A subset of the parameters (frozen backbone, LoRA, linear probing): give
  ``mask``. Leaves where it is False are left out of the Gram matrix and get
  a zero update; keep the optimizer off them too (weight decay would move
  them) with ``optax.masked(inner, mask)`` after ``grain``. ``grain`` itself
  cannot go inside ``optax.masked``, ``optax.multi_transform``,
  ``optax.apply_if_finite`` or ``optax.MultiSteps`` (those pass on or return
  per-group updates): that raises a ``ValueError`` saying what to write.

  Args:
    num_groups: the number of groups :math:`m` (an int or a NumPy integer).
      Optional; when given, the state records the weights of each step
      (``state.weights``) and ``update`` checks the group count. With
      :func:`optax.inject_hyperparams`, list it in ``static_args``.
    mask: the parameters to train, as in ``optax.masked``: a tree of bools
      with the structure of the params (or a prefix of it), or a function of
      the params returning one (``update`` then needs ``params``). None
      (default): all of them. With :func:`optax.inject_hyperparams`, list it
      in ``static_args``.
    solver: ``'exact'`` (active set; default) or ``'projected_gradient'``
      (jaxopt). See :func:`min_norm_weights`.
    tolerance: solver tolerance (see :func:`min_norm_weights`); may be injected.
    max_iterations: solver iteration cap (see :func:`min_norm_weights`); with
      ``'projected_gradient'`` and :func:`optax.inject_hyperparams`, list it in
      ``static_args``.
    regularization: ridge for the exact solver; may be injected.
    stepsize: fixed step for the projected-gradient solver, 0 for line search;
      may be injected.
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
    An ``optax.GradientTransformationExtraArgs``. Its
    ``update(updates, state, params=None, *, group_mask=None, **extra_args)``
    takes an optional ``[m]`` bool ``group_mask`` (inside ``jax.shard_map``,
    each device's ``[k]`` mask of its own groups) and ignores other extra
    keyword arguments. Pass ``params``: per-group updates that are not
    ``params`` with a leading group axis (e.g. an ordinary gradient) are then
    rejected at trace time.

  Raises:
    ValueError: at construction, for a bad ``num_groups`` or an unknown
      solver; when ``update`` is traced, for updates that do not match each
      other or ``params`` (naming the leaf and its shape), complex leaves, a
      ``group_mask`` of the wrong shape, a bad ``mask``, or ``grain`` inside
      a wrapper that cannot carry per-group updates.

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

    Only some parameters trained, and one group left out by ``group_mask``:

    >>> params = {'head': jnp.zeros(2), 'body': jnp.zeros(3)}
    >>> trainable = {'head': True, 'body': False}
    >>> tx = optax.chain(grain_optax.grain(mask=trainable),
    ...                  optax.masked(optax.adamw(0.1), trainable))
    >>> per_group = {'head': jnp.array([[1., 0.], [0., 2.], [0., 0.]]),
    ...              'body': jnp.ones((3, 3))}
    >>> updates, state = tx.update(per_group, tx.init(params), params,
    ...                            group_mask=jnp.array([True, True, False]))
    >>> updates['body'].tolist()
    [0.0, 0.0, 0.0]
  """
  caller = 'grain_optax.grain'
  if num_groups is not None:
    num_groups = validation.positive_int(
        num_groups, 'num_groups', caller, phrase='a positive int',
        hint=(" (with optax.inject_hyperparams, pass "
              "static_args=('num_groups',))"))
  solve = make_solve(solver=solver, tolerance=tolerance,
                     max_iterations=max_iterations,
                     regularization=regularization, stepsize=stepsize,
                     caller=caller)

  def init_fn(params):
    del params
    return initial_state(0 if num_groups is None else num_groups)

  sharding_lib.axes_tuple(axis_name, 'axis_name')
  sharding_lib.axes_tuple(param_axis_name, 'param_axis_name')

  def update_fn(updates, state, params=None, *, group_mask=None,
                **extra_args):
    del extra_args
    validation.check_not_masked(updates, caller)
    validation.check_not_in_conditional(caller)
    m = validation.group_count(updates)
    if params is not None:
      validation.check_matches_params(updates, params)
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    flags = (None if mask is None
             else _leaf_flags(mask, updates, params, caller))
    if flags is None:
      sub_updates, sub_params, sub_sharding = updates, params, param_sharding
    else:
      # GRAIN on the trainable leaves only: lists of the selected leaves.
      pick = lambda xs: [x for x, f in zip(xs, flags) if f]
      sub_updates = pick(leaves)
      sub_params = (None if params is None
                    else pick(jax.tree_util.tree_leaves(params)))
      sub_sharding = param_sharding
      if param_sharding is not None:
        is_spec = lambda x: isinstance(x, (jax.sharding.PartitionSpec,
                                           jax.sharding.NamedSharding))
        sub_sharding = pick(jax.tree_util.tree_leaves(
            param_sharding, is_leaf=lambda x: x is None or is_spec(x)))
    plan = sharding_lib.make_plan(
        sub_updates, axis_name=axis_name, param_axis_name=param_axis_name,
        mesh=mesh, param_sharding=sub_sharding, params=sub_params,
        caller=caller)
    if plan is not None and plan.kind == 'manual':
      local, m = m, plan.num_groups(m)
      if num_groups is not None and m != num_groups:
        raise ValueError(
            f'{caller}: each device has {local} groups on axis 0 and '
            f'axis {plan.axes} has {plan.size} devices, {m} groups in all, '
            f'but grain(num_groups={num_groups}) was asked for.')
      g_mask = validation.group_mask(group_mask, local, caller)
      if g_mask is not None and plan.axes:
        g_mask = _full_group_mask(plan, g_mask, local)
    else:
      if num_groups is not None and m != num_groups:
        raise ValueError(
            f'{caller}: the updates have {m} groups on axis 0, but '
            f'grain(num_groups={num_groups}) was asked for.')
      g_mask = validation.group_mask(group_mask, m, caller)
    masked_solve = lambda gram: solve(gram, g_mask)
    if plan is None:
      gram = gram_lib.gram_matrix(sub_updates)
      sol = masked_solve(gram)
      new_sub = combine_lib.combine(sub_updates, sol.weights)
    else:
      new_sub, sol, gram = sharding_lib.run(plan, sub_updates, masked_solve)
    # Every group that takes part is non-finite: a NaN update, so that
    # apply_if_finite (or the user) sees the step instead of a silent zero.
    # (The weights are all zero exactly when no group is left.)
    taking_part = jnp.any(g_mask) if g_mask is not None else True
    all_nonfinite = taking_part & (jnp.sum(sol.weights) == 0)
    new_sub = jax.tree_util.tree_map(
        lambda u: jnp.where(all_nonfinite, jnp.nan, u)
        if jnp.issubdtype(u.dtype, jnp.inexact) else u, new_sub)
    if flags is None:
      new_updates = new_sub
    else:
      p_leaves = (None if params is None
                  else jax.tree_util.tree_leaves(params))
      out, done = [], iter(new_sub)
      for i, (leaf, f) in enumerate(zip(leaves, flags)):
        if f:
          out.append(next(done))
        elif p_leaves is not None:
          out.append(jnp.zeros_like(p_leaves[i], dtype=leaf.dtype))
        else:
          out.append(jnp.zeros(leaf.shape[1:], leaf.dtype))
      new_updates = jax.tree_util.tree_unflatten(treedef, out)
    new_state = solution_state(state, gram, sol, mask=g_mask,
                               record_weights=num_groups is not None)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
