"""The Gram matrix of per-group updates."""

import functools
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from grain_optax._src import axes as axes_lib
from grain_optax._src import gram_kernel
from grain_optax._src import kernel_probe
from grain_optax._src import row_sparse
from grain_optax._src import validation


def leaf_gram(leaf: jax.Array, out_sharding: Any = None,
              other: Optional[jax.Array] = None) -> jax.Array:
  """The ``[m, m]`` float32 Gram of one ``[m, ...]`` leaf, contracted in place.

  A reshape to ``[m, P]`` would make the partitioner gather a leaf sharded
  along a minor parameter axis, so the parameter axes are contracted as they
  are. ``out_sharding`` (None: the partitioner's choice) is passed to
  ``dot_general``. With ``other`` (a leaf of the same shape), the cross
  products ``<leaf_i, other_j>`` instead.
  """
  other = leaf if other is None else other.astype(leaf.dtype)
  if leaf.ndim == 1:
    leaf, other = leaf[:, None], other[:, None]
  dims = (tuple(range(1, leaf.ndim)),) * 2
  kwargs = {} if out_sharding is None else {'out_sharding': out_sharding}
  return jax.lax.dot_general(
      leaf, other,
      dimension_numbers=(dims, ((), ())),
      precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32, **kwargs)


def blocked_gram(x: jax.Array, block: int) -> jax.Array:
  """The ``[m, m]`` float32 Gram of an ``[m, P]`` matrix, ``block`` columns
  at a time: the columns are padded with zeros to whole blocks, the blocks'
  Grams are one batched dot and their sum is the Gram. For ``P <= block``,
  :func:`leaf_gram`.
  """
  m, p = x.shape
  if p <= block:
    return leaf_gram(x)
  n = -(-p // block)
  x = jnp.pad(x, ((0, 0), (0, n * block - p))).reshape(m, n, block)
  partial = jax.lax.dot_general(
      x, x, dimension_numbers=(((2,), (2,)), ((1,), (1,))),
      precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32)
  return jnp.sum(partial, axis=0)


def total(grams: Sequence[jax.Array]) -> jax.Array:
  """The sum of a non-empty list of Gram matrices, in order."""
  return sum(grams[1:], grams[0])


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def kernel_gram(leaves: Tuple[jax.Array, ...], interpret: bool = False,
                config: gram_kernel.KernelConfig = gram_kernel.DEFAULT
                ) -> jax.Array:
  """The Gram of one device's leaves with the GPU kernel where it applies.

  Leaves the kernel supports (:func:`gram_kernel.supported`) take one kernel
  launch together, and one reduction sums its partial sums; those with
  fewer than ``config.small`` entries per group (biases, norms' scales)
  are concatenated in float32 and take one batched XLA dot
  (:func:`blocked_gram`, ``config.small_block`` columns a block); the rest
  take XLA's dot one by one. Differentiable (the tangent by XLA's dots).
  ``config`` is the kernel's tuning (:class:`gram_kernel.KernelConfig`).
  """
  grams, small, kernel = [], [], []
  for leaf in leaves:
    if gram_kernel.supported(leaf.shape, leaf.dtype, config):
      kernel.append(leaf)
    elif gram_kernel.small(leaf.shape, leaf.dtype, config):
      small.append(leaf.reshape(leaf.shape[0], -1).astype(jnp.float32))
    else:
      grams.append(leaf_gram(leaf))
  if small:
    grams.append(blocked_gram(jnp.concatenate(small, axis=1),
                              config.small_block))
  if kernel:
    # One launch per leaves_per_launch leaves: the kernel holds a branch per
    # leaf, and its compile time grows with them.
    n = config.leaves_per_launch
    parts = [gram_kernel.partials(kernel[i:i + n], interpret, config)
             for i in range(0, len(kernel), n)]
    summed = jnp.sum(parts[0] if len(parts) == 1
                     else jnp.concatenate(parts, axis=0), axis=0)
    grams.append(gram_kernel.finish(summed, leaves[0].shape[0]))
  return total(grams)


@kernel_gram.defjvp
def _kernel_gram_jvp(interpret, config, primals, tangents):
  (leaves,), (dleaves,) = primals, tangents
  cross = total([leaf_gram(x, other=t) for x, t in zip(leaves, dleaves)])
  return kernel_gram(leaves, interpret, config), cross + cross.T


def _on_gpu(*leaves: jax.Array) -> jax.Array:
  try:
    return kernel_gram(tuple(leaves))
  except ValueError as e:
    # Pallas cannot type its outputs in this context (inside jax.shard_map
    # with check_vma=True on some JAX versions): XLA's dots instead, with a
    # warning (a genuine bug shows there too).
    kernel_probe.fallback_warning("the Gram matrix's Pallas GPU kernel", e)
    return xla_gram(*leaves)


def _xla_grams(leaves: Sequence[jax.Array]) -> list:
  """One XLA dot per leaf (the partitioner sums sharded leaves' products)."""
  return [leaf_gram(leaf, axes_lib.explicit_replicated(leaf))
          for leaf in leaves]


def xla_gram(*leaves: jax.Array) -> jax.Array:
  """The Gram of one device's leaves by XLA's dots alone (no kernel)."""
  return total(_xla_grams(leaves))


def gram_of_leaves(leaves: Sequence[jax.Array],
                   param_axes: Tuple[Any, ...] = (), *,
                   backend: Optional[str] = None) -> jax.Array:
  """:func:`gram_matrix` of checked leaves (``param_axes`` bound, tracked).

  On one CUDA GPU the large 16-bit leaves go through :mod:`gram_kernel`'s
  kernel and the small ones through one batched dot (:func:`kernel_gram`),
  where either applies; elsewhere each leaf is one XLA dot. ``backend``
  (``'auto'`` or ``'xla'``; None: the default from
  ``GRAIN_OPTAX_GRAM_BACKEND``, read at trace time)
  is ``SolverOptions.gram_backend``; an explicit backend does not read the
  environment.
  """
  if backend is None:
    # Read on every trace that leaves it None, so that a misspelt variable
    # fails wherever a Gram is traced, not only where the kernel could run.
    backend = gram_kernel.backend_from_environment()
  elif backend not in ('auto', 'xla'):
    raise ValueError(f"grain_optax: gram_backend={backend!r} is not a Gram "
                     "backend; use 'auto' or 'xla'.")
  if (backend == 'auto' and not param_axes
      and (any(gram_kernel.supported(x.shape, x.dtype) for x in leaves)
           or sum(gram_kernel.small(x.shape, x.dtype) for x in leaves) > 1)
      and gram_kernel.enabled()):
    # platform_dependent picks the branch for the device the computation
    # lands on (a jit may target the CPU on a GPU host).
    return jax.lax.platform_dependent(*leaves, cuda=_on_gpu,
                                      default=xla_gram)
  grams = _xla_grams(leaves)
  if not param_axes:
    return total(grams)
  over = set(param_axes)
  return summed_partials(
      grams, [bool(over & axes_lib.varying_axes(leaf)) for leaf in leaves],
      param_axes=param_axes)


def summed_partials(grams: Sequence[jax.Array], sharded: Sequence[bool], *,
                    axes: Tuple[Any, ...] = (),
                    param_axes: Tuple[Any, ...] = ()) -> jax.Array:
  """The Gram from partial Grams inside ``shard_map``.

  A partial Gram whose ``sharded`` entry is True comes from a block of
  parameters sharded over ``param_axes``: it is summed over ``axes`` and
  ``param_axes``. The others (parameters replicated over ``param_axes``)
  are summed over ``axes`` only, so that they count once.
  """
  whole = [g for g, s in zip(grams, sharded) if not s]
  blocks = [g for g, s in zip(grams, sharded) if s]
  gram = None
  if whole:
    gram = total(whole)
    if axes:
      gram = jax.lax.psum(gram, axes)
  if blocks:
    part = jax.lax.psum(total(blocks), tuple(axes) + tuple(param_axes))
    gram = part if gram is None else gram + part
  return gram


def gram_matrix(per_group: Any, *,
                param_axis_name: Optional[axes_lib.AxisName] = None
                ) -> jax.Array:
  r"""Gram matrix of per-group updates, accumulated in float32.

  For a tree whose every leaf has a leading group axis of size :math:`m`,
  returns

  .. math::
    K_{ij} = \langle g_i, g_j \rangle = \sum_{\ell \in \text{leaves}}
    \operatorname{vec}(g_i^{(\ell)})^\top \operatorname{vec}(g_j^{(\ell)}).

  Each leaf is read once, as an ``[m, P_leaf] @ [P_leaf, m]`` product (its
  parameter axes contracted in place) with
  float32 accumulation whatever its dtype (bfloat16 and float16 products are
  exact in float32) and full float32 precision on accelerators (no TF32).

  On one CUDA GPU, bfloat16 and float16 leaves of at least 2^16 entries per
  group are read in one Pallas kernel launch on tensor cores (the products
  exact, the sums float32 in another order than XLA's); float32 and small
  leaves, every other platform, several devices, and
  ``GRAIN_OPTAX_GRAM_BACKEND=xla`` in the environment (the default of the
  ``gram_backend`` solver option) use XLA's dot.

  Sharded parameters: under ``jax.jit`` a leaf sharded along its parameter
  dimensions gives partial products that the partitioner sums with an
  all-reduce of the ``[m, m]`` result; no gradient is gathered. Inside
  ``jax.shard_map`` over a parameter axis, pass ``param_axis_name``: the
  leaves that vary over it are blocks of the parameters, and
  :math:`K = \operatorname{psum}(\sum_{\text{blocks}} K^{(s)}) +
  K_{\text{replicated}}` (leaves that do not vary over it count once).

  Args:
    per_group: a pytree whose leaves all have shape ``[m, *param_shape]``,
      or are :class:`RowSparse` (their Gram is taken on the rows they touch).
    param_axis_name: inside ``jax.shard_map`` (with ``check_vma=True``, the
      default), the axis or tuple of axes the parameters are sharded over.

  Returns:
    The symmetric positive semi-definite ``[m, m]`` float32 Gram matrix. A group
    with a NaN or infinite entry gets a non-finite row and column. With
    ``param_axis_name`` it is the same on every device.

  Raises:
    ValueError: if leaves disagree on ``m`` or a leaf has no group axis, or
      ``param_axis_name`` is not a bound axis or cannot be told apart (see
      above).

  Example:
    >>> import jax.numpy as jnp
    >>> import grain_optax
    >>> g = {'w': jnp.array([[1., 0.], [0., 2.]]), 'b': jnp.array([[1.], [1.]])}
    >>> grain_optax.gram_matrix(g)
    Array([[2., 1.],
           [1., 5.]], dtype=float32)
  """
  view, any_sparse = row_sparse.dense_view(per_group,
                                          'grain_optax.gram_matrix')
  if any_sparse:
    # RowSparse leaves (tables read by row lookups): their Gram on the rows
    # they touch, plus the dense leaves' (one device).
    validation.group_count(view)
    if param_axis_name is not None:
      raise ValueError('grain_optax.gram_matrix: RowSparse leaves are for '
                       'one device; param_axis_name cannot be given.')
    leaves = jax.tree_util.tree_leaves(per_group,
                                       is_leaf=row_sparse.is_row_sparse)
    dense = [x for x in leaves if not row_sparse.is_row_sparse(x)]
    grams = [row_sparse.gram(x) for x in leaves
             if row_sparse.is_row_sparse(x)]
    if dense:
      grams.append(gram_of_leaves(dense))
    return total(grams)
  validation.group_count(per_group)
  axes = axes_lib.axes_tuple(param_axis_name, 'param_axis_name')
  if axes and not axes_lib.is_bound(axes):
    raise ValueError(
        f'grain_optax.gram_matrix: param_axis_name={param_axis_name!r} is not '
        'a bound axis; call it inside jax.shard_map over that axis.')
  if axes and not axes_lib.vma_tracked(axes):
    raise ValueError(
        'grain_optax.gram_matrix: param_axis_name needs jax.shard_map with '
        'check_vma=True (the default) to tell the leaves sharded over the '
        'parameter axis from the replicated ones.')
  return gram_of_leaves(jax.tree_util.tree_leaves(per_group), axes)
