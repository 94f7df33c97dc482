"""``grain()``: GRAIN as an optax gradient transformation."""

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

from grain_optax._src import combine as combine_lib
from grain_optax._src import gram as gram_lib
from grain_optax._src import min_norm_point as mnp_lib
from grain_optax._src import row_sparse
from grain_optax._src import solvers
from grain_optax._src import state as state_lib
from grain_optax._src import validation
from grain_optax._src import variants


def _is_spec(x: Any) -> bool:
  return x is None or isinstance(x, (jax.sharding.PartitionSpec,
                                     jax.sharding.NamedSharding))


def _select(flags: Sequence[bool], updates: Any, params: Any,
            placement: mnp_lib.Placement
            ) -> Tuple[List[Any], Optional[List[Any]], mnp_lib.Placement]:
  """The trainable leaves of the updates and params, and their placement."""
  pick = lambda xs: [x for x, f in zip(xs, flags) if f]
  sub_params = (None if params is None
                else pick(jax.tree_util.tree_leaves(params)))
  if placement.param_sharding is not None:
    placement = dataclasses.replace(placement, param_sharding=pick(
        jax.tree_util.tree_leaves(placement.param_sharding,
                                  is_leaf=_is_spec)))
  return pick(jax.tree_util.tree_leaves(updates)), sub_params, placement


