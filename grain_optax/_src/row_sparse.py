r"""Per-group gradients of lookup tables, kept as the rows they touch.

A table :math:`E \in \mathbb{R}^{V \times D}` (a word embedding) that the loss
reads only through row lookups ``E[ids]`` has the gradient

.. math::
  \nabla_E L = \sum_t e_{\mathrm{id}_t}\, h_t^\top,

one row :math:`h_t` (the cotangent of lookup :math:`t`) added into row
:math:`\mathrm{id}_t`. A group of a few hundred tokens touches a few hundred of
MiniLM's 30522 rows, yet the dense per-group gradient is the whole table:
:math:`m` groups of it are :math:`m \times 47` MB in float32, written by the
backward pass and read again by the Gram matrix and by the combination.

:class:`RowSparse` keeps group :math:`i`'s gradient as its lookups
``(ids, rows)`` instead. Its Gram contribution is computed on the distinct ids
of the whole batch (at most the number of tokens), and the combination
:math:`\sum_i c_i g_i` is one scatter-add of :math:`c_{\mathrm{group}(t)} h_t`
into a single table, as the mean's backward pass writes its one table. Both
are exact: the same sums as on the dense tables, in another order.
"""

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from grain_optax._src import validation


@jax.tree_util.register_pytree_node_class
class RowSparse:
  """Per-group gradients of a table read by row lookups, as ``(ids, rows)``.

  Group :math:`i`'s gradient is the ``[num_rows, *row_shape]`` table
  holding, for every lookup :math:`t` of the group, ``rows[i, t]`` added into
  row ``ids[i, t]``; ids outside ``[0, num_rows)`` add nothing (a lookup out
  of range has no gradient). :func:`grain` accepts it as the per-group update
  of a table leaf and returns a dense update for it.

  :func:`nnx_group_value_and_grad` with ``row_sparse=True`` makes these
  for the tables the loss reads only by row lookups.

  Attributes:
    ids: ``[m, n]`` integer row ids of each group's ``n`` lookups.
    rows: ``[m, n, *row_shape]`` the gradient rows (cotangents of the looked
      up rows), floating.
    num_rows: the number of rows of the table, a Python int (static).

  Example:
    Two groups, each looking up two rows of a ``4 x 1`` table (group 1
    twice the same row):

    >>> import jax.numpy as jnp
    >>> import grain_optax
    >>> g = grain_optax.RowSparse(jnp.array([[0, 2], [2, 2]]),
    ...                           jnp.array([[[1.], [1.]], [[1.], [2.]]]), 4)
    >>> grain_optax.gram_matrix({'table': g})
    Array([[2., 3.],
           [3., 9.]], dtype=float32)
    >>> grain_optax.combine({'table': g}, jnp.array([0.5, 0.5]))['table']
    Array([[0.5],
           [0. ],
           [2. ],
           [0. ]], dtype=float32)
  """

  def __init__(self, ids: Any, rows: Any, num_rows: int):
    self.ids = ids
    self.rows = rows
    self.num_rows = num_rows

  def tree_flatten(self):
    return (self.ids, self.rows), self.num_rows

  @classmethod
  def tree_unflatten(cls, num_rows, children):
    return cls(*children, num_rows)

  @property
  def shape(self):
    """``[m, num_rows, *row_shape]``, the dense per-group tables' shape."""
    return (self.rows.shape[0], self.num_rows) + tuple(self.rows.shape[2:])

  @property
  def dtype(self):
    return self.rows.dtype

  def __repr__(self):
    return (f'RowSparse(ids={getattr(self.ids, "shape", self.ids)}, '
            f'rows={getattr(self.rows, "shape", self.rows)}, '
            f'num_rows={self.num_rows})')


def is_row_sparse(x: Any) -> bool:
  return isinstance(x, RowSparse)


