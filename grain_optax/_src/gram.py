"""The Gram matrix of per-group updates."""

from typing import Any

import jax
import jax.numpy as jnp

from grain_optax._src import validation


def _leaf_gram(leaf: jax.Array) -> jax.Array:
  m = leaf.shape[0]
  flat = leaf.reshape(m, -1)
  return jax.lax.dot_general(
      flat, flat,
      dimension_numbers=(((1,), (1,)), ((), ())),
      precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32)


def gram_matrix(per_group: Any) -> jax.Array:
  r"""Gram matrix of per-group updates, accumulated in float32.

  For a tree whose every leaf has a leading group axis of size :math:`m`,
  returns

  .. math::
    K_{ij} = \langle g_i, g_j \rangle = \sum_{\ell \in \text{leaves}}
    \operatorname{vec}(g_i^{(\ell)})^\top \operatorname{vec}(g_j^{(\ell)}).

  Each leaf is read once, as an ``[m, P_leaf] @ [P_leaf, m]`` product with
  float32 accumulation whatever its dtype (bfloat16 and float16 products are
  exact in float32) and full float32 precision on accelerators (no TF32).

  Args:
    per_group: a pytree whose leaves all have shape ``[m, *param_shape]``.

  Returns:
    The symmetric positive semi-definite ``[m, m]`` float32 Gram matrix. A group
    with a NaN or infinite entry gets a non-finite row and column.

  Raises:
    ValueError: if leaves disagree on ``m`` or a leaf has no group axis.

  Example:
    >>> import jax.numpy as jnp
    >>> import grain_optax
    >>> g = {'w': jnp.array([[1., 0.], [0., 2.]]), 'b': jnp.array([[1.], [1.]])}
    >>> grain_optax.gram_matrix(g)
    Array([[2., 1.],
           [1., 5.]], dtype=float32)
  """
  validation.group_count(per_group)
  grams = [_leaf_gram(leaf) for leaf in jax.tree_util.tree_leaves(per_group)]
  return sum(grams[1:], grams[0])
