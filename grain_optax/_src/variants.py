r"""What a GRAIN step applies: the ``apply`` option of every entry point.

The min-norm point :math:`d = \sum_i w_i g_i` and the plain mean
:math:`\bar g = \frac1n \sum_{i \in V} g_i` (over the :math:`n` groups
:math:`V` that take part and are finite) are both combinations of the group
gradients, and so are their rescalings. Every variant is therefore a vector
of coefficients :math:`c` handed to the same combination
:math:`\sum_i c_i g_i`; the lengths come from the Gram matrix,
:math:`\|d\|^2 = w^\top K w` and :math:`\|\bar g\|^2 = u^\top K u`. No variant
costs more than the min-norm point itself.

==========================  ==================================================
``apply``                   the update
==========================  ==================================================
``'grain'`` (default)       :math:`d`, the min-norm point
``'mean'``                  :math:`\bar g` (monitor mode: ordinary training,
                            with GRAIN's weights and statistics still logged)
``'mean_at_grain_length'``  :math:`\bar g \,\|d\| / \|\bar g\|`: the mean's
                            direction, shortened to the min-norm point's length
``'grain_at_mean_length'``  :math:`d \,\|\bar g\| / \|d\|`: the min-norm
                            point's direction at the mean's length (zero when
                            :math:`d = 0`)
==========================  ==================================================
"""

from typing import Optional

import jax
import jax.numpy as jnp

from grain_optax._src import solvers

APPLY = ('grain', 'mean', 'mean_at_grain_length', 'grain_at_mean_length')


def check_apply(apply: str, caller: str) -> str:
  """``apply`` if it is one of :data:`APPLY`, else a ValueError."""
  if not isinstance(apply, str) or apply not in APPLY:
    raise ValueError(
        f'{caller}: apply={apply!r} is not one of {", ".join(map(repr, APPLY))}'
        " ('grain': the min-norm point; 'mean': the plain mean, GRAIN only "
        "monitored; 'mean_at_grain_length' / 'grain_at_mean_length': one's "
        "direction at the other's length).")
  return apply


def mean_weights(valid: jax.Array) -> jax.Array:
  """``[m]`` float32: 1/n on the ``n`` valid groups, 0 elsewhere."""
  n = jnp.maximum(jnp.sum(valid), 1)
  return jnp.where(valid, 1.0 / n, 0.0).astype(jnp.float32)


def _square_norm(k, w):
  hi = jax.lax.Precision.HIGHEST
  return jnp.maximum(jnp.dot(w, jnp.dot(k, w, precision=hi), precision=hi),
                     0.0)


def coefficients(apply: str, gram: jax.Array, weights: jax.Array,
                 mask: Optional[jax.Array] = None) -> jax.Array:
  """The ``[m]`` coefficients of the groups in the applied update.

  Args:
    apply: one of :data:`APPLY` (checked by the caller).
    gram: the ``[m, m]`` Gram matrix that was solved.
    weights: the ``[m]`` min-norm weights of that solve.
    mask: the ``[m]`` groups that take part (None: all).

  Returns:
    ``weights`` itself for ``'grain'`` (so the default is bit for bit the
    min-norm point); otherwise float32 coefficients, zero for excluded and
    non-finite groups.
  """
  if apply == 'grain':
    return weights
  k, valid, _ = solvers.normalize_gram(gram, mask)
  u = mean_weights(valid)
  if apply == 'mean':
    return u
  w = jnp.asarray(weights, jnp.float32)
  d_sq, u_sq = _square_norm(k, w), _square_norm(k, u)
  if apply == 'mean_at_grain_length':
    scale = jnp.where(u_sq > 0, jnp.sqrt(d_sq / jnp.where(u_sq > 0, u_sq, 1.)),
                      0.0)
    return u * scale
  scale = jnp.where(d_sq > 0, jnp.sqrt(u_sq / jnp.where(d_sq > 0, d_sq, 1.)),
                    0.0)
  return w * scale