def check(x: RowSparse, name: str, caller: str) -> None:
  """Shapes and dtypes of a :class:`RowSparse` leaf, at trace time."""
  ids, rows = x.ids, x.rows
  ids_shape = tuple(getattr(ids, 'shape', ()))
  rows_shape = tuple(getattr(rows, 'shape', ()))
  problem = None
  if not isinstance(x.num_rows, int) or x.num_rows < 1:
    problem = f'num_rows={x.num_rows!r} is not a positive int'
  elif len(ids_shape) != 2:
    problem = f'ids have shape {ids_shape}; expected [m, n]'
  elif rows_shape[:2] != ids_shape:
    problem = (f'rows have shape {rows_shape}, ids {ids_shape}; rows must be '
               '[m, n, *row_shape] with ids [m, n]')
  elif not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
    problem = f'ids have dtype {jnp.result_type(ids)}; expected integers'
  elif not jnp.issubdtype(jnp.result_type(rows), jnp.floating):
    problem = f'rows have dtype {jnp.result_type(rows)}; expected floats'
  if problem:
    raise ValueError(f'{caller}: the RowSparse update of leaf {name}: '
                     f'{problem}.')


def dense_view(tree: Any, caller: str) -> Tuple[Any, bool]:
  """``tree`` with every :class:`RowSparse` leaf checked and replaced by the
  ``ShapeDtypeStruct`` of its dense per-group tables (for the checks that
  name leaves), and whether there was one."""
  found, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=is_row_sparse)
  out, any_sparse = [], False
  for path, leaf in found:
    if is_row_sparse(leaf):
      check(leaf, validation.leaf_name(path), caller)
      leaf = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
      any_sparse = True
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out), any_sparse


def _flat(x: RowSparse):
  """Tokens as ``(group, key, rows)``: ``[N]``, ``[N]``, ``[N, R]`` float32.

  ``key`` is the row id, or ``num_rows`` for an id out of range, whose row is
  zeroed (it adds nothing, as in the dense gradient).
  """
  m, n = x.ids.shape
  ids = x.ids.reshape(-1).astype(jnp.int32)
  rows = x.rows.reshape(m * n, -1).astype(jnp.float32)
  inside = (ids >= 0) & (ids < x.num_rows)
  key = jnp.where(inside, ids, x.num_rows)
  rows = jnp.where(inside[:, None], rows, 0.0)
  group = jnp.repeat(jnp.arange(m, dtype=jnp.int32), n)
  return group, key, rows


def gram(x: RowSparse) -> jax.Array:
  r"""The ``[m, m]`` float32 Gram of the dense per-group tables of ``x``.

  On the distinct ids :math:`u` of all groups, :math:`c_i[u] = \sum_{t \in i,
  \mathrm{id}_t = u} h_t`, and :math:`K_{ij} = \sum_u \langle c_i[u],
  c_j[u]\rangle`: the rows no group touches contribute nothing, so only
  ``min(m n, num_rows + 1)`` rows are formed per group.
  """
  m, n = x.ids.shape
  group, key, rows = _flat(x)
  size = min(m * n, x.num_rows + 1)
  _, slot = jnp.unique(key, size=size, fill_value=x.num_rows,
                       return_inverse=True)
  compact = jnp.zeros((m, size, rows.shape[-1]), jnp.float32)
  compact = compact.at[group, slot.reshape(-1)].add(rows)
  # One [m, m] product per row, summed: a batched dot, where one [m, U R]
  # dot would be the skinny product XLA runs on few GPU blocks (gram.py,
  # blocked_gram).
  partial = jax.lax.dot_general(
      compact, compact, (((2,), (2,)), ((1,), (1,))),
      precision=jax.lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32)
  return jnp.sum(partial, axis=0)


def combination(x: RowSparse, coefficients: jax.Array,
                dtype: Optional[Any] = None) -> jax.Array:
  r"""The dense table :math:`\sum_i c_i g_i`, in ``dtype`` (default ``x``'s).

  One float32 scatter-add of :math:`c_{\mathrm{group}(t)} h_t`; a group whose
  coefficient is zero adds exactly zero, even where its rows are not finite.
  """
  group, key, rows = _flat(x)
  c = coefficients.astype(jnp.float32)[group][:, None]
  terms = jnp.where(c != 0, c * rows, 0.0)
  table = jnp.zeros((x.num_rows, rows.shape[-1]), jnp.float32)
  table = table.at[key].add(terms, mode='drop')
  return table.reshape(x.shape[1:]).astype(dtype or x.dtype)


def densify(x: RowSparse) -> jax.Array:
  """The dense ``[m, num_rows, *row_shape]`` per-group tables (for tests and
  for the paths that take dense leaves only)."""
  m = x.ids.shape[0]
  return jax.vmap(lambda c: combination(x, c))(jnp.eye(m, dtype=jnp.float32))
