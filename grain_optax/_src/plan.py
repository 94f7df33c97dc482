"""Where the min-norm point runs: the plan, decided at trace time.

A :class:`Placement` holds what the user said (``axis_name``,
``param_axis_name``, ``mesh``, ``param_sharding``), checked where a
transformation is built. :func:`make_plan` reads it with the per-group
updates' layout (manual ``shard_map`` axes, ``Explicit`` or ``Auto`` mesh
axes under ``jax.jit``, parameter axes) and returns a :class:`Plan`, or None
for the single-device path. :mod:`min_norm_point` runs it.
"""

import dataclasses
import math
from typing import Any, List, Optional, Sequence, Tuple

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from grain_optax._src import axes as axes_lib
from grain_optax._src import validation


@dataclasses.dataclass(frozen=True, eq=False)
class Placement:
  """Where the user asked the min-norm point to run.

  ``axis_name``, ``param_axis_name``, ``mesh`` and ``param_sharding`` are
  those of :func:`min_norm_point`; ``axes`` and ``param_axes`` are the first
  two as tuples, checked when the placement is made.
  """
  axis_name: Optional[axes_lib.AxisName] = None
  param_axis_name: Optional[axes_lib.AxisName] = None
  mesh: Optional[jax.sharding.Mesh] = None
  param_sharding: Any = None
  axes: Tuple[Any, ...] = dataclasses.field(init=False)
  param_axes: Tuple[Any, ...] = dataclasses.field(init=False)

  def __post_init__(self):
    object.__setattr__(self, 'axes',
                       axes_lib.axes_tuple(self.axis_name, 'axis_name'))
    object.__setattr__(
        self, 'param_axes',
        axes_lib.axes_tuple(self.param_axis_name, 'param_axis_name'))


@dataclasses.dataclass(frozen=True)
class Plan:
  """How :func:`min_norm_point` runs, decided at trace time.

  ``kind`` is ``'manual'`` (collectives inside shard_map/pmap), ``'explicit'``
  or ``'auto'`` (sharding constraints under jit); ``axes`` are the group (data)
  axes, ``size`` their total size, ``param_axes`` the manual axes parameters
  are sharded over, ``mesh`` the mesh the constraints refer to (None: the
  context mesh) and ``leaf_specs`` per leaf ``(trailing_in, out)`` entries for
  the jit forms.
  """
  kind: str
  axes: Tuple[Any, ...]
  size: int
  param_axes: Tuple[Any, ...] = ()
  mesh: Any = None
  mesh_sizes: Any = None
  leaf_specs: Any = None

  def num_groups(self, local_groups: int) -> int:
    return local_groups * self.size if self.kind == 'manual' else local_groups


def explicit_group_axes(leaves: Sequence[Tuple[Any, jax.Array]]
                        ) -> Tuple[Any, ...]:
  """Mesh axes that axis 0 of the leaves is sharded over (Explicit mode)."""
  found = None
  for path, leaf in leaves:
    sharding = jax.typeof(leaf).sharding
    spec, mesh = sharding.spec, sharding.mesh
    if not len(spec):
      entry = ()
    else:
      entry = axes_lib.spec_entries(spec, leaf.ndim)[0] or ()
      if entry and set(axes_lib.axis_type_names(mesh, entry)) != {'explicit'}:
        entry = ()
    if found is None:
      found = (path, entry)
    elif entry != found[1]:
      raise ValueError(
          'grain_optax: the group axis (axis 0) of the per-group updates is '
          f'sharded over {found[1] or "no axis"} in leaf '
          f'{validation.leaf_name(found[0])} but over {entry or "no axis"} in '
          f'leaf {validation.leaf_name(path)}; shard every leaf\'s group '
          'axis the same way (e.g. over the batch axis).')
  return found[1] if found else ()


def param_specs_auto(param_sharding: Any, per_group: Any
                     ) -> List[axes_lib.SpecEntries]:
  """Per-leaf trailing specs from a user-given tree of shardings."""
  leaves = jax.tree_util.tree_leaves(per_group)
  if param_sharding is None:
    return [(None,) * (leaf.ndim - 1) for leaf in leaves]
  is_spec = lambda s: isinstance(s, (PartitionSpec, NamedSharding)) or s is None
  flat, struct = jax.tree_util.tree_flatten(param_sharding, is_leaf=is_spec)
  g_struct = jax.tree_util.tree_structure(per_group)
  if struct.num_leaves != g_struct.num_leaves or len(flat) != len(leaves):
    raise ValueError(
        'grain_optax: param_sharding must have the tree structure of the '
        f'params, with a PartitionSpec or NamedSharding per leaf; got '
        f'{struct} for updates {g_struct}.')
  out = []
  for s, leaf in zip(flat, leaves):
    spec = s.spec if isinstance(s, NamedSharding) else s
    out.append(axes_lib.spec_entries(spec, leaf.ndim - 1))
  return out