def _scatter(flags: Sequence[bool], updates: Any, params: Any,
             new_sub: Sequence[Any]) -> Any:
  """The trainable leaves' updates, zeros for the other leaves."""
  leaves, treedef = jax.tree_util.tree_flatten(updates)
  p_leaves = None if params is None else jax.tree_util.tree_leaves(params)
  out, done = [], iter(new_sub)
  for i, (leaf, f) in enumerate(zip(leaves, flags)):
    if f:
      out.append(next(done))
    elif p_leaves is not None:
      out.append(jnp.zeros_like(p_leaves[i]))
    else:
      out.append(jnp.zeros(leaf.shape[1:], leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def _run_row_sparse(updates: Any, params: Any, flags: Optional[List[bool]],
                    options: solvers.SolverOptions, **run_args
                    ) -> Tuple[Any, mnp_lib.Step]:
  """One device's step with :class:`RowSparse` leaves among the updates.

  The dense leaves' Gram (the usual backends) plus each row-sparse leaf's
  Gram on its touched rows; the update combines the dense leaves as usual
  and scatters each row-sparse leaf's weighted rows into one table.
  """
  leaves, treedef = jax.tree_util.tree_flatten(
      updates, is_leaf=row_sparse.is_row_sparse)
  p_leaves = (None if params is None
              else treedef.flatten_up_to(params))
  out_dtype = lambda i: (leaves[i].dtype if p_leaves is None
                         else jnp.result_type(p_leaves[i]))
  taken = [i for i in range(len(leaves)) if flags is None or flags[i]]
  sparse = [i for i in taken if row_sparse.is_row_sparse(leaves[i])]
  dense = [i for i in taken if i not in sparse]
  m = leaves[taken[0]].shape[0]
  grams = [row_sparse.gram(leaves[i]) for i in sparse]
  if dense:
    grams.append(gram_lib.gram_of_leaves(
        [leaves[i] for i in dense], backend=options.gram_backend))
  gram = gram_lib.total(grams)

  def combine(coefficients, step):
    del step
    out = {}
    if dense:
      out.update(zip(dense, combine_lib.weighted_sum(
          [leaves[i] for i in dense], coefficients,
          [out_dtype(i) for i in dense])))
    for i in sparse:
      out[i] = row_sparse.combination(leaves[i], coefficients, out_dtype(i))
    return [out[i] for i in taken]

  # Only the leading axis of these stand-ins is read: gram and combine are
  # given.
  stand_ins = [jnp.zeros((m, 0), jnp.float32) for _ in taken]
  step = mnp_lib.run(stand_ins, options, gram=gram, combine=combine,
                     **run_args)
  new = iter(step.update)
  out = []
  for i, leaf in enumerate(leaves):
    if flags is None or flags[i]:
      out.append(next(new))
    else:
      out.append(jnp.zeros(leaf.shape[1:], out_dtype(i)))
  return jax.tree_util.tree_unflatten(treedef, out), step


def grain(
    *,
    num_groups: Optional[int] = None,
    mask: Any = None,
    solver: solvers.Solver = 'exact',
    tolerance: Optional[jax.typing.ArrayLike] = None,
    max_iterations: Optional[int] = None,
    regularization: jax.typing.ArrayLike = 1e-7,
    stepsize: jax.typing.ArrayLike = 0.0,
    axis_name: Optional[mnp_lib.AxisName] = None,
    param_axis_name: Optional[mnp_lib.AxisName] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    param_sharding: Any = None,
    communication_dtype: Any = None,
    apply: str = 'grain',
    solver_options: Optional[solvers.SolverOptions] = None,
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
  ``optax.apply_if_finite``, ``optax.MultiSteps``, ``optax.flatten``,
  ``optax.contrib.sam`` or ``optax.contrib.mechanize`` (those pass on,
  return or reshape per-group updates): that raises a ``ValueError`` saying
  what to write.

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
    communication_dtype: across devices, the dtype the group blocks and the
      update move in (see :func:`min_norm_point`). None (default): each
      leaf's own dtype; with :func:`group_value_and_grad`'s default
      ``grad_dtype='backward'`` the bytes sent then match those of the mean's
      all-reduce. ``jnp.float32`` moves bfloat16 groups without rounding
      the update, at twice the bytes. float16 and the float8 types are
      refused (they move unscaled and would overflow).
    apply: what the update is; the weights and every statistic in the
      state are those of the min-norm point whatever is applied.
      ``'grain'`` (default): the min-norm point :math:`d`.
      ``'mean'``: the plain mean of the groups that take part and are
      finite (**monitor mode**: ordinary training, equal to the chain
      without ``grain()`` up to float32 rounding, while the state logs what
      GRAIN would have done; read it with :func:`metrics`).
      ``'mean_at_grain_length'``: the mean's direction shortened to
      :math:`\|d\|`; ``'grain_at_mean_length'``: :math:`d`'s direction at
      the mean's length (zero when :math:`d = 0`). In this project's
      study (``benchmarks/STABILITY.md``), fine-tuning MiniLM with SGD +
      momentum and one example per group, ``'grain'`` kept training at
      learning rates where the mean diverged, ``'mean_at_grain_length'``
      did best of all (the gain is GRAIN's shorter step) and
      ``'grain_at_mean_length'`` diverged like the mean; at tuned AdamW
      learning rates ``'grain'`` did not beat the mean (MiniLM), nor did
      the two rescaled arms (small MLPs). See ``docs/when_grain_helps.md``
      and ``docs/guides/monitor.md``.
    solver_options: the solver options as one :class:`SolverOptions` (with
      the backends of the Gram and of the exact solver), in place of
      ``solver`` ... ``stepsize``, which are its sugar (and what
      :func:`optax.inject_hyperparams` can inject).

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its
    ``update(updates, state, params=None, *, group_mask=None, **extra_args)``
    takes an optional ``[m]`` bool ``group_mask`` (inside ``jax.shard_map``,
    each device's ``[k]`` mask of its own groups) and ignores other extra
    keyword arguments. Pass ``params``: per-group updates that are not
    ``params`` with a leading group axis (e.g. an ordinary gradient) are then
    rejected at trace time, and the update of each leaf comes in its
    parameter's dtype (float32 for float32 params even where the per-group
    gradients are bfloat16); without ``params``, in the per-group dtype.

  Raises:
    ValueError: at construction, for a bad ``num_groups``, an unknown
      solver, ``solver_options`` with a flat solver keyword that differs
      from its default, or bad axis names; when ``update`` is traced, for
      updates that do not match each other or ``params`` (naming the leaf
      and its shape), complex leaves, a ``group_mask`` of the wrong shape, a
      bad ``mask``, a bad ``gram_backend``, or ``grain`` inside a wrapper
      that cannot carry per-group updates.

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

  References:
    GRAIN: Group Aggregation via min-norm objective, arXiv:2606.22917.

    Désidéri, `Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization <https://doi.org/10.1016/j.crma.2012.03.014>`_, Comptes
    Rendus Mathématique, 2012.

    Sener & Koltun, `Multi-task learning as multi-objective optimization
    <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018.

    Wolfe, `Finding the nearest point in a polytope
    <https://doi.org/10.1007/BF01580381>`_, Mathematical Programming, 1976.
  """
  caller = 'grain_optax.grain'
  if num_groups is not None:
    num_groups = validation.positive_int(
        num_groups, 'num_groups', caller, phrase='a positive int',
        hint=(" (with optax.inject_hyperparams, pass "
              "static_args=('num_groups',))"))
  options = solvers.check_options(solvers.merge_options(
      solver_options, caller=caller, solver=solver, tolerance=tolerance,
      max_iterations=max_iterations, regularization=regularization,
      stepsize=stepsize), caller=caller)
  apply = variants.check_apply(apply, caller)
  placement = mnp_lib.Placement(axis_name, param_axis_name, mesh,
                                param_sharding)
  communication_dtype = validation.communication_dtype(
      communication_dtype, caller)

  def init_fn(params):
    del params
    return state_lib.initial_state(0 if num_groups is None else num_groups)

  def update_fn(updates, state, params=None, *, group_mask=None,
                **extra_args):
    del extra_args
    validation.check_not_masked(updates, caller)
    validation.check_not_in_conditional(caller)
    view, any_sparse = row_sparse.dense_view(updates, caller)
    validation.group_count(view)
    if params is not None:
      validation.check_matches_params(view, params)
    flags = (None if mask is None
             else validation.leaf_flags(mask, view, params, caller))
    validation.check_floating(view, flags, caller)
    if any_sparse:
      if (axis_name is not None or param_axis_name is not None
          or mesh is not None or param_sharding is not None):
        raise ValueError(
            f'{caller}: RowSparse updates (row_sparse=True) are for one '
            'device; across devices pass dense per-group gradients.')
      new_updates, step = _run_row_sparse(
          updates, params, flags, options, group_mask=group_mask,
          num_groups=num_groups, apply=apply, caller=caller)
      new_state = state_lib.solution_state(
          state, step.solution, step.statistics,
          record_weights=num_groups is not None)
      return new_updates, new_state
    if flags is None:
      sub_updates, sub_params, sub_placement = updates, params, placement
    else:  # GRAIN on the trainable leaves only.
      sub_updates, sub_params, sub_placement = _select(
          flags, updates, params, placement)
    step = mnp_lib.run(
        sub_updates, options, placement=sub_placement, group_mask=group_mask,
        num_groups=num_groups, params=sub_params,
        communication_dtype=communication_dtype, apply=apply, caller=caller)
    new_updates = (step.update if flags is None
                   else _scatter(flags, updates, params, step.update))
    new_state = state_lib.solution_state(
        state, step.solution, step.statistics,
        record_weights=num_groups is not None)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
