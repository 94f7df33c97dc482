"""Mesh, axis and sharding-type helpers, read at trace time.

Everything here inspects how values are laid out over devices: the names of
manual (``shard_map``) axes, the types of mesh axes, which manual axes a value
varies over, and ``PartitionSpec`` entries. Nothing here computes GRAIN.
"""

from typing import Any, Optional, Sequence, Tuple, Union

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

AxisName = Union[str, Tuple[str, ...]]
# A PartitionSpec entry per dimension: None, or the tuple of its mesh axes.
SpecEntries = Tuple[Optional[Tuple[Any, ...]], ...]


def axes_tuple(axis_name: Any, what: str = 'axis_name') -> Tuple[Any, ...]:
  """Normalises ``None``, a name or a sequence of names to a tuple.

  Raises:
    ValueError: for an empty sequence, an unhashable name or a repeated axis.
  """
  if axis_name is None:
    return ()
  if isinstance(axis_name, (tuple, list)):
    axes = tuple(axis_name)
    if not axes:
      raise ValueError(f'grain_optax: {what} is an empty sequence; pass None '
                       'or at least one mesh axis name.')
  else:
    axes = (axis_name,)
  for a in axes:
    try:
      hash(a)
    except TypeError:
      raise ValueError(
          f'grain_optax: {what}={axis_name!r} is not a mesh axis name or a '
          'tuple of them.') from None
  if len(set(axes)) != len(axes):
    raise ValueError(f'grain_optax: {what}={axis_name!r} repeats an axis.')
  return axes


def abstract_mesh() -> Optional[jax.sharding.AbstractMesh]:
  """The context mesh (``jax.set_mesh`` or ``shard_map``), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None
  return mesh


def axis_type_names(mesh: Any, axes: Sequence[Any]
                    ) -> Tuple[Optional[str], ...]:
  """'manual', 'explicit', 'auto' or None (not a mesh axis) for each axis."""
  if mesh is None:
    return tuple(None for _ in axes)
  names = tuple(mesh.axis_names)
  types = tuple(mesh.axis_types)
  out = []
  for a in axes:
    if a not in names:
      out.append(None)
      continue
    t = types[names.index(a)]
    out.append('manual' if t == AxisType.Manual else
               'explicit' if t == AxisType.Explicit else 'auto')
  return tuple(out)


def mesh_sizes(mesh: Any) -> dict:
  """``{axis name: size}`` of a concrete or abstract mesh."""
  return dict(mesh.shape)


def axis_size(axes: Sequence[Any]) -> int:
  """The total size of bound manual axes; NameError if one is not bound."""
  return int(jax.lax.axis_size(tuple(axes)))


def is_bound(axes: Sequence[Any]) -> bool:
  """Whether every axis in ``axes`` is a bound (shard_map or pmap) axis."""
  try:
    axis_size(axes)
  except NameError:
    return False
  return True


def varying_axes(x: Any) -> frozenset:
  """The manual axes over which ``x`` varies (empty where none is tracked)."""
  return frozenset(jax.typeof(x).mat.varying)


def vma_tracked(axes: Sequence[Any]) -> bool:
  """Whether shard_map tracks which values vary over the bound ``axes``.

  True inside ``jax.shard_map`` with ``check_vma=True`` (the default), where
  the device index along an axis is typed as varying over it; False under
  ``pmap``, ``vmap`` or ``check_vma=False``.
  """
  return bool(varying_axes(jax.lax.axis_index(tuple(axes))))


def all_gather_invariant(x: jax.Array, axes: Sequence[Any]) -> jax.Array:
  """Tiled all-gather on axis 0 whose result is typed as replicated."""
  if not vma_tracked(axes):  # pmap, vmap, check_vma=False: nothing to type.
    return jax.lax.all_gather(x, axes, axis=0, tiled=True)
  return jax.lax.all_gather(x, axes, axis=0, tiled=True, to='invarying')


def explicit_replicated(leaf: jax.Array) -> Optional[NamedSharding]:
  """A replicated out_sharding if ``leaf`` is sharded over Explicit axes."""
  s = jax.typeof(leaf).sharding
  spec, mesh = s.spec, s.mesh
  if mesh.empty or not any(e is not None for e in spec):
    return None
  if AxisType.Explicit not in tuple(mesh.axis_types):
    return None
  return NamedSharding(mesh, PartitionSpec())


def spec_entries(spec: Optional[PartitionSpec], ndim: int) -> SpecEntries:
  """A PartitionSpec as a tuple of ``ndim`` entries (None or axis tuples)."""
  entries = tuple(spec) if spec is not None else ()
  if len(entries) > ndim:
    raise ValueError(
        f'grain_optax: partition spec {spec} has more entries than the '
        f'{ndim} dimensions of the array it describes.')
  entries = entries + (None,) * (ndim - len(entries))
  return tuple(None if e is None else (tuple(e) if isinstance(e, (tuple, list))
                                       else (e,)) for e in entries)


def spec(*entries: Optional[Sequence[Any]]) -> PartitionSpec:
  """The PartitionSpec of entries as :func:`spec_entries` returns them."""
  return PartitionSpec(*[None if not e else (e[0] if len(e) == 1 else tuple(e))
                         for e in entries])


def used_axes(entries: SpecEntries) -> set:
  """Every mesh axis named in ``entries``."""
  return {a for e in entries if e for a in e}
