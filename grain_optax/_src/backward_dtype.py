r"""Which parameter leaves have a gradient exact in a narrower dtype.

A model that keeps float32 parameters and computes in bfloat16 casts each
weight once, ``w16 = convert(w32)``, and uses only the copy. By the chain rule
the gradient of the float32 leaf is then the cast of the copy's gradient,
:math:`\nabla_{w_{32}} L = \operatorname{convert}(\nabla_{w_{16}} L)`: the
float32 gradient holds no more information than the bfloat16 one the backward
pass produced. Per-group gradients taken with respect to the bfloat16 copy are
the same numbers in half the bytes, which halves what :func:`grain` writes,
reads and moves between devices.

:func:`narrow_dtypes` reads the rule off the loss's jaxpr. A leaf qualifies
when it is a floating array whose one and only use is a
``convert_element_type`` to a narrower floating dtype, looking through calls
that pass it on unchanged (``jax.jit``, ``jax.checkpoint``, ``closed_call``)
and into ``lax.scan`` when it is scanned over (``xs``: each step uses its own
slice, so no cotangents are summed in low precision). Any other use (two
casts, an arithmetic op on the float32 value, a custom derivative, an output)
keeps the leaf's own dtype: there the float32 gradient sums or transforms
cotangents in float32, and narrowing would round it. The callers trace the
loss with its auxiliary output too, so a parameter returned in ``aux`` keeps
its dtype and value.

Lossless by construction: the loss never runs on the narrowed leaves
themselves. It runs on the narrowed leaf cast back to its own dtype
(:func:`widened`), whose one use, the cast to the narrower dtype, then gives
bit for bit the value it gave on the original leaf; every other part of the
program (dtype reads, branches, outputs) is the one traced on the original
leaves. Only the variable of differentiation changes, to the narrow copy.
"""

import warnings
from typing import Any, Callable, List, Optional

import jax
import jax.numpy as jnp

from grain_optax._src import jaxpr_calls

GRAD_DTYPES = ('backward', 'params')


def check_grad_dtype(value: Any, caller: str) -> str:
  """``value`` if it is one of :data:`GRAD_DTYPES`; else a ValueError."""
  if value not in GRAD_DTYPES:
    raise ValueError(f'{caller}: grad_dtype={value!r}; expected one of '
                     f'{GRAD_DTYPES}.')
  return value


def _uses(jaxpr, var) -> List[Any]:
  """``(eqn, operand index)`` of every use of ``var``; None for an output."""
  found = [(eqn, j) for eqn in jaxpr.eqns
           for j, v in enumerate(eqn.invars) if v is var]
  found += [(None, None) for v in jaxpr.outvars if v is var]
  return found


def _narrow_dtype(jaxpr, var) -> Optional[jnp.dtype]:
  """The dtype ``var`` is cast to by its only use, or None (see module)."""
  dtype = jnp.dtype(var.aval.dtype)
  uses = _uses(jaxpr, var)
  if len(uses) != 1 or uses[0][0] is None:
    return None
  eqn, j = uses[0]
  name = eqn.primitive.name
  if name == 'convert_element_type':
    new = jnp.dtype(eqn.params['new_dtype'])
    if (jnp.issubdtype(new, jnp.floating) and new.itemsize < dtype.itemsize):
      return new
    return None
  kind = jaxpr_calls.kind(eqn)
  if name in jaxpr_calls.PASS_THROUGH:
    sub = jaxpr_calls.sub_jaxpr(eqn)
    if sub is not None and len(sub.invars) == len(eqn.invars):
      return _narrow_dtype(sub, sub.invars[j])
    return None
  if kind == 'scan':
    sub = jaxpr_calls.sub_jaxpr(eqn)
    if sub is not None and len(sub.invars) == len(eqn.invars):
      inner = sub.invars[j]
      # Scanned over (xs) exactly when each step sees a slice: the body's
      # operand lacks the leading length axis (consts and carries do not).
      if tuple(var.aval.shape) == (eqn.params['length'],) + tuple(
          inner.aval.shape):
        return _narrow_dtype(sub, inner)
  return None


def narrow_dtypes(fn: Callable[..., Any], leaves: List[Any]
                  ) -> List[Optional[jnp.dtype]]:
  """Per leaf, the narrower dtype its gradient is exact in, or None.

  Args:
    fn: a function of the list ``leaves`` returning the loss(es); traced
      once more (nothing is computed) to read its jaxpr.
    leaves: the differentiated leaves (arrays or tracers).

  Returns:
    For each leaf, the dtype of its single cast (e.g. bfloat16 for a float32
    weight used only as ``w.astype(jnp.bfloat16)``), or None to keep its own.
  """
  floating = [jnp.issubdtype(jnp.result_type(x), jnp.floating)
              for x in leaves]
  if not any(floating):
    return [None] * len(leaves)
  closed = jax.make_jaxpr(fn)(list(leaves))
  jaxpr = closed.jaxpr
  return [_narrow_dtype(jaxpr, var) if f else None
          for var, f in zip(jaxpr.invars, floating)]


def narrowed(fn: Callable[..., Any], leaves: List[Any]
             ) -> Optional[List[Any]]:
  """``leaves`` with each one :func:`narrow_dtypes` allows cast, or None.

  None when no leaf narrows, so that callers keep their inputs untouched.
  Differentiate with respect to the narrowed leaves, but run the loss on
  them cast back by :func:`widened`: a narrowed leaf cast back to
  its own dtype and then by the loss's one cast gives the very value the loss
  saw before (a narrower float widened and narrowed again is unchanged), so
  the loss computes exactly what it computes on the original leaves, with
  the same dtypes wherever it reads them (``x.astype(w.dtype)``,
  ``jnp.finfo(w.dtype)``), while the gradient comes in the narrower dtype.
  """
  try:
    dtypes = narrow_dtypes(fn, leaves)
  except Exception as e:  # pylint: disable=broad-except
    # The analysis reads JAX internals (jaxpr equations, primitive params)
    # that a JAX release may change; an error of the loss itself is raised
    # again by the call that follows. Keep every dtype.
    warnings.warn(
        "grain_optax: grad_dtype='backward' could not analyse the loss "
        f"({type(e).__name__}: {e}); every gradient keeps its parameter's "
        "dtype. Pass grad_dtype='params' to skip the analysis.",
        RuntimeWarning, stacklevel=3)
    return None
  if not any(dtypes):
    return None
  return [x if d is None else jnp.asarray(x).astype(d)
          for x, d in zip(leaves, dtypes)]


def widened(leaves: List[Any], dtypes: List[Any]) -> List[Any]:
  """Each leaf cast to ``dtypes[i]`` where it differs (the original dtype).

  XLA folds the pair ``narrow(widen(x))`` into ``x``, so the widening costs
  nothing in the compiled step.
  """
  return [x if jnp.dtype(jnp.result_type(x)) == jnp.dtype(d)
          else jnp.asarray(x).astype(d) for x, d in zip(leaves, dtypes)]
