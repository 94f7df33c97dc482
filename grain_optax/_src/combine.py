"""Combining per-group updates with convex weights."""

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from grain_optax._src import row_sparse
from grain_optax._src import validation


def combine(per_group: Any, weights: jax.typing.ArrayLike) -> Any:
  r"""Weighted sum of per-group updates over the group axis.

  .. math::
    d = \sum_{i=1}^m w_i\, g_i

  Accumulates in float32 and returns each leaf in its own dtype. A group whose
  weight is zero contributes exactly zero, even if its update holds NaN or
  infinity, so excluded groups cannot poison the result.

  Args:
    per_group: a pytree whose leaves all have shape ``[m, *param_shape]``,
      or are :class:`RowSparse` (each gives a dense table).
    weights: an ``[m]`` array, typically from :func:`min_norm_weights`.

  Returns:
    A pytree of the same structure with leaves of shape ``param_shape``.

  Raises:
    ValueError: if ``weights`` is not ``[m]`` or leaves disagree on ``m``.

  Example:
    >>> import jax.numpy as jnp
    >>> import grain_optax
    >>> g = {'w': jnp.array([[1., 0.], [0., 1.]])}
    >>> grain_optax.combine(g, jnp.array([0.5, 0.5]))
    {'w': Array([0.5, 0.5], dtype=float32)}
  """
  view, any_sparse = row_sparse.dense_view(per_group, 'grain_optax.combine')
  m = validation.group_count(view)
  weights = jnp.asarray(weights)
  if weights.shape != (m,):
    raise ValueError(
        f'grain_optax.combine: weights have shape {weights.shape}, but the '
        f'per-group tree has {m} groups; expected shape ({m},).')
  if not any_sparse:
    return weighted_sum(per_group, weights)
  leaves, treedef = jax.tree_util.tree_flatten(
      per_group, is_leaf=row_sparse.is_row_sparse)
  dense = [i for i, x in enumerate(leaves)
           if not row_sparse.is_row_sparse(x)]
  out = list(leaves)
  for i, x in zip(dense, weighted_sum([leaves[i] for i in dense], weights)):
    out[i] = x
  for i, x in enumerate(leaves):
    if row_sparse.is_row_sparse(x):
      out[i] = row_sparse.combination(x, weights)
  return jax.tree_util.tree_unflatten(treedef, out)


def weighted_sum(per_group: Any, weights: jax.Array,
                 dtypes: Optional[Sequence[Any]] = None) -> Any:
  """:func:`combine` of a checked tree and ``[m]`` weights.

  ``dtypes``: per leaf (in flattening order), the dtype of the result; None
  for each leaf's own.
  """
  weights = jnp.asarray(weights).astype(jnp.float32)
  m = weights.shape[0]

  def leaf_combine(leaf, dtype):
    w = weights.reshape((m,) + (1,) * (leaf.ndim - 1))
    terms = jnp.where(w != 0, w * leaf.astype(jnp.float32), 0.0)
    return jnp.sum(terms, axis=0).astype(dtype or leaf.dtype)

  leaves, treedef = jax.tree_util.tree_flatten(per_group)
  dtypes = [None] * len(leaves) if dtypes is None else list(dtypes)
  return jax.tree_util.tree_unflatten(
      treedef, [leaf_combine(x, d) for x, d in zip(leaves, dtypes)])