def make_plan(per_group: Any, placement: Placement, *, params: Any = None,
              caller: str = 'grain_optax') -> Optional[Plan]:
  """Decides at trace time how to run; None means the single-device path.

  Args:
    per_group: the checked per-group updates.
    placement: where the user asked it to run.
    params: the params the updates are for, or None (their ``Explicit``
      shardings give the update's layout).
    caller: the public function, for errors.
  """
  axes, param_axes = placement.axes, placement.param_axes
  axis_name = placement.axis_name
  param_axis_name = placement.param_axis_name
  mesh, param_sharding = placement.mesh, placement.param_sharding
  if set(axes) & set(param_axes):
    raise ValueError(
        f'{caller}: axis_name={axis_name!r} and '
        f'param_axis_name={param_axis_name!r} share an axis; the groups and '
        'the parameter blocks must be spread over different mesh axes.')
  leaves = jax.tree_util.tree_flatten_with_path(per_group)[0]
  context = axes_lib.abstract_mesh()

  if not axes and not param_axes:
    axes = explicit_group_axes(leaves)
    if not axes:
      return None
    kind = 'explicit'
  elif axes:
    types = set(axes_lib.axis_type_names(context, axes))
    if types == {'manual'}:
      kind = 'manual'
    elif types == {'explicit'}:
      kind = 'explicit'
    elif types == {'auto'}:
      kind = 'auto'
    elif None in types and len(types) == 1:
      if mesh is not None and all(a in mesh.axis_names for a in axes):
        kind = 'auto'
      elif axes_lib.is_bound(axes):
        kind = 'manual'
      else:
        raise ValueError(
            f'{caller}: axis_name={axis_name!r} is neither a bound '
            '(shard_map/pmap) axis nor an axis of the current mesh. Under '
            'jax.jit, trace inside `with jax.set_mesh(mesh):` or pass '
            'mesh=...; inside jax.shard_map, name one of its mesh axes.')
    else:
      raise ValueError(
          f'{caller}: the axes {axes} mix manual (shard_map) and '
          'partitioner-managed mesh axes; name only the shard_map axes '
          'inside shard_map.')
  else:
    kind = 'manual'

  if param_axes:
    param_types = set(axes_lib.axis_type_names(context, param_axes))
    if kind != 'manual' or param_types - {'manual', None}:
      raise ValueError(
          f'{caller}: param_axis_name={param_axis_name!r} is for use inside '
          'jax.shard_map over that axis. Under jax.jit, gradients sharded '
          'along parameter dimensions need no argument: the partitioner '
          'already sums the partial Gram matrices.')
    if not axes_lib.is_bound(param_axes):
      raise ValueError(
          f'{caller}: param_axis_name={param_axis_name!r} is not a bound '
          'shard_map axis here.')

  if kind == 'manual':
    size = axes_lib.axis_size(axes) if axes else 1
    return Plan(kind, axes, size, param_axes)

  # Under jit: find the mesh and the per-leaf layouts.
  if kind == 'explicit':
    sharding = jax.typeof(leaves[0][1]).sharding
    sizes = axes_lib.mesh_sizes(sharding.mesh)
    use_mesh = sharding.mesh
    trailing = []
    for _, leaf in leaves:
      entries = axes_lib.spec_entries(jax.typeof(leaf).sharding.spec,
                                      leaf.ndim)
      trailing.append(entries[1:])
    if params is not None:
      outs = [axes_lib.spec_entries(jax.typeof(p).sharding.spec, p.ndim)
              for p in jax.tree_util.tree_leaves(params)]
    else:
      outs = list(trailing)
  else:
    if context is not None and all(a in context.axis_names for a in axes):
      sizes = axes_lib.mesh_sizes(context)
      use_mesh = None
    elif mesh is not None:
      sizes = axes_lib.mesh_sizes(mesh)
      use_mesh = mesh
    else:
      raise ValueError(
          f'{caller}: axis_name={axis_name!r} under jax.jit needs a mesh: '
          'trace inside `with jax.set_mesh(mesh):` or pass mesh=.')
    missing = [a for a in axes if a not in sizes]
    if missing:
      raise ValueError(f'{caller}: the mesh has no axis {missing[0]!r}; its '
                       f'axes are {tuple(sizes)}.')
    trailing = param_specs_auto(param_sharding, per_group)
    outs = list(trailing)
  size = math.prod(sizes[a] for a in axes)
  return Plan(kind, axes, size, (), use_mesh, sizes,
              tuple(zip(trailing, outs)))

