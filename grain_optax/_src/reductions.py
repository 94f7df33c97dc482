"""Per-group sums over examples as two reductions (faster on a GPU).

Under ``vmap`` over groups, the gradient of a bias (and of a LayerNorm
scale or bias) is a sum of ``[m, n, ..., d]`` over the examples and tokens of
each group, keeping the group axis and the features. XLA's GPU code for such
a batched column reduction runs at a fraction of the memory bandwidth, well
below the same sum over the whole batch; how much of GRAIN's step time it
took on the GPT of ``benchmarks/_gpt.py`` is in ``benchmarks/RESULTS.md``,
section 1e.

:func:`split_leading_sums` rewrites a function's jaxpr so that each such sum
runs in two stages: ``PARTS`` partial sums in float32 (fused by XLA with the
element-wise work that produces their input, as before), an optimization
barrier, then the sum of the partials. The result is the same sum, with
float32 accumulation in place of whatever the reduction's own dtype gave.
Sums in the body of a ``lax.scan`` (layers scanned over) or a
``jax.checkpoint`` are rewritten too, where the body's types stay the same.
"""

import math
import warnings
from typing import Any, Callable, Sequence, Union

import jax
from jax import lax
import jax.extend as jex
import jax.numpy as jnp

from grain_optax._src import jaxpr_calls

# The reduced size is split into PARTS x (size / PARTS). Sums shorter than
# PARTS * MIN_PART, or keeping fewer than MIN_KEPT values, are left alone.
PARTS = 16
MIN_PART = 64
MIN_KEPT = 64


def _leading_sum(eqn) -> int:
  """How many leading axes ``eqn`` sums, if it is a sum to split, else 0."""
  if eqn.primitive is not lax.reduce_sum_p:
    return 0
  if eqn.params.get('out_sharding') is not None:
    return 0
  aval = eqn.invars[0].aval
  if not jnp.issubdtype(aval.dtype, jnp.floating):
    return 0
  axes = tuple(sorted(eqn.params['axes']))
  lead = len(axes)
  if axes != tuple(range(lead)) or lead >= len(aval.shape):
    return 0
  # An axis sharded in the array's type (Explicit mesh axes) is left alone:
  # reshaping it would need an output sharding.
  spec = getattr(getattr(aval, 'sharding', None), 'spec', None)
  if spec is not None and any(s is not None for s in tuple(spec)[:lead]):
    return 0
  reduced = math.prod(aval.shape[:lead])
  kept = math.prod(aval.shape[lead:])
  if reduced % PARTS or reduced // PARTS < MIN_PART or kept < MIN_KEPT:
    return 0
  return lead


def _two_stage_sum(x, lead: int):
  """``x`` summed over its ``lead`` leading axes, in two stages."""
  acc = jnp.promote_types(x.dtype, jnp.float32)
  reduced = math.prod(x.shape[:lead])
  parts = x.reshape((PARTS, reduced // PARTS) + x.shape[lead:])
  partial = lax.optimization_barrier(jnp.sum(parts.astype(acc), axis=1))
  return jnp.sum(partial, axis=0).astype(x.dtype)


def _inlinable(eqn) -> bool:
  """A nested jit with no shardings, which can run inline."""
  if jaxpr_calls.kind(eqn) != 'jit':
    return False
  closed = eqn.params.get('jaxpr')
  if not isinstance(closed, jex.core.ClosedJaxpr):
    return False
  shardings = (tuple(eqn.params.get('in_shardings', ()))
               + tuple(eqn.params.get('out_shardings', ())))
  return all(jaxpr_calls.is_unspecified(s) for s in shardings)


def _has_split(jaxpr) -> bool:
  """Whether ``_eval`` would split a sum of ``jaxpr`` (or of a body in it)."""
  for eqn in jaxpr.eqns:
    if _leading_sum(eqn):
      return True
    sub = _body(eqn)
    if sub is not None and _has_split(sub[0]):
      return True
  return False


def _body(eqn):
  """``(jaxpr, consts)`` of a body ``_eval`` rewrites, or None.

  Nested ``jax.jit`` (inlined), ``lax.scan`` and ``jax.checkpoint`` bodies.
  """
  kind = jaxpr_calls.kind(eqn)
  if _inlinable(eqn) or kind == 'scan':
    closed = eqn.params['jaxpr']
    return closed.jaxpr, closed.consts
  if kind == 'remat' and not eqn.params['jaxpr'].constvars:
    return eqn.params['jaxpr'], ()
  return None


def _rewritten_body(jaxpr, consts):
  """``jaxpr`` with its sums split, as a ClosedJaxpr of the same type.

  None where its types would change (then the body is bound unchanged).
  """
  avals = [v.aval for v in jaxpr.invars]
  if not all(hasattr(a, 'shape') and hasattr(a, 'dtype') for a in avals):
    return None
  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype,
                                weak_type=getattr(a, 'weak_type', False))
           for a in avals]
  new = jax.make_jaxpr(lambda *a: _eval(jaxpr, consts, a))(*specs)
  same = ([v.aval for v in new.jaxpr.invars] == avals and
          [v.aval for v in new.jaxpr.outvars]
          == [v.aval for v in jaxpr.outvars])
  if not same or len(new.consts) != len(consts):
    return None
  return new


