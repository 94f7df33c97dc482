"""``metrics()``: GRAIN's statistics as a flat dict for any logger."""

from typing import Any, Dict, Union

import jax
import jax.numpy as jnp

from grain_optax._src import lean
from grain_optax._src import state as state_lib

Scalar = Union[bool, int, float, jax.Array]

# name -> (GrainState field, Python type outside jit).
_FIELDS = (
    ('count', 'count', int),
    ('mean_min_cosine', 'mean_min_cosine', float),
    ('update_min_cosine', 'update_min_cosine', float),
    ('min_norm_min_cosine', 'min_cosine', float),
    ('norm_ratio', 'norm_ratio', float),
    ('effective_groups', 'effective_groups', float),
    ('num_nonfinite', 'num_nonfinite', int),
    ('num_excluded', 'num_excluded', int),
    ('solver_iterations', 'num_iterations', int),
    ('kkt_residual', 'kkt_residual', float),
)


def _sources(x: Any) -> Dict[str, Any]:
  if isinstance(x, (state_lib.GrainState, lean.GrainGrad)):
    return {'grain': x}
  return state_lib.grain_statistics(x)


def metrics(x: Any, *, prefix: str = '', sep: str = '/'
            ) -> Dict[str, Scalar]:
  r"""GRAIN's statistics as a flat dict of scalars with stable names.

  Accepts the state of :func:`grain` (:class:`GrainState`), of
  :func:`accumulate`, the result of :func:`grain_value_and_grad`
  (:class:`GrainGrad`), or any optimizer state holding them (an
  ``optax.chain``, ``inject_hyperparams``, a Linen ``TrainState.opt_state``
  or an ``nnx.Optimizer``'s ``opt_state``). Each GRAIN found contributes, under
  its name (``'grain'``, ``'accumulate'``, ``'grain_1'``, ... as in
  :func:`grain_statistics`):

  ==========================  ================================================
  key                         meaning
  ==========================  ================================================
  ``count``                   updates so far (windows closed, for
                              ``accumulate``; 1 for a :class:`GrainGrad`):
                              the other values describe the last one; all
                              are 0 while it is 0
  ``conflict``                the mean's worst group cosine is below 0: the
                              plain mean would raise some group's loss to
                              first order
  ``mean_min_cosine``         worst cosine between the mean and a group
  ``update_min_cosine``       worst cosine between the applied update and a
                              group (see ``apply`` of :func:`grain`)
  ``min_norm_min_cosine``     worst cosine of the min-norm point (never < 0)
  ``norm_ratio``              :math:`\|d\| / \|\bar g\|`: how much shorter the
                              min-norm point is than the mean (1: the same)
  ``effective_groups``        :math:`\exp` of the weights' entropy: m when the
                              weights are uniform, 1 when one group takes all
  ``num_nonfinite``           groups left out for NaN or infinity
  ``num_excluded``            groups left out by ``group_mask`` /
                              ``microbatch_mask``
  ``solver_iterations``       iterations of the QP solver
  ``kkt_residual``            relative KKT residual of the weights
  ==========================  ================================================

  Keys are ``f'{prefix}{name}{sep}{key}'``, e.g. ``'grain/norm_ratio'``. Under
  ``jax.jit`` (any value a tracer) the values are scalar arrays, to return
  from the step (``jax.jit`` returns a dict's keys sorted); outside, Python
  ``bool``, ``int`` and ``float`` (one device-to-host transfer), ready for
  ``json.dumps``, a progress bar or a metrics writer. Steps where no group
  took part or every group was non-finite read 0 in the cosines, ratios and
  ``effective_groups``: leave them out of averages (``num_nonfinite`` and
  ``num_excluded`` say which).

  Args:
    x: a :class:`GrainState`, an :class:`AccumulateState`, a
      :class:`GrainGrad` or an optimizer state holding GRAIN states.
    prefix: prepended to every key (e.g. ``'train/'``).
    sep: between the GRAIN's name and the key.

  Returns:
    A dict from key to scalar, in a fixed order; empty if ``x`` holds no GRAIN
    state.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import grain_optax
    >>> tx = optax.chain(grain_optax.grain(num_groups=2, apply='mean'),
    ...                  optax.sgd(0.1))
    >>> params = {'w': jnp.zeros(2)}
    >>> per_group = {'w': jnp.array([[1., 0.], [-2., 1.]])}
    >>> _, state = tx.update(per_group, tx.init(params), params)
    >>> logs = grain_optax.metrics(state)
    >>> logs['grain/conflict'], round(logs['grain/norm_ratio'], 3)
    (True, 0.447)
  """
  out = {}
  concrete = None
  for name, src in _sources(x).items():
    base = f'{prefix}{name}{sep}'
    # GrainGrad describes one solve (a NamedTuple's .count is a method).
    count = (jnp.ones([], jnp.int32) if isinstance(src, lean.GrainGrad)
             else jnp.asarray(src.count))
    values = {key: jnp.asarray(getattr(src, field))
              for key, field, _ in _FIELDS if key != 'count'}
    row = {'count': count, 'conflict': values['mean_min_cosine'] < 0,
           **values}
    if concrete is None:
      concrete = not any(isinstance(v, jax.core.Tracer)
                         for v in jax.tree_util.tree_leaves(src))
    out.update({base + k: v for k, v in row.items()})
  if concrete:
    types = {key: kind for key, _, kind in _FIELDS}
    types['conflict'] = bool
    host = jax.device_get(out)
    out = {k: types[k.rsplit(sep, 1)[-1]](host[k].item()) for k in out}
  return out
