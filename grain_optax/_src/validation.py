"""Trace-time checks of per-group trees, with errors that name the leaf."""

import operator
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np


def leaf_name(path) -> str:
  """A readable name for a pytree path, e.g. ``['dense']['kernel']``."""
  name = jax.tree_util.keystr(path)
  return name if name else '<root>'


def group_count(tree: Any, *, what: str = 'per-group updates') -> int:
  """Returns the shared size of axis 0 of every leaf of ``tree``.

  Raises:
    ValueError: if the tree has no leaves, a leaf is a scalar, or two leaves
      disagree on the size of axis 0. The message names the leaves.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not leaves:
    raise ValueError(f'grain_optax: the {what} tree has no array leaves.')
  first_path, first = leaves[0]
  for path, leaf in leaves:
    shape = getattr(leaf, 'shape', None)
    if shape is None or len(shape) == 0:
      raise ValueError(
          f'grain_optax: leaf {leaf_name(path)} of the {what} has shape '
          f'{shape}; every leaf needs a leading group axis [m, *param_shape].')
    dtype = getattr(leaf, 'dtype', None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating):
      raise ValueError(
          f'grain_optax: leaf {leaf_name(path)} of the {what} has complex '
          f'dtype {dtype} (shape {tuple(shape)}); GRAIN needs real gradients '
          '(a complex Gram matrix is not an inner product of real vectors). '
          'Store the real and imaginary parts as separate real leaves.')
  m = first.shape[0]
  for path, leaf in leaves:
    if leaf.shape[0] != m:
      raise ValueError(
          f'grain_optax: leaf {leaf_name(path)} of the {what} has '
          f'{leaf.shape[0]} groups on axis 0 (shape {tuple(leaf.shape)}), but '
          f'leaf {leaf_name(first_path)} has {m} (shape {tuple(first.shape)}); '
          'every leaf must have the same number of groups.')
  return int(m)


def check_matches_params(per_group: Any, params: Any) -> None:
  """Checks that ``per_group`` is ``params`` with a leading group axis."""
  p_struct = jax.tree_util.tree_structure(params)
  g_struct = jax.tree_util.tree_structure(per_group)
  if p_struct != g_struct:
    raise ValueError(
        'grain_optax: the per-group updates and the params have different '
        f'tree structures:\n  updates: {g_struct}\n  params:  {p_struct}')
  g_leaves = jax.tree_util.tree_flatten_with_path(per_group)[0]
  p_leaves = jax.tree_util.tree_leaves(params)
  for (path, g), p in zip(g_leaves, p_leaves):
    p_shape = tuple(np.shape(p))  # Python scalars are params too.
    if tuple(g.shape[1:]) != p_shape:
      hint = ''
      if tuple(g.shape) == p_shape:
        hint = (' The update has the shape of the param itself: was an '
                'ordinary gradient (no group axis) passed, or did a '
                'transformation before grain() in the chain combine the '
                'groups? Per-group gradients come from '
                'grain_optax.group_value_and_grad.')
      raise ValueError(
          f'grain_optax: leaf {leaf_name(path)} of the per-group updates has '
          f'shape {tuple(g.shape)}, so its per-group shape is '
          f'{tuple(g.shape[1:])}, but the matching param has shape '
          f'{p_shape}; expected shape {(g.shape[0],) + p_shape}.{hint}')


def positive_int(value: Any, name: str, caller: str, *,
                 hint: str = '', phrase: str = 'an int >= 1') -> int:
  """``value`` as a Python int >= 1; integer-likes accepted, bools rejected.

  Python ints and NumPy integer scalars (anything ``operator.index`` takes)
  are accepted; bools, floats and JAX arrays (traced or not: a shape cannot
  depend on them) are not.

  Raises:
    ValueError: naming ``caller`` and ``name``; ``hint`` is appended.
  """
  ok = not isinstance(value, (bool, np.bool_, jax.Array))
  if ok:
    try:
      value = operator.index(value)
    except TypeError:
      ok = False
  if not ok or value < 1:
    raise ValueError(
        f'{caller}: {name} must be {phrase}, got {value!r}{hint}.')
  return int(value)


def is_int_like(value: Any) -> bool:
  """A Python or NumPy integer scalar, not a bool and not a JAX array."""
  return (isinstance(value, (int, np.integer))
          and not isinstance(value, (bool, np.bool_)))


def group_mask(mask: Any, num_groups: int, caller: str) -> Optional[jax.Array]:
  """Checks an ``[m]`` per-group mask; returns it as a bool array (or None).

  Raises:
    ValueError: if ``mask`` is not of shape ``[num_groups]``.
  """
  if mask is None:
    return None
  shape = tuple(np.shape(mask))
  if shape != (num_groups,):
    raise ValueError(
        f'{caller}: group_mask has shape {shape}, but there are {num_groups} '
        f'groups; expected shape ({num_groups},), True for the groups that '
        'take part.')
  mask = jnp.asarray(mask)
  if not (jnp.issubdtype(mask.dtype, jnp.bool_)
          or jnp.issubdtype(mask.dtype, jnp.number)):
    raise ValueError(f'{caller}: group_mask has dtype {mask.dtype}; expected '
                     'bool (or numbers, nonzero meaning True).')
  return mask if mask.dtype == jnp.bool_ else mask != 0


def _is_masked_node(x) -> bool:
  return type(x).__name__ == 'MaskedNode'


def check_not_masked(updates: Any, caller: str) -> None:
  """Fails clearly if ``updates`` come through ``optax.masked``.

  ``optax.masked`` (and ``optax.multi_transform``, built on it) hands its
  inner transformation a tree with ``MaskedNode`` in place of the masked-out
  leaves, then passes those leaves on unchanged: with per-group updates they
  would keep their group axis and reach the params.
  """
  for node in jax.tree_util.tree_leaves(updates, is_leaf=_is_masked_node):
    if _is_masked_node(node):
      raise ValueError(
          f'{caller}: grain() is inside optax.masked or optax.multi_transform, '
          'which pass the masked-out leaves on untouched, still per-group. '
          'To run GRAIN on a subset of the parameters, give the mask to '
          'grain itself and put grain first: optax.chain('
          'grain_optax.grain(mask=mask), optax.masked(inner, mask)) (or '
          'optax.chain(grain_optax.grain(mask=mask), '
          'optax.multi_transform(...))). Leaves where the mask is False are '
          'left out of the Gram matrix and get a zero update.')


# Optax wrappers that cannot hold grain(): the frames to look for, the
# wrapper's name, why, and what to write instead.
_CONDITIONAL_WRAPPERS = (
    (('optax', 'transforms', '_conditionality.py'), ('do_update',),
     'optax.apply_if_finite, optax.conditionally_transform or '
     'optax.conditionally_mask',
     'on a skipped step it returns the per-group updates (or zeros of their '
     'shape), on the other the params-shaped output of grain(), and '
     'jax.lax.cond needs both branches to agree on shapes',
     'optax.chain(grain_optax.grain(), optax.apply_if_finite(inner, '
     'max_consecutive_errors)): a step on which every group is non-finite '
     'gives a NaN update, which apply_if_finite sees and skips'),
    (('optax', 'transforms', '_accumulation.py'),
     ('_do_update', '_skip_update'),
     'optax.MultiSteps',
     'it sums its input into a params-shaped accumulator, so the per-group '
     'updates that grain() needs lose their group axis',
     'optax.chain(grain_optax.grain(), grain_optax.accumulate(inner, '
     'every_k=k)) for GRAIN across the k mini-batches too, or '
     'optax.chain(grain_optax.grain(), optax.MultiSteps(inner, k)) to average '
     'the GRAIN updates'),
)


def check_not_in_conditional(caller: str, *, max_depth: int = 40) -> None:
  """Fails clearly if ``update`` is traced inside a known optax wrapper.

  Walks the Python call stack (at trace time only) for the frames of the
  wrappers in ``_CONDITIONAL_WRAPPERS``; this only turns an opaque error
  later on into a clear one now.
  """
  frame = sys._getframe(1)  # pylint: disable=protected-access
  depth = 0
  while frame is not None and depth < max_depth:
    code = frame.f_code
    parts = code.co_filename.replace('\\', '/').split('/')
    for suffix, names, wrapper, why, instead in _CONDITIONAL_WRAPPERS:
      if tuple(parts[-len(suffix):]) == suffix and code.co_name in names:
        raise ValueError(
            f'{caller}: grain() cannot go inside {wrapper}: {why}. Put '
            f'grain() first instead: {instead}.')
    frame = frame.f_back
    depth += 1
