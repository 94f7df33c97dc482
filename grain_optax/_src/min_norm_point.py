r"""GRAIN across devices at the communication cost of a gradient all-reduce.

In data-parallel training every device computes the gradient of its shard of
the batch and the gradients are averaged with an all-reduce, which sends about
:math:`2P(D-1)/D` values per device for :math:`P` parameters on :math:`D`
devices. The per-device gradients are natural groups for GRAIN, and the
min-norm point of :math:`m = kD` of them (:math:`k` groups per device) costs no
more traffic than their mean when computed as follows:

1. all-to-all: device :math:`s` receives parameter block :math:`s` of every
   group gradient (:math:`kP(D-1)/D` values, like a reduce-scatter);
2. every device forms the partial Gram matrix of its block,
   :math:`K^{(s)} = G_s G_s^\top`, and the :math:`m \times m` matrices are
   summed with an all-reduce, :math:`K = \sum_s K^{(s)}`;
3. every device solves the same simplex QP on the same :math:`K` and combines
   its block, :math:`d_s = \sum_i w_i g_{i,s}`;
4. all-gather of the blocks :math:`d_s` (:math:`P(D-1)/D` values).

For :math:`k = 1` that is :math:`2P(D-1)/D` plus :math:`m^2` floats: the bytes
of the all-reduce. With :math:`k` groups per device the all-to-all carries
:math:`k` times more, :math:`(k+1)/2` times the all-reduce in total.

:func:`min_norm_point` is the one orchestrator of Gram, solve and combine:
:func:`grain`, :func:`accumulate` and :func:`grain_value_and_grad` call
:func:`run` (or :func:`gram_and_solution`) here. It runs in three forms,
chosen at trace time by :func:`plan.make_plan`:

* under ``jax.shard_map`` (or ``pmap``), with manual collectives over a named
  axis (``grain(axis_name='data')``) and, for parameters sharded along their
  dimensions, a psum of partial Grams over the parameter axis
  (``param_axis_name``);
* under ``jax.jit`` with sharded arrays: sharding constraints that make the
  partitioner emit the same collectives. Automatic when the group axis is
  sharded over ``Explicit`` mesh axes (visible in ``jax.typeof``); with
  ``Auto`` axes pass ``axis_name`` (the partitioner's choice is not visible at
  trace time);
* gradients sharded along parameter dimensions under ``jax.jit`` (FSDP, tensor
  parallelism) need nothing: the partitioner sums partial Grams itself.

:func:`collective_bytes` (in :mod:`collectives`) reads the collectives of a
compiled program, to check the cost on the machine at hand.

References:
  GRAIN: Group Aggregation via min-norm objective, arXiv:2606.22917.
"""

import math
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from grain_optax._src import axes as axes_lib
from grain_optax._src import combine as combine_lib
from grain_optax._src import gram as gram_lib
from grain_optax._src import plan as plan_lib
from grain_optax._src import solvers
from grain_optax._src import variants
from grain_optax._src import validation


def _buckets(leaves, key):
  """Leaf indices grouped by ``key(i)``, in order of first appearance."""
  groups = {}
  for i in range(len(leaves)):
    groups.setdefault(key(i), []).append(i)
  return list(groups.items())


def _flatten_bucket(leaves, idx, rows, multiple, dtype):
  x = jnp.concatenate([leaves[i].reshape(rows, -1).astype(dtype)
                       for i in idx], axis=1)
  n = x.shape[1]
  pad = (-n) % multiple
  if pad:
    x = jnp.pad(x, ((0, 0), (0, pad)))
  return x, n


def _unflatten_bucket(flat, leaves, idx, out):
  offset = 0
  for i in idx:
    shape = leaves[i].shape[1:]
    size = math.prod(shape)
    out[i] = flat[offset:offset + size].reshape(shape)
    offset += size


