"""The input checks shared by the package, with errors that name what is wrong.

Public functions call these once, at construction or when traced, and then
call unchecked internals. Errors name the caller, the option or the leaf (by
its pytree path) and, where there is one, what to write instead.

The generic checks live here (leaf names, group counts, integers, masks,
dtypes). A check of one feature's option lives in that feature's module:
the solver's in :mod:`solvers`, :func:`accumulate`'s in :mod:`accumulate`,
``batch_argnums`` in :mod:`grouping`, ``grad_dtype`` in
:mod:`backward_dtype`. Those of :func:`grain` alone (its ``mask``, the
per-group updates against the params, the optax wrappers it cannot go
inside) are still here, not yet in :mod:`transform`.
"""

import operator
import sys
from typing import Any, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


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


def check_floating(updates: Any, flags: Optional[Sequence[bool]],
                   caller: str) -> None:
  """Checks that the per-group updates GRAIN combines are floating arrays.

  Args:
    updates: the per-group updates.
    flags: one bool per leaf, False for the leaves ``grain(mask=...)`` leaves
      out (not checked); None for all leaves.
    caller: the public function, for the message.

  Raises:
    ValueError: for an integer, bool or ``float0`` leaf (``jax.grad`` with
      ``allow_int=True`` gives ``float0`` gradients for integer params),
      naming the leaf and saying to leave it out with ``grain(mask=...)``.
  """
  leaves = jax.tree_util.tree_flatten_with_path(updates)[0]
  for i, (path, leaf) in enumerate(leaves):
    if flags is not None and not flags[i]:
      continue
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      name = 'float0' if dtype == jax.dtypes.float0 else dtype.name
      raise ValueError(
          f'{caller}: leaf {leaf_name(path)} of the per-group updates has '
          f'dtype {name} (shape {tuple(np.shape(leaf))}); GRAIN combines '
          'floating gradients only (an integer parameter, such as a step '
          'counter, has no gradient; jax.grad(allow_int=True) gives it '
          'float0). Leave it out with grain(mask=...), False for this leaf '
          '(e.g. mask=lambda p: jax.tree.map(lambda x: '
          'jnp.issubdtype(x.dtype, jnp.floating), p)); it then gets a zero '
          'update.')


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
  return isinstance(x, optax.MaskedNode)


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
    (('optax', 'contrib', '_sam.py'),
     ('transparent_update_fn', 'opaque_update_fn'),
     'optax.contrib.sam',
     'it hands the same updates to its optimizer and to its adversarial '
     'optimizer and adds their outputs to the params, so the per-group '
     'updates (in whichever of the two has no grain()) put a group axis '
     'into the params',
     'optax.chain(grain_optax.grain(), optax.contrib.sam(optimizer, '
     'adv_optimizer)), which hands both optimizers the GRAIN update'),
    (('optax', 'contrib', '_mechanic.py'), ('update_fn',),
     'optax.contrib.mechanize',
     'it also takes its input, the per-group updates, as the gradient in its '
     'own inner products with the params-shaped updates',
     'optax.chain(grain_optax.grain(), optax.contrib.mechanize(inner))'),
    (('optax', 'transforms', '_layouts.py'), ('update_fn',),
     'optax.flatten',
     'it concatenates the leaves of its input into one vector, so the '
     'per-group updates lose their group axis before grain() sees them',
     'optax.chain(grain_optax.grain(), optax.flatten(inner))'),
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


def check_num_groups(num_groups: Any) -> int:
  """``num_groups`` as a Python int >= 1 (NumPy integers accepted)."""
  return positive_int(num_groups, 'num_groups', 'grain_optax')


def leaf_flags(mask: Any, updates: Any, params: Any,
               caller: str) -> List[bool]:
  """The ``mask`` option of :func:`grain` as one static bool per leaf."""
  if callable(mask):
    if params is None:
      raise ValueError(
          f'{caller}: mask is a function of the params, so update needs them: '
          'tx.update(updates, state, params).')
    mask = mask(params)
  try:
    full = jax.tree_util.tree_map(
        lambda flag, sub: jax.tree_util.tree_map(lambda _: flag, sub),
        mask, updates)
  except ValueError as e:
    raise ValueError(
        f'{caller}: mask must have the tree structure of the params (or be a '
        f'prefix of it), with a bool per leaf or subtree. {e}') from None
  flags = []
  for path, entry in jax.tree_util.tree_flatten_with_path(full)[0]:
    flag = None
    if isinstance(entry, (bool, np.bool_)) or (
        np.shape(entry) == () and getattr(entry, 'dtype', None) == np.bool_):
      try:
        flag = bool(entry)
      except jax.errors.ConcretizationTypeError:
        pass
    if flag is None:
      raise ValueError(
          f'{caller}: mask entry for leaf {leaf_name(path)} is '
          f'{entry!r}; the mask must hold Python bools (it decides shapes at '
          'trace time). With optax.inject_hyperparams, pass '
          "static_args=('mask',).")
    flags.append(flag)
  if not any(flags):
    raise ValueError(f'{caller}: mask is False for every leaf; nothing to '
                     'train.')
  return flags


def float_dtype(dtype: Any, name: str, caller: str, *,
                hint: str = '') -> Any:
  """None, or ``dtype`` as a NumPy floating dtype; else a ValueError."""
  if dtype is None:
    return None
  try:
    out = jnp.dtype(dtype)
  except TypeError:
    out = None
  if out is None or not jnp.issubdtype(out, jnp.floating):
    shown = repr(dtype) if out is None else out.name
    raise ValueError(f'{caller}: {name}={shown} is not a floating dtype; '
                     f'expected e.g. jnp.bfloat16, jnp.float32 or None{hint}.')
  return out


def communication_dtype(dtype: Any, caller: str) -> Any:
  """``communication_dtype``: None, or a float of float32's exponent range.

  The group blocks and the update move unscaled, so a dtype of narrower
  range (float16 up to 65504, the float8 types up to 448 or 57344) turns
  large gradient entries into inf or NaN, and every group into a
  non-finite one.

  Raises:
    ValueError: for a non-floating dtype, or one of narrower exponent range
      or precision than bfloat16 (float16, the float8 and float4 types).
  """
  out = float_dtype(dtype, 'communication_dtype', caller)
  if out is None:
    return None
  info, bf16 = jnp.finfo(out), jnp.finfo(jnp.bfloat16)
  if info.maxexp < bf16.maxexp:
    why = (f'its largest finite value is {float(info.max):.6g}, so a '
           'gradient entry above that becomes non-finite in transit, its '
           'group is left out as non-finite and, once every group is, the '
           'update is all NaN')
  elif info.nmant < bf16.nmant:
    why = (f'it keeps {info.nmant} mantissa bits, fewer than bfloat16\'s '
           f'{bf16.nmant}, and the blocks and the update would be rounded '
           'to them')
  else:
    return out
  raise ValueError(
      f'{caller}: communication_dtype={out.name} is refused: the group blocks '
      f'and the update move in it unscaled, and {why}. Use jnp.bfloat16 '
      '(the exponent range of float32 at half the bytes), jnp.float32, or '
      'None (each leaf in its own dtype).')
