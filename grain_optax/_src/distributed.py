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

Two forms, which :func:`min_norm_point.run` picks by the :class:`plan.Plan`:

* :func:`run_manual`, under ``jax.shard_map`` (or ``pmap``): manual
  collectives over a named axis and, for parameters sharded along their
  dimensions, a psum of partial Grams over the parameter axis;
* :func:`run_partitioned`, under ``jax.jit`` with sharded arrays: sharding
  constraints that make the partitioner emit the same collectives.

:func:`full_group_mask` gathers the ``[m]`` group mask of all devices inside
``shard_map``.
"""

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from grain_optax._src import axes as axes_lib
from grain_optax._src import combine as combine_lib
from grain_optax._src import gram as gram_lib
from grain_optax._src import plan as plan_lib


def full_group_mask(plan: plan_lib.Plan, local_mask: jax.Array,
                    local: int) -> jax.Array:
  """Inside shard_map: the ``[m]`` mask of all groups, device-major."""
  index = jax.lax.axis_index(plan.axes)
  full = jnp.zeros([local * plan.size], jnp.int32)
  full = jax.lax.dynamic_update_slice(
      full, local_mask.astype(jnp.int32), (index * local,))
  return jax.lax.psum(full, plan.axes) > 0


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


def run_manual(plan: plan_lib.Plan, leaves: Sequence[jax.Array],
               solve: Callable[[jax.Array], Any],
               coef: Callable[[jax.Array, jax.Array], jax.Array], *,
               communication_dtype: Any = None,
               gram_backend: Optional[str] = None
               ) -> Tuple[List[jax.Array], Any, jax.Array]:
  """Inside ``shard_map`` (or ``pmap``): collectives over ``plan.axes``.

  Args:
    plan: a ``'manual'`` plan.
    leaves: this device's per-group leaves, ``[k, *param_shape]``.
    solve: ``solve(gram)``, the QP on the ``[m, m]`` Gram of all groups; its
      result has the ``[m]`` ``weights``.
    coef: ``coef(gram, weights)``, the ``[m]`` coefficients to combine with.
    communication_dtype: the dtype blocks move in (None: each leaf's own).
    gram_backend: :attr:`SolverOptions.gram_backend`, for the Gram of
      unmoved leaves (no group axis).

  Returns:
    ``(update leaves, solve's result, gram)``, the update leaves in float32
    or wider.
  """
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
    gram = gram_lib.gram_of_leaves(leaves, param_axes, backend=gram_backend)
    sol = solve(gram)
    wide = [jnp.promote_types(leaf.dtype, jnp.float32) for leaf in leaves]
    return (combine_lib.weighted_sum(leaves, coef(gram, sol.weights), wide),
            sol, gram)

  buckets = _buckets(leaves, lambda i: (
      _moved_dtype(leaves[i], communication_dtype), sharded[i]))
  blocks, grams = [], []
  for (dtype, _), idx in buckets:
    x, n = _flatten_bucket(leaves, idx, k, size, dtype)
    # Even for one device: the collectives type d as replicated.
    x = x.reshape(k, size, -1)
    x = jax.lax.all_to_all(x, axes, 1, 0, tiled=True)
    x = x.reshape(k * size, -1)
    blocks.append((x, n, idx))
    grams.append(gram_lib.leaf_gram(x))
  gram = gram_lib.summed_partials(
      grams, [is_sharded for (_, is_sharded), _ in buckets], axes=axes,
      param_axes=param_axes)
  sol = solve(gram)
  c = coef(gram, sol.weights)
  out = [None] * len(leaves)
  for x, n, idx in blocks:
    d = axes_lib.all_gather_invariant(combine_lib.weighted_sum(x, c), axes)
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


def run_partitioned(plan: plan_lib.Plan, leaves: Sequence[jax.Array],
                    solve: Callable[[jax.Array], Any],
                    coef: Callable[[jax.Array, jax.Array], jax.Array], *,
                    communication_dtype: Any = None
                    ) -> Tuple[List[jax.Array], Any, jax.Array]:
  """Under ``jax.jit``: sharding constraints over ``plan.axes`` of a mesh.

  Args and result as :func:`run_manual`, for an ``'explicit'`` or ``'auto'``
  plan and the global ``[m, *param_shape]`` leaves.
  """
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