def _eval(jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list:
  """Evaluates ``jaxpr`` with the leading sums split (see module doc)."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jex.core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    lead = _leading_sum(eqn)
    if lead:
      outs = [_two_stage_sum(invals[0], lead)]
    elif _inlinable(eqn):
      closed = eqn.params['jaxpr']
      outs = _eval(closed.jaxpr, closed.consts, invals)
    else:
      params = dict(eqn.params)
      body = _body(eqn)
      if body is not None and _has_split(body[0]):
        new = _rewritten_body(*body)
        if new is not None:
          is_remat = jaxpr_calls.kind(eqn) == 'remat'
          params['jaxpr'] = new.jaxpr if is_remat else new
      params = eqn.primitive.get_bind_params(params)
      with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
      outs = out if eqn.primitive.multiple_results else [out]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def use_split_sums(split_sums: Union[bool, str]) -> bool:
  """Whether the ``split_sums`` option rewrites the sums traced now.

  ``'auto'``: where the computation is traced for a GPU
  (``jax.default_backend() == 'gpu'``), the platform whose per-group sums
  the rewrite speeds up; True and False force it on or off.

  Raises:
    ValueError: for any other value.
  """
  if split_sums == 'auto':
    return jax.default_backend() == 'gpu'
  if split_sums is True or split_sums is False:
    return split_sums
  raise ValueError(f"grain_optax: split_sums={split_sums!r}; use 'auto' "
                   '(the default), True or False.')


def split_leading_sums(fun: Callable[..., Any]) -> Callable[..., Any]:
  """``fun`` with its sums over leading axes in two stages.

  A sum (``lax.reduce_sum``) of a float array over its leading axes, of at
  least ``PARTS * MIN_PART`` elements per kept value and keeping at least
  ``MIN_KEPT`` values, at the top level of ``fun``'s jaxpr, inside a nested
  ``jax.jit`` without shardings, or in the body of a ``lax.scan`` or
  ``jax.checkpoint``, becomes ``PARTS`` float32 partial sums, an
  optimization barrier and their sum. Everything else (``custom_vjp``,
  ``cond``, ``while_loop`` and their bodies) is bound unchanged, and so is a
  sum over an axis sharded in its array's type (Explicit mesh axes).

  Args:
    fun: a function of arrays (pytrees) to arrays (pytrees).

  Returns:
    A function with the signature and results of ``fun``. If the rewrite
    raises (a JAX release that changed what it reads), ``fun`` runs as
    traced, with a ``RuntimeWarning`` naming the error.
  """

  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*args)
    try:
      outs = _eval(closed.jaxpr, closed.consts,
                   jax.tree_util.tree_leaves(args))
    except Exception as e:  # pylint: disable=broad-except
      # The rewrite reads JAX internals (jaxpr equations, primitive params)
      # that a JAX release may change: run the function as traced instead.
      warnings.warn(
          'grain_optax: split_sums could not rewrite the per-group sums '
          f'({type(e).__name__}: {e}); running them as traced (same '
          'gradients, slower per-group sums on GPUs). Pass split_sums=False '
          'to skip the rewrite.', RuntimeWarning, stacklevel=2)
      return fun(*args)
    return jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(out_shape), outs)

  return wrapped