def _moved_dtype(leaf, communication_dtype):
  """The dtype a leaf's blocks move between devices in."""
  if communication_dtype is None:
    return jnp.dtype(leaf.dtype)
  return jnp.dtype(communication_dtype)


def _run_manual(plan, leaves, solve, communication_dtype, coef):
  axes, param_axes, size = plan.axes, plan.param_axes, plan.size
  k = leaves[0].shape[0]
  tracked = axes_lib.vma_tracked(tuple(axes) + tuple(param_axes))
  varying = [axes_lib.varying_axes(leaf) if tracked else None
             for leaf in leaves]
  for v, leaf in zip(varying, leaves):
    if axes and v is not None and not set(axes) <= v:
      raise ValueError(
          f'grain_optax: the per-group updates are replicated over the '
          f'shard_map axis {axes} (a leaf of shape {leaf.shape} does not vary '
          'over it), so every device holds the same groups. This happens when '
          'jax.grad runs inside shard_map on replicated params: its transpose '
          'sums the gradients over the axis. Mark the params as varying before '
          f'differentiating: jax.lax.pcast(params, {axes!r}, to="varying").')
  if param_axes:
    if not tracked:
      raise ValueError(
          'grain_optax: param_axis_name needs jax.shard_map with '
          'check_vma=True (the default) to tell the leaves sharded over the '
          'parameter axis from the replicated ones.')
    sharded = []
    for v, leaf in zip(varying, leaves):
      over = set(param_axes) & v
      if over and over != set(param_axes):
        raise ValueError(
            f'grain_optax: a leaf of shape {leaf.shape} varies over {over} but '
            f'not over all of param_axis_name={param_axes}.')
      sharded.append(bool(over))
  else:
    sharded = [False] * len(leaves)
  if not axes:
    # Groups not spread, only parameter blocks: no data movement at all.
    gram = gram_lib.gram_of_leaves(leaves, param_axes)
    sol = solve(gram)
    wide = [jnp.promote_types(leaf.dtype, jnp.float32) for leaf in leaves]
    return (combine_lib.weighted_sum(leaves, coef(gram, sol.weights), wide),
            sol, gram)

  buckets = _buckets(leaves, lambda i: (
      _moved_dtype(leaves[i], communication_dtype), sharded[i]))
  blocks, grams_rep, grams_shard = [], [], []
  for (dtype, is_sharded), idx in buckets:
    x, n = _flatten_bucket(leaves, idx, k, size, dtype)
    if axes:  # Even for one device: the collectives type d as replicated.
      x = x.reshape(k, size, -1)
      x = jax.lax.all_to_all(x, axes, 1, 0, tiled=True)
      x = x.reshape(k * size, -1)
    blocks.append((x, n, idx))
    (grams_shard if is_sharded else grams_rep).append(gram_lib.leaf_gram(x))
  gram = None
  if grams_rep:
    part = gram_lib.total(grams_rep)
    gram = jax.lax.psum(part, axes) if axes else part
  if grams_shard:
    part = gram_lib.total(grams_shard)
    part = jax.lax.psum(part, tuple(axes) + tuple(param_axes))
    gram = part if gram is None else gram + part
  sol = solve(gram)
  c = coef(gram, sol.weights)
  out = [None] * len(leaves)
  for x, n, idx in blocks:
    d = combine_lib.weighted_sum(x, c)
    if axes:
      d = axes_lib.all_gather_invariant(d, axes)
    _unflatten_bucket(d[:n], leaves, idx, out)
  return out, sol, gram


def _leaf_target(trailing, shape, axes, size, sizes):
  """Where the group-axis-replicated layout puts the data axes of a leaf."""
  if set(axes) & axes_lib.used_axes(trailing):
    return trailing  # e.g. FSDP over the batch axis: already in place.
  best = None
  for j, (entry, dim) in enumerate(zip(trailing, shape)):
    shards = math.prod(sizes[a] for a in entry) if entry else 1
    if dim % (shards * size) == 0 and (best is None or dim > shape[best]):
      best = j
  if best is None:
    return trailing  # No divisible dimension: the partitioner decides.
  new = list(trailing)
  new[best] = tuple(trailing[best] or ()) + tuple(axes)
  return tuple(new)


