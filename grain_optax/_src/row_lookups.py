r"""Gradients of tables read by row lookups, as rows (:class:`RowSparse`).

:func:`value_and_grad` reads a loss's jaxpr for the differentiated leaves
whose only uses are row lookups, ``E[ids]`` (``jnp.take(E, ids, axis=0)``,
``nnx.Embed``), looking through casts to another float dtype. For those
tables it differentiates with respect to the looked-up rows instead: each
lookup's output gets a zero added, ``E[ids] + 0``, and the gradient of that
zero is the cotangent :math:`h_t` of every row :math:`t` looked up. The
table's gradient, :math:`\sum_t e_{\mathrm{id}_t} h_t^\top`, is then never
formed; :class:`RowSparse` holds ``(ids, h)``. The loss itself computes what
it computes without the rewrite (adding a zero changes no value).

Lookups at the top level of the loss's jaxpr or inside nested ``jax.jit``
calls count (``jnp.take`` is one; those calls are then run inline). A
table that enters a ``jax.checkpoint``, a ``scan`` or a custom derivative,
or has any other use (a tied output projection ``x @ E.T``, an output),
keeps its dense gradient.
"""

import collections
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.extend as jex
import jax.numpy as jnp

from grain_optax._src import jaxpr_calls
from grain_optax._src import row_sparse


def _is_row_lookup(eqn: Any) -> bool:
  """Whether a ``gather`` equation reads whole rows of its operand."""
  operand, indices = (v.aval for v in eqn.invars[:2])
  dims = eqn.params['dimension_numbers']
  batch = len(indices.shape) - 1
  row = tuple(operand.shape[1:])
  return (len(operand.shape) >= 1 and indices.shape[-1:] == (1,)
          and tuple(dims.collapsed_slice_dims) == (0,)
          and tuple(dims.start_index_map) == (0,)
          and not tuple(getattr(dims, 'operand_batching_dims', ()))
          and tuple(eqn.params['slice_sizes']) == (1,) + row
          and tuple(dims.offset_dims) == tuple(range(batch, batch + len(row))))


def _uses(jaxpr: Any) -> Dict[Any, List[Tuple[Any, int]]]:
  """Every variable's uses, ``(eqn, operand index)``; ``(None, -1)`` for an
  output of the jaxpr."""
  uses = collections.defaultdict(list)
  for eqn in jaxpr.eqns:
    for j, v in enumerate(eqn.invars):
      if not isinstance(v, jex.core.Literal):
        uses[v].append((eqn, j))
  for v in jaxpr.outvars:
    if not isinstance(v, jex.core.Literal):
      uses[v].append((None, -1))
  return uses


def _lookups(jaxpr: Any, var: Any, inline: set, uses_of: dict) -> list:
  """The gathers that read ``var`` by rows, or [] if anything else uses it.

  Casts to a float dtype are followed, and so are nested ``jax.jit`` calls
  (``jnp.take`` is one): their equations' ids go into ``inline``, for
  :func:`_eval` to run their bodies itself. ``uses_of`` caches
  :func:`_uses` per jaxpr.
  """
  if id(jaxpr) not in uses_of:
    uses_of[id(jaxpr)] = _uses(jaxpr)
  uses = uses_of[id(jaxpr)]
  found, calls, stack = [], [], [var]
  while stack:
    for eqn, j in uses.get(stack.pop(), ()):
      if eqn is None:
        return []
      name = eqn.primitive.name
      if (name == 'convert_element_type' and jnp.issubdtype(
          eqn.params['new_dtype'], jnp.floating)):
        stack.append(eqn.outvars[0])
      elif name == 'gather' and j == 0 and _is_row_lookup(eqn):
        found.append(eqn)
      elif jaxpr_calls.kind(eqn) in ('jit', 'call'):
        sub = jaxpr_calls.sub_jaxpr(eqn)
        if sub is None or len(sub.invars) != len(eqn.invars):
          return []
        inner = _lookups(sub, sub.invars[j], inline, uses_of)
        if not inner:
          return []
        found += inner
        calls.append(id(eqn))
      else:
        return []
  inline.update(calls)
  return found


