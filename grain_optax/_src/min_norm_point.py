r"""The one orchestrator of a GRAIN step: placement, policy, one result.

:func:`run` computes everything a step of :func:`grain`, :func:`accumulate`,
:func:`grain_value_and_grad` or :func:`min_norm_point` needs, and those are
adapters around it:

1. where it runs: :func:`plan.make_plan` reads the :class:`Placement` and the
   updates' layout (one device, ``jax.shard_map`` or ``jax.jit`` with
   sharded arrays); the group count over all devices is checked, and inside
   ``shard_map`` the group mask of all devices is gathered;
2. Gram, solve and combine, on one device here or in one of the distributed
   forms of :mod:`distributed`, with the Gram normalised once
   (:func:`solvers.normalize_gram`) for the solve and the statistics;
3. the policy when no group is left: an all-NaN update if groups take part
   but none is finite (as the plain mean would be, so that
   ``optax.apply_if_finite`` sees the step), zeros if none takes part;
4. one :class:`Step`: the update, the solution, the Gram, the included
   groups and the :class:`state.Statistics`.

References:
  GRAIN: Group Aggregation via min-norm objective, arXiv:2606.22917.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from grain_optax._src import axes as axes_lib
from grain_optax._src import combine as combine_lib
from grain_optax._src import distributed
from grain_optax._src import gram as gram_lib
from grain_optax._src import plan as plan_lib
from grain_optax._src import row_sparse
from grain_optax._src import solvers
from grain_optax._src import state as state_lib
from grain_optax._src import validation
from grain_optax._src import variants

Placement = plan_lib.Placement
AxisName = axes_lib.AxisName


class Step(NamedTuple):
  """The one result of :func:`run`: what a GRAIN step computed.

  Attributes:
    update: the applied update, shaped like one group (the params), each leaf
      in its output dtype; all NaN if groups take part but none is finite.
    solution: the :class:`MinNormSolution` (``[m]`` float32 min-norm
      weights over all groups of all devices, KKT residual, iterations).
    gram: the ``[m, m]`` float32 Gram matrix of all groups.
    valid: ``[m]`` bool, the groups that took part and were finite.
    statistics: the :class:`state.Statistics` of the solve (norm ratio,
      cosines, effective groups, non-finite and excluded counts).
  """
  update: Any
  solution: solvers.MinNormSolution
  gram: jax.Array
  valid: jax.Array
  statistics: state_lib.Statistics


class _Solved(NamedTuple):
  """A solve and the normalised Gram it ran on.

  ``weights`` first, as in :class:`MinNormSolution`: :mod:`distributed`
  replaces them by their replicated form.
  """
  weights: jax.Array
  kkt_residual: jax.Array
  num_iterations: jax.Array
  normalized: jax.Array
  valid: jax.Array


def _none_left(update: Any, any_valid: jax.Array, taking_part: Any) -> Any:
  """``update``, or where no group is left NaN (groups take part) or 0."""
  empty = jnp.where(taking_part, jnp.nan, 0.0)
  return jax.tree_util.tree_map(
      lambda u: jnp.where(any_valid, u, empty.astype(u.dtype))
      if jnp.issubdtype(u.dtype, jnp.inexact) else u, update)


def run(per_group: Any, options: solvers.SolverOptions, *,
        placement: Optional[Placement] = None, group_mask: Any = None,
        num_groups: Optional[int] = None, params: Any = None,
        communication_dtype: Any = None, apply: str = 'grain',
        gram: Optional[jax.Array] = None,
        combine: Optional[Callable[[jax.Array, Step], Any]] = None,
        nan_if_none_left: bool = True,
        caller: str = 'grain_optax') -> Step:
  """One GRAIN step on checked per-group updates, wherever they live.

  Args:
    per_group: the per-group updates, leaves ``[k, *param_shape]`` (inside
      ``shard_map``, this device's ``k`` groups; elsewhere all ``m``).
    options: checked solver options (:func:`solvers.check_options`).
    placement: where to run; None for one device.
    group_mask: ``[k]`` bool (inside ``shard_map``, this device's groups),
      False for groups that take no part; None for all.
    num_groups: the ``m`` the caller was asked for, checked against the
      groups of all devices; None to skip the check.
    params: the params of the updates (their dtypes are the update's, and
      their ``Explicit`` shardings its layout), or None.
    communication_dtype: the checked dtype group blocks and the update move
      between devices in (None: each leaf's own); unused on one device.
    apply: what is combined (see :mod:`variants`); the solution and the
      statistics are the min-norm point's whatever is applied.
    gram: one device only: the Gram of ``per_group``, already computed by
      the caller (the lean mode reduces its first pass into it).
    combine: one device only: ``combine(coefficients, step)`` makes the
      update from the ``[m]`` coefficients and the step so far (``update``
      None); default: their weighted sum of ``per_group``.
    nan_if_none_left: apply the no-group-left policy (the module docstring,
      point 3); :func:`min_norm_point` returns the plain weighted sum.
    caller: the public function, for errors.

  Returns:
    The :class:`Step`.

  Raises:
    ValueError: at trace time, for a placement that does not fit the
      updates, a group count other than ``num_groups``, or a ``group_mask``
      of the wrong shape.
  """
  if any(row_sparse.is_row_sparse(x) for x in jax.tree_util.tree_leaves(
      per_group, is_leaf=row_sparse.is_row_sparse)):
    raise ValueError(
        f'{caller}: RowSparse per-group updates (row_sparse=True) are taken '
        'by grain() on one device; pass dense per-group gradients here.')
  leaves, treedef = jax.tree_util.tree_flatten(per_group)
  local = leaves[0].shape[0]
  plan = (None if placement is None
          else plan_lib.make_plan(per_group, placement, params=params,
                                  caller=caller))
  manual = plan is not None and plan.kind == 'manual'
  m = plan.num_groups(local) if plan is not None else local
  if num_groups is not None and m != num_groups:
    if manual:
      raise ValueError(
          f'{caller}: each device has {local} groups on axis 0 and '
          f'axis {plan.axes} has {plan.size} devices, {m} groups in all, '
          f'but grain(num_groups={num_groups}) was asked for.')
    raise ValueError(
        f'{caller}: the updates have {m} groups on axis 0, but '
        f'grain(num_groups={num_groups}) was asked for.')
  mask = validation.group_mask(group_mask, local, caller)
  if mask is not None and manual and plan.axes:
    mask = distributed.full_group_mask(plan, mask, local)
  out_dtypes = (None if params is None else
                [jnp.result_type(p) for p in jax.tree_util.tree_leaves(params)])

  def solve(gram):
    # The one normalisation of the step: the solve and the statistics.
    k, valid, _ = solvers.normalize_gram(gram, mask)
    return _Solved(*solvers.solve_normalized(k, valid, options), k, valid)

  def coef(gram, weights):
    return variants.coefficients(apply, gram, weights, mask)

  if plan is None:
    if gram is None:
      gram = gram_lib.gram_of_leaves(leaves, backend=options.gram_backend)
    solved = solve(gram)
    coefficients = coef(gram, solved.weights)
  elif gram is not None or combine is not None:
    raise ValueError(f'{caller}: gram= and combine= are for one device.')
  elif manual:
    out, solved, gram = distributed.run_manual(
        plan, leaves, solve, coef, communication_dtype=communication_dtype,
        gram_backend=options.gram_backend)
  else:
    out, solved, gram = distributed.run_partitioned(
        plan, leaves, solve, coef, communication_dtype=communication_dtype)
  solution = solvers.MinNormSolution(*solved[:3])
  step = Step(None, solution, gram, solved.valid, state_lib.solve_statistics(
      solved.normalized, solved.valid, solution.weights, mask, apply))
  if plan is None and combine is not None:
    update = combine(coefficients, step)
  elif plan is None:
    update = combine_lib.weighted_sum(per_group, coefficients, out_dtypes)
  else:
    if out_dtypes is None:
      out_dtypes = [leaf.dtype for leaf in leaves]
    update = jax.tree_util.tree_unflatten(
        treedef, [o.astype(d) for o, d in zip(out, out_dtypes)])
  if nan_if_none_left:
    taking_part = jnp.any(mask) if mask is not None else True
    update = _none_left(update, jnp.any(solved.valid), taking_part)
  return step._replace(update=update)


class MinNormPoint(NamedTuple):
  """Result of :func:`min_norm_point`.

  Attributes:
    update: the min-norm point :math:`d = \\sum_i w_i g_i`, a pytree shaped
      like one group (the params), each leaf in its group's dtype. Inside
      ``shard_map`` it is the same on every device of ``axis_name`` (and holds
      the local parameter block where ``param_axis_name`` shards them).
    solution: the :class:`MinNormSolution` of the QP: ``[m]`` float32 weights
      over all ``m`` groups of all devices, the relative KKT residual and the
      solver's iteration count; identical on every device.
    gram: ``[m, m]`` float32 Gram matrix of all groups, identical on every
      device.
  """
  update: Any
  solution: solvers.MinNormSolution
  gram: jax.Array


def min_norm_point(
    per_group: Any,
    *,
    axis_name: Optional[axes_lib.AxisName] = None,
    param_axis_name: Optional[axes_lib.AxisName] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    param_sharding: Any = None,
    solver: solvers.Solver = 'exact',
    tolerance: Optional[jax.typing.ArrayLike] = None,
    max_iterations: Optional[int] = None,
    regularization: jax.typing.ArrayLike = 1e-7,
    stepsize: jax.typing.ArrayLike = 0.0,
    communication_dtype: Any = None,
    solver_options: Optional[solvers.SolverOptions] = None,
) -> MinNormPoint:
  r"""Min-norm point of group gradients that may be spread over devices.

  Computes :math:`d = \sum_i w_i g_i` with
  :math:`w = \operatorname*{argmin}_{w \in \Delta_m} \|\sum_i w_i g_i\|^2`,
  where the :math:`m` groups may live on different devices, moving the bytes
  of one gradient all-reduce (see the module docstring): an all-to-all of the
  group gradients by parameter block, an all-reduce of the partial
  :math:`m \times m` Gram matrices, the same QP solved on every device, and an
  all-gather of :math:`d`.

  Where it runs:

  * inside ``jax.shard_map`` (or ``pmap``) with ``axis_name`` a manual axis:
    each device passes its own ``k`` groups (leaves ``[k, *param_shape]``);
    the groups of all devices are ordered by device index along
    ``axis_name``, ``m = k * axis_size``. With ``param_axis_name`` (alone or
    with ``axis_name``) the leaves that vary over that axis are parameter
    blocks (FSDP, tensor parallelism): their partial Grams are summed over it
    and ``d`` stays sharded; no block is gathered. Leaves that do not vary
    over it count once. Needs ``check_vma=True`` (shard_map's default).
  * under ``jax.jit`` with the group axis sharded over ``axis_name`` of the
    mesh (leaves ``[m, *param_shape]``, global shapes): sharding constraints
    make the partitioner emit the same collectives. The mesh comes from
    ``jax.set_mesh``, or from ``mesh``. With ``Explicit`` mesh axes, leave
    ``axis_name`` as None: it is read from the arrays' types. For parameters
    sharded over the same axes (FSDP), give their ``param_sharding`` (read
    from the params' types with ``Explicit`` axes via :func:`grain`): ``d``
    then keeps that layout and is never gathered.
  * with neither (and no explicitly sharded group axis): on one device, the
    same as :func:`gram_matrix`, :func:`min_norm_weights` and :func:`combine`.

  Args:
    per_group: a pytree whose leaves all have shape ``[k, *param_shape]``.
    axis_name: the mesh axis (or tuple of axes) the groups are spread over.
    param_axis_name: inside ``shard_map``, the axis (or axes) the parameter
      dimensions are sharded over.
    mesh: under ``jax.jit`` with ``Auto`` axes, the mesh to constrain on when
      no ``jax.set_mesh`` context is active.
    param_sharding: under ``jax.jit`` with ``Auto`` axes, a pytree of
      ``PartitionSpec`` (or ``NamedSharding``) of the params; leaves sharded
      along their dimensions keep that layout.
    solver: see :func:`min_norm_weights`.
    tolerance: see :func:`min_norm_weights`.
    max_iterations: see :func:`min_norm_weights`.
    regularization: see :func:`min_norm_weights`.
    stepsize: see :func:`min_norm_weights`.
    communication_dtype: the dtype the group blocks and :math:`d` move
      between devices in, e.g. ``jnp.bfloat16``. None (default): each leaf's
      own dtype, which for per-group gradients from
      :func:`group_value_and_grad` is the dtype the backward pass produced
      (bfloat16 for the weights of bfloat16 matmuls), so the bytes sent match
      those of the mean's all-reduce. The Gram matrix and the combination are
      accumulated in float32 either way; a dtype narrower than the leaves'
      rounds the groups before the Gram (the weights are optimal for the
      rounded groups) and :math:`d` before it is gathered. Unused on one
      device. float16 and the float8 types are refused: the blocks move
      unscaled, and entries beyond their range would become non-finite.
    solver_options: the solver options as one :class:`SolverOptions`, in
      place of ``solver`` ... ``stepsize`` (see :func:`min_norm_weights`).

  Returns:
    A :class:`MinNormPoint` ``(update, solution, gram)``.

  Raises:
    ValueError: for an unknown solver, or ``solver_options`` with a flat
      solver keyword that differs from its default; at trace time, if an
      axis is not bound (or not in the mesh), the axes overlap, or inside
      ``shard_map`` the updates do not vary over ``axis_name`` (the implicit
      psum of ``jax.grad`` on replicated params).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> import grain_optax
    >>> mesh = jax.make_mesh((1,), ('data',),
    ...                      axis_types=(jax.sharding.AxisType.Auto,))
    >>> def local(g):  # this device's groups, [k, 2]
    ...   res = grain_optax.min_norm_point(g, axis_name='data')
    ...   return res.update, res.solution.weights
    >>> step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P('data'),
    ...                              out_specs=(P(), P())))
    >>> d, w = step(jnp.array([[1., 0.], [0., 2.]]))
    >>> [round(float(v), 4) for v in d], [round(float(v), 4) for v in w]
    ([0.8, 0.4], [0.8, 0.2])
  """
  caller = 'grain_optax.min_norm_point'
  options = solvers.check_options(solvers.merge_options(
      solver_options, caller=caller, solver=solver, tolerance=tolerance,
      max_iterations=max_iterations, regularization=regularization,
      stepsize=stepsize), caller=caller)
  communication_dtype = validation.communication_dtype(
      communication_dtype, caller)
  placement = Placement(axis_name, param_axis_name, mesh, param_sharding)
  validation.group_count(per_group)
  step = run(per_group, options, placement=placement,
             communication_dtype=communication_dtype, nan_if_none_left=False,
             caller=caller)
  return MinNormPoint(step.update, step.solution, step.gram)