def _run_partitioned(plan, leaves, solve, communication_dtype, coef):
  axes, size = plan.axes, plan.size
  m = leaves[0].shape[0]
  explicit = plan.kind == 'explicit'
  if explicit:
    mesh = plan.mesh
    constrain = lambda x, spec: jax.sharding.reshard(
        x, NamedSharding(mesh, spec))
    gram_out = NamedSharding(mesh, PartitionSpec())
  elif plan.mesh is not None:
    constrain = lambda x, spec: jax.lax.with_sharding_constraint(
        x, NamedSharding(plan.mesh, spec))
    gram_out = None
  else:
    constrain = jax.lax.with_sharding_constraint
    gram_out = None

  flat_path = [not axes_lib.used_axes(t) and not axes_lib.used_axes(o)
               for t, o in plan.leaf_specs]
  buckets = _buckets(leaves, lambda i: (
      _moved_dtype(leaves[i], communication_dtype), flat_path[i]))
  grams, blocks = [], []
  for (dtype, is_flat), idx in buckets:
    if is_flat:
      # Pin each group gradient where it is made (group axis over the data
      # axes) before the reshuffle; otherwise the partitioner may pull the
      # parameter-axis layout back into the backward pass and gather its
      # inputs (with two groups per device it gathered the token ids and
      # the per-group embedding cotangent for the embedding's gradient).
      pinned = list(leaves)
      if m % size == 0:
        for i in idx:
          pinned[i] = constrain(leaves[i], axes_lib.spec(axes))
      x, n = _flatten_bucket(pinned, idx, m, size, dtype)
      x = constrain(x, axes_lib.spec(None, axes))
      grams.append(gram_lib.leaf_gram(x, gram_out))
      blocks.append((x, n, idx))
    else:
      for i in idx:
        trailing, _ = plan.leaf_specs[i]
        target = _leaf_target(trailing, leaves[i].shape[1:], axes, size,
                              plan.mesh_sizes)
        x = constrain(leaves[i].astype(dtype), axes_lib.spec(None, *target))
        # Contract in place: flattening would gather minor-axis shards.
        grams.append(gram_lib.leaf_gram(x, gram_out))
        blocks.append((x, None, [i]))
  gram = gram_lib.total(grams)
  # Replicate K before the solve, or the partitioner splits the QP's loop.
  gram = constrain(gram, PartitionSpec())
  sol = solve(gram)
  weights = constrain(sol.weights, PartitionSpec())
  c = constrain(coef(gram, weights), PartitionSpec())
  out = [None] * len(leaves)
  for x, n, idx in blocks:
    d = combine_lib.weighted_sum(x, c)
    if n is not None:
      # Keep d in blocks until it is whole: otherwise the partitioner
      # gathers every group gradient instead of the combined one.
      d = constrain(d, axes_lib.spec(axes))
      d = constrain(d, PartitionSpec())
      _unflatten_bucket(d[:n], leaves, idx, out)
    else:
      i = idx[0]
      out[i] = constrain(d, axes_lib.spec(*plan.leaf_specs[i][1]))
  return out, sol._replace(weights=weights), gram


def gram_and_solution(per_group: Any, solve: solvers.Solve, mask: Any = None
                      ) -> Tuple[jax.Array, solvers.MinNormSolution]:
  """One device: the Gram matrix of checked per-group updates, and its QP."""
  gram = gram_lib.gram_of_leaves(jax.tree_util.tree_leaves(per_group))
  return gram, solve(gram, mask)