def _row_ids(indices: jax.Array, eqn: Any) -> jax.Array:
  """The row each lookup of ``eqn`` read (clamped where the gather clamps;
  ids out of range are left so, and add nothing)."""
  ids = indices[..., 0].astype(jnp.int32)
  if eqn.params['mode'] == jax.lax.GatherScatterMode.CLIP:
    ids = jnp.clip(ids, 0, eqn.invars[0].aval.shape[0] - 1)
  return ids


def _eval(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any],
          slots: Dict[int, int], inline: set, deltas: Sequence[Any],
          ids: List[Any]) -> list:
  """Evaluates ``jaxpr``, adding ``deltas[k]`` to the output of the lookup
  in slot ``k`` (``slots``: ``id(eqn) -> k``) and recording its row ids;
  the calls in ``inline`` (ids of equations) are evaluated the same way."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jex.core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if id(eqn) in inline:
      sub = eqn.params.get('jaxpr', eqn.params.get('call_jaxpr'))
      env.update(zip(eqn.outvars, _eval(sub.jaxpr, sub.consts, invals, slots,
                                        inline, deltas, ids)))
      continue
    params = eqn.primitive.get_bind_params(dict(eqn.params))
    with eqn.ctx.manager:
      out = eqn.primitive.bind(*invals, **params)
    outs = out if eqn.primitive.multiple_results else [out]
    k = slots.get(id(eqn))
    if k is not None:
      outs = [outs[0] + deltas[k]]
      ids[k] = _row_ids(invals[1], eqn)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def value_and_grad(fun: Callable[..., Any], leaves: Sequence[Any],
                   *args: Any) -> Optional[Tuple[Any, List[Any]]]:
  """``((loss, aux), grads)`` of ``fun(leaves, *args) -> (loss, aux)``.

  The gradient is taken with respect to ``leaves`` (a list of arrays); a
  leaf read only by row lookups gets a :class:`RowSparse` (its ``ids`` and
  ``rows`` flattened over all its lookups, ``[n]`` and ``[n, *row_shape]``,
  the rows in the leaf's dtype) instead of a dense array. None when no
  leaf is such a table (the caller then differentiates as usual).
  """
  closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(
      list(leaves), *args)
  jaxpr = closed.jaxpr
  tables, inline, uses_of = {}, set(), {}
  for i, (var, leaf) in enumerate(zip(jaxpr.invars, leaves)):
    if (jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
        and jnp.ndim(leaf) >= 1):
      found = _lookups(jaxpr, var, inline, uses_of)
      if found:
        tables[i] = found
  if not tables:
    return None
  order = [(i, eqn) for i in sorted(tables) for eqn in tables[i]]
  slots = {id(eqn): k for k, (_, eqn) in enumerate(order)}
  zeros = [jnp.zeros(eqn.outvars[0].aval.shape, eqn.outvars[0].aval.dtype)
           for _, eqn in order]
  others = [i for i in range(len(leaves)) if i not in tables]
  rest = jax.tree_util.tree_leaves(args)
  out_tree = jax.tree_util.tree_structure(out_shape)

  def rewritten(other_leaves, deltas, table_leaves):
    full = list(leaves)
    for i, x in zip(others, other_leaves):
      full[i] = x
    for i, x in zip(tables, table_leaves):
      full[i] = x
    ids = [None] * len(order)
    outs = _eval(jaxpr, closed.consts, full + rest, slots, inline, deltas,
                 ids)
    loss, aux = jax.tree_util.tree_unflatten(out_tree, outs)
    return loss, (aux, ids)

  (loss, (aux, ids)), (other_grads, row_grads) = jax.value_and_grad(
      rewritten, argnums=(0, 1), has_aux=True)(
          [leaves[i] for i in others], zeros, [leaves[i] for i in tables])
  grads = list(leaves)
  for i, g in zip(others, other_grads):
    grads[i] = g
  for i in tables:
    ks = [k for k, (owner, _) in enumerate(order) if owner == i]
    shape = tuple(jnp.shape(leaves[i]))
    dtype = jnp.result_type(leaves[i])
    grads[i] = row_sparse.RowSparse(
        jnp.concatenate([ids[k].reshape(-1) for k in ks]),
        jnp.concatenate([row_grads[k].reshape((-1,) + shape[1:]).astype(dtype)
                         for k in ks]), shape[0])
  return (loss, aux), grads
