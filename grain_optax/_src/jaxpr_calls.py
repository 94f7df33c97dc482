"""The call primitives the jaxpr tools look into, in one table.

:mod:`reductions` (which rewrites per-group sums) and :mod:`backward_dtype`
(which reads which parameters are only cast) both walk a function's jaxpr
and follow some equations into the sub-jaxpr they run. Both read the kinds
of call here, so that they stay in step when a JAX release renames or adds
a call primitive:

* ``'jit'``: a nested ``jax.jit`` (params ``jaxpr``, a ClosedJaxpr, and its
  shardings);
* ``'remat'``: ``jax.checkpoint`` (param ``jaxpr``, an open Jaxpr);
* ``'call'``: other calls that run their sub-jaxpr on their operands
  unchanged (param ``call_jaxpr``);
* ``'scan'``: ``lax.scan`` (param ``jaxpr``, a ClosedJaxpr).
"""

from typing import Any, Optional

try:
  from jax._src.named_sharding import UnspecifiedValue  # pylint: disable=g-import-not-at-top
except ImportError:  # Where an older or newer JAX keeps it.
  try:
    from jax._src.sharding_impls import UnspecifiedValue  # pylint: disable=g-import-not-at-top
  except ImportError:
    UnspecifiedValue = None

# Primitive names by kind (JAX has spelled some of them differently over
# releases: 'pjit' before 'jit', 'checkpoint' and 'remat' before 'remat2').
KINDS = {
    'jit': frozenset({'jit', 'pjit'}),
    'remat': frozenset({'checkpoint', 'remat', 'remat2'}),
    'call': frozenset({'closed_call', 'core_call'}),
    'scan': frozenset({'scan'}),
}
# Calls that pass their operands to the sub-jaxpr one to one, unchanged.
PASS_THROUGH = KINDS['jit'] | KINDS['remat'] | KINDS['call']


def kind(eqn: Any) -> Optional[str]:
  """``'jit'``, ``'remat'``, ``'call'`` or ``'scan'`` for ``eqn``, or None."""
  name = eqn.primitive.name
  for k, names in KINDS.items():
    if name in names:
      return k
  return None


def sub_jaxpr(eqn: Any) -> Any:
  """The open sub-jaxpr a call or scan equation runs, or None."""
  sub = eqn.params.get('jaxpr', eqn.params.get('call_jaxpr'))
  return getattr(sub, 'jaxpr', sub)


def is_unspecified(sharding: Any) -> bool:
  """Whether a nested jit's in or out sharding was left unspecified."""
  if UnspecifiedValue is not None:
    return isinstance(sharding, UnspecifiedValue)
  return type(sharding).__name__ == 'UnspecifiedValue'