def run(plan: Optional[plan_lib.Plan], per_group: Any, solve: solvers.Solve,
        mask: Any = None, *, out_dtypes: Optional[Sequence[Any]] = None,
        communication_dtype: Any = None,
        apply: str = 'grain') -> 'MinNormPoint':
  """The min-norm point of checked per-group updates, as ``plan`` says.

  Args:
    plan: from :func:`plan.make_plan`; None for one device.
    per_group: the per-group updates (leaves ``[k, *param_shape]``).
    solve: ``solve(gram, mask) -> MinNormSolution``, from
      :func:`solvers.make_solve`.
    mask: the ``[m]`` bool groups that take part (all ``m`` groups, inside
      ``shard_map`` too), or None for all.
    out_dtypes: per leaf, the dtype of the update (None: the leaf's own).
    communication_dtype: the dtype group blocks and ``d`` move between
      devices in (None: each leaf's own); unused on one device.
    apply: what is combined (see :mod:`variants`): ``'grain'`` the min-norm
      point; the other values rescale or replace its weights by the
      coefficients :func:`variants.coefficients` gives. ``solution`` always
      holds the min-norm weights.
  """
  coef = lambda gram, weights: variants.coefficients(apply, gram, weights,
                                                     mask)
  leaves, treedef = jax.tree_util.tree_flatten(per_group)
  if out_dtypes is None:
    out_dtypes = [leaf.dtype for leaf in leaves]
  if plan is None:
    gram, sol = gram_and_solution(per_group, solve, mask)
    return MinNormPoint(
        combine_lib.weighted_sum(per_group, coef(gram, sol.weights),
                                 out_dtypes), sol, gram)
  masked_solve = lambda gram: solve(gram, mask)
  if plan.kind == 'manual':
    out, sol, gram = _run_manual(plan, leaves, masked_solve,
                                 communication_dtype, coef)
  else:
    out, sol, gram = _run_partitioned(plan, leaves, masked_solve,
                                      communication_dtype, coef)
  out = [o.astype(d) for o, d in zip(out, out_dtypes)]
  return MinNormPoint(jax.tree_util.tree_unflatten(treedef, out), sol, gram)


def nan_if_none_left(update: Any, weights: jax.Array,
                     taking_part: Any = True) -> Any:
  """All-NaN ``update`` where groups take part but none is finite.

  The weights are all zero exactly when no group is left; then, if any group
  was meant to take part, every floating leaf becomes NaN (as the plain mean
  would be), so that ``optax.apply_if_finite`` sees the step instead of a
  silent zero.
  """
  all_nonfinite = taking_part & (jnp.sum(weights) == 0)
  return jax.tree_util.tree_map(
      lambda u: jnp.where(all_nonfinite, jnp.nan, u)
      if jnp.issubdtype(u.dtype, jnp.inexact) else u, update)


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
    solver: validation.Solver = 'exact',
    tolerance: Optional[jax.typing.ArrayLike] = None,
    max_iterations: Optional[int] = None,
    regularization: jax.typing.ArrayLike = 1e-7,
    stepsize: jax.typing.ArrayLike = 0.0,
    communication_dtype: Any = None,
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

  Returns:
    A :class:`MinNormPoint` ``(update, solution, gram)``.

  Raises:
    ValueError: at trace time, if an axis is not bound (or not in the mesh),
      the axes overlap, or inside ``shard_map`` the updates do not vary over
      ``axis_name`` (the implicit psum of ``jax.grad`` on replicated params).

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
  solve = solvers.make_solve(
      solvers.SolverOptions(solver, tolerance, max_iterations, regularization,
                            stepsize), caller=caller)
  communication_dtype = validation.communication_dtype(
      communication_dtype, caller)
  validation.group_count(per_group)
  plan = plan_lib.make_plan(per_group, axis_name=axis_name,
                            param_axis_name=param_axis_name, mesh=mesh,
                            param_sharding=param_sharding, caller=caller)
  return run(plan, per_group, solve, communication_dtype=communication_dtype)
