"""Trace-time checks of per-group trees, with errors that name the leaf."""

from typing import Any

import jax


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
    if tuple(g.shape[1:]) != tuple(p.shape):
      raise ValueError(
          f'grain_optax: leaf {leaf_name(path)} of the per-group updates has '
          f'shape {tuple(g.shape)}, so its per-group shape is '
          f'{tuple(g.shape[1:])}, but the matching param has shape '
          f'{tuple(p.shape)}; expected shape {(g.shape[0],) + tuple(p.shape)}.')
