r"""GRAIN across devices at the communication cost of a gradient all-reduce.

In data-parallel training every device computes the gradient of its shard of
the batch and the gradients are averaged with an all-reduce, which sends about
:math:`2P(D-1)/D` values per device for :math:`P` parameters on :math:`D`
devices. The per-device gradients are natural groups for GRAIN, and the
min-norm point of :math:`m = kD` of them (:math:`k` groups per device) costs no
more traffic than their mean when computed as follows:

1. all-to-all: device :math:`s` receives parameter block :math:`s` of every
   group gradient (:math:`kP(D-1)/D` values, like a reduce-scatter);
2. every device forms the partial Gram matrix of its block,
   :math:`K^{(s)} = G_s G_s^\top`, and the :math:`m \times m` matrices are
   summed with an all-reduce, :math:`K = \sum_s K^{(s)}`;
3. every device solves the same simplex QP on the same :math:`K` and combines
   its block, :math:`d_s = \sum_i w_i g_{i,s}`;
4. all-gather of the blocks :math:`d_s` (:math:`P(D-1)/D` values).

For :math:`k = 1` that is :math:`2P(D-1)/D` plus :math:`m^2` floats: the bytes
of the all-reduce. With :math:`k` groups per device the all-to-all carries
:math:`k` times more, :math:`(k+1)/2` times the all-reduce in total.

Three forms share this module:

* under ``jax.shard_map`` (or ``pmap``), with manual collectives over a named
  axis (``grain(axis_name='data')``) and, for parameters sharded along their
  dimensions, a psum of partial Grams over the parameter axis
  (``param_axis_name``);
* under ``jax.jit`` with sharded arrays: sharding constraints that make the
  partitioner emit the same collectives. Automatic when the group axis is
  sharded over ``Explicit`` mesh axes (visible in ``jax.typeof``); with
  ``Auto`` axes pass ``axis_name`` (the partitioner's choice is not visible at
  trace time);
* gradients sharded along parameter dimensions under ``jax.jit`` (FSDP, tensor
  parallelism) need nothing: the partitioner sums partial Grams itself.

:func:`collective_bytes` reads the collectives of a compiled program, to check
the cost on the machine at hand.
"""

import dataclasses
import math
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from grain_optax._src import combine as combine_lib
from grain_optax._src import solvers
from grain_optax._src import validation

AxisName = Union[str, Tuple[str, ...]]
_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------
# Small compatibility helpers (JAX 0.10 and 0.11).


def axes_tuple(axis_name: Any, what: str = 'axis_name') -> Tuple[Any, ...]:
  """Normalises ``None``, a name or a sequence of names to a tuple."""
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


def _abstract_mesh():
  get = getattr(jax.sharding, 'get_abstract_mesh', None)
  if get is None:
    return None
  try:
    mesh = get()
  except Exception:  # pylint: disable=broad-except
    return None
  if mesh is None or not tuple(getattr(mesh, 'axis_names', ())):
    return None
  return mesh


def _axis_type_names(mesh, axes) -> Tuple[Optional[str], ...]:
  """'manual', 'explicit', 'auto' or None (not a mesh axis) for each axis."""
  if mesh is None:
    return tuple(None for _ in axes)
  names = tuple(mesh.axis_names)
  types = tuple(getattr(mesh, 'axis_types', ()) or ())
  out = []
  for a in axes:
    if a not in names:
      out.append(None)
      continue
    t = str(types[names.index(a)]).lower() if types else 'auto'
    out.append('manual' if 'manual' in t else
               'explicit' if 'explicit' in t else 'auto')
  return tuple(out)


def _mesh_sizes(mesh) -> dict:
  shape = getattr(mesh, 'shape', None)
  if shape is not None:
    return dict(shape)
  return dict(zip(mesh.axis_names, mesh.devices.shape))


def vma_tracked(leaves: Sequence[Any] = ()) -> bool:
  """Whether shard_map tracks which values vary over manual axes.

  Reads JAX's ``check_vma`` setting of the current trace; where a JAX
  version does not expose it, infers it from ``leaves`` (shard_map with
  ``check_vma=True`` types its inputs as varying).
  """
  try:
    from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
    return bool(jax_config._check_vma.value)  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    return any(varying_axes(leaf) for leaf in leaves)


def varying_axes(x) -> Optional[frozenset]:
  """The manual axes over which ``x`` varies, or None if unknown."""
  try:
    aval = jax.typeof(x)
  except Exception:  # pylint: disable=broad-except
    return None
  vma = getattr(aval, 'vma', None)
  if vma is None:
    vma = getattr(getattr(aval, 'mat', None), 'varying', None)
  return None if vma is None else frozenset(vma)


def _axis_size(axes) -> int:
  try:
    return int(jax.lax.axis_size(axes))
  except Exception:  # pylint: disable=broad-except
    return int(jax.lax.psum(1, axes))


def _all_gather_invariant(x, axes):
  """Tiled all-gather on axis 0 whose result is typed as replicated."""
  if not vma_tracked([x]):  # pmap, vmap, check_vma=False: nothing to type.
    return jax.lax.all_gather(x, axes, axis=0, tiled=True)
  for to in ('invarying', 'invariant'):
    try:
      return jax.lax.all_gather(x, axes, axis=0, tiled=True, to=to)
    except (TypeError, ValueError):
      continue
  legacy = getattr(jax.lax, 'all_gather_invariant', None)
  if legacy is not None:
    return legacy(x, axes, axis=0, tiled=True)
  return jax.lax.all_gather(x, axes, axis=0, tiled=True)


def _spec_entries(spec, ndim) -> Tuple[Any, ...]:
  """A PartitionSpec as a tuple of ``ndim`` entries (None or axis tuples)."""
  entries = tuple(spec) if spec is not None else ()
  if len(entries) > ndim:
    raise ValueError(
        f'grain_optax: partition spec {spec} has more entries than the '
        f'{ndim} dimensions of the array it describes.')
  entries = entries + (None,) * (ndim - len(entries))
  return tuple(None if e is None else (tuple(e) if isinstance(e, (tuple, list))
                                       else (e,)) for e in entries)


def _spec(*entries) -> PartitionSpec:
  return PartitionSpec(*[None if not e else (e[0] if len(e) == 1 else tuple(e))
                         for e in entries])


def _used_axes(entries) -> set:
  return {a for e in entries if e for a in e}


# ---------------------------------------------------------------------------
# Plan: how the per-group updates are laid out, decided at trace time.


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


def _explicit_group_axes(leaves):
  """Mesh axes that axis 0 of the leaves is sharded over (Explicit mode)."""
  found = None
  for path, leaf in leaves:
    sharding = getattr(jax.typeof(leaf), 'sharding', None)
    spec = getattr(sharding, 'spec', None)
    mesh = getattr(sharding, 'mesh', None)
    if spec is None or mesh is None or not len(spec):
      entry = ()
    else:
      entry = _spec_entries(spec, leaf.ndim)[0] or ()
      if entry and set(_axis_type_names(mesh, entry)) != {'explicit'}:
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


def _param_specs_auto(param_sharding, per_group):
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
    out.append(_spec_entries(spec, leaf.ndim - 1))
  return out


def make_plan(per_group, *, axis_name=None, param_axis_name=None, mesh=None,
              param_sharding=None, params=None,
              caller='grain_optax') -> Optional[Plan]:
  """Decides at trace time how to run; None means the single-device path."""
  axes = axes_tuple(axis_name, 'axis_name')
  param_axes = axes_tuple(param_axis_name, 'param_axis_name')
  if set(axes) & set(param_axes):
    raise ValueError(
        f'{caller}: axis_name={axis_name!r} and '
        f'param_axis_name={param_axis_name!r} share an axis; the groups and '
        'the parameter blocks must be spread over different mesh axes.')
  leaves = jax.tree_util.tree_flatten_with_path(per_group)[0]
  context = _abstract_mesh()

  if not axes and not param_axes:
    axes = _explicit_group_axes(leaves)
    if not axes:
      return None
    kind = 'explicit'
  elif axes:
    types = set(_axis_type_names(context, axes))
    if types == {'manual'}:
      kind = 'manual'
    elif types == {'explicit'}:
      kind = 'explicit'
    elif types == {'auto'}:
      kind = 'auto'
    elif None in types and len(types) == 1:
      if mesh is not None and all(a in mesh.axis_names for a in axes):
        kind = 'auto'
      else:
        try:
          _axis_size(axes)
          kind = 'manual'
        except Exception:  # pylint: disable=broad-except
          raise ValueError(
              f'{caller}: axis_name={axis_name!r} is neither a bound '
              '(shard_map/pmap) axis nor an axis of the current mesh. Under '
              'jax.jit, trace inside `with jax.set_mesh(mesh):` or pass '
              'mesh=...; inside jax.shard_map, name one of its mesh axes.'
          ) from None
    else:
      raise ValueError(
          f'{caller}: the axes {axes} mix manual (shard_map) and '
          'partitioner-managed mesh axes; name only the shard_map axes '
          'inside shard_map.')
  else:
    kind = 'manual'

  if param_axes:
    if kind != 'manual' or set(_axis_type_names(context, param_axes)) - {
        'manual', None}:
      raise ValueError(
          f'{caller}: param_axis_name={param_axis_name!r} is for use inside '
          'jax.shard_map over that axis. Under jax.jit, gradients sharded '
          'along parameter dimensions need no argument: the partitioner '
          'already sums the partial Gram matrices.')
    try:
      _axis_size(param_axes)
    except Exception:  # pylint: disable=broad-except
      raise ValueError(
          f'{caller}: param_axis_name={param_axis_name!r} is not a bound '
          'shard_map axis here.') from None

  if kind == 'manual':
    size = _axis_size(axes) if axes else 1
    return Plan(kind, axes, size, param_axes)

  # Under jit: find the mesh and the per-leaf layouts.
  if kind == 'explicit':
    sharding = jax.typeof(leaves[0][1]).sharding
    sizes = _mesh_sizes(sharding.mesh)
    use_mesh = sharding.mesh
    trailing = []
    for _, leaf in leaves:
      entries = _spec_entries(jax.typeof(leaf).sharding.spec, leaf.ndim)
      trailing.append(entries[1:])
    if params is not None:
      outs = [_spec_entries(getattr(jax.typeof(p).sharding, 'spec', None),
                            p.ndim) for p in jax.tree_util.tree_leaves(params)]
    else:
      outs = list(trailing)
  else:
    if context is not None and all(a in context.axis_names for a in axes):
      sizes = _mesh_sizes(context)
      use_mesh = None
    elif mesh is not None:
      sizes = _mesh_sizes(mesh)
      use_mesh = mesh
    else:
      raise ValueError(
          f'{caller}: axis_name={axis_name!r} under jax.jit needs a mesh: '
          'trace inside `with jax.set_mesh(mesh):` or pass mesh=.')
    missing = [a for a in axes if a not in sizes]
    if missing:
      raise ValueError(f'{caller}: the mesh has no axis {missing[0]!r}; its '
                       f'axes are {tuple(sizes)}.')
    trailing = _param_specs_auto(param_sharding, per_group)
    outs = list(trailing)
  size = math.prod(sizes[a] for a in axes)
  return Plan(kind, axes, size, (), use_mesh, sizes,
              tuple(zip(trailing, outs)))


# ---------------------------------------------------------------------------
# The computation.


def _gram2d(x, out_sharding=None):
  kwargs = {} if out_sharding is None else {'out_sharding': out_sharding}
  return jax.lax.dot_general(
      x, x, (((1,), (1,)), ((), ())), precision=_HIGHEST,
      preferred_element_type=jnp.float32, **kwargs)


def _buckets(leaves, key):
  """Leaf indices grouped by ``key(i)``, in order of first appearance."""
  groups = {}
  for i in range(len(leaves)):
    groups.setdefault(key(i), []).append(i)
  return list(groups.items())


def _flatten_bucket(leaves, idx, rows, multiple):
  x = jnp.concatenate([leaves[i].reshape(rows, -1) for i in idx], axis=1)
  n = x.shape[1]
  pad = (-n) % multiple
  if pad:
    x = jnp.pad(x, ((0, 0), (0, pad)))
  return x, n


def _unflatten_bucket(flat, leaves, idx, out):
  offset = 0
  for i in idx:
    shape = leaves[i].shape[1:]
    size = math.prod(shape)
    out[i] = flat[offset:offset + size].reshape(shape)
    offset += size


def _run_manual(plan, leaves, solve):
  axes, param_axes, size = plan.axes, plan.param_axes, plan.size
  k = leaves[0].shape[0]
  tracked = vma_tracked(leaves)
  varying = [varying_axes(leaf) if tracked else None for leaf in leaves]
  for v, leaf in zip(varying, leaves):
    if axes and v is not None and not set(axes) <= v:
      raise ValueError(
          f'grain_optax: the per-group updates are replicated over the '
          f'shard_map axis {axes} (a leaf of shape {leaf.shape} does not vary '
          'over it), so every device holds the same groups. This happens when '
          'jax.grad runs inside shard_map on replicated params: its transpose '
          'sums the gradients over the axis. Mark the params as varying before '
          f'differentiating: jax.lax.pcast(params, {axes!r}, to="varying").')
  if param_axes:
    if not tracked:
      raise ValueError(
          'grain_optax: param_axis_name needs jax.shard_map with '
          'check_vma=True (the default) to tell the leaves sharded over the '
          'parameter axis from the replicated ones.')
    sharded = []
    for v, leaf in zip(varying, leaves):
      over = set(param_axes) & v
      if over and over != set(param_axes):
        raise ValueError(
            f'grain_optax: a leaf of shape {leaf.shape} varies over {over} but '
            f'not over all of param_axis_name={param_axes}.')
      sharded.append(bool(over))
  else:
    sharded = [False] * len(leaves)
  if not axes:
    # Groups not spread, only parameter blocks: no data movement at all.
    from grain_optax._src import gram as gram_lib  # pylint: disable=g-import-not-at-top
    gram = gram_lib.gram_matrix(leaves, param_axis_name=param_axes)
    sol = solve(gram)
    return combine_lib.combine(leaves, sol.weights), sol, gram

  buckets = _buckets(leaves, lambda i: (jnp.dtype(leaves[i].dtype), sharded[i]))
  blocks, grams_rep, grams_shard = [], [], []
  for (dtype, is_sharded), idx in buckets:
    x, n = _flatten_bucket(leaves, idx, k, size)
    if axes:  # Even for one device: the collectives type d as replicated.
      x = x.reshape(k, size, -1)
      x = jax.lax.all_to_all(x, axes, 1, 0, tiled=True)
      x = x.reshape(k * size, -1)
    blocks.append((x, n, idx))
    (grams_shard if is_sharded else grams_rep).append(_gram2d(x))
  gram = None
  if grams_rep:
    part = sum(grams_rep[1:], grams_rep[0])
    gram = jax.lax.psum(part, axes) if axes else part
  if grams_shard:
    part = sum(grams_shard[1:], grams_shard[0])
    part = jax.lax.psum(part, tuple(axes) + tuple(param_axes))
    gram = part if gram is None else gram + part
  sol = solve(gram)
  out = [None] * len(leaves)
  for x, n, idx in blocks:
    d = combine_lib.combine({'x': x}, sol.weights)['x']
    if axes:
      d = _all_gather_invariant(d, axes)
    _unflatten_bucket(d[:n], leaves, idx, out)
  return out, sol, gram


def _leaf_target(trailing, shape, axes, size, sizes):
  """Where the group-axis-replicated layout puts the data axes of a leaf."""
  if set(axes) & _used_axes(trailing):
    return trailing  # e.g. FSDP over the batch axis: already in place.
  best = None
  for j, (entry, dim) in enumerate(zip(trailing, shape)):
    shards = math.prod(sizes[a] for a in entry) if entry else 1
    if dim % (shards * size) == 0 and (best is None or dim > shape[best]):
      best = j
  if best is None:
    return trailing  # No divisible dimension: the partitioner decides.
  new = list(trailing)
  new[best] = tuple(trailing[best] or ()) + tuple(axes)
  return tuple(new)


def _run_partitioned(plan, leaves, solve):
  axes, size = plan.axes, plan.size
  m = leaves[0].shape[0]
  explicit = plan.kind == 'explicit'
  if explicit:
    mesh = plan.mesh
    constrain = lambda x, spec: jax.sharding.reshard(x, NamedSharding(mesh, spec))
    gram_out = NamedSharding(mesh, PartitionSpec())
  elif plan.mesh is not None:
    constrain = lambda x, spec: jax.lax.with_sharding_constraint(
        x, NamedSharding(plan.mesh, spec))
    gram_out = None
  else:
    constrain = jax.lax.with_sharding_constraint
    gram_out = None

  flat_path = [not _used_axes(t) and not _used_axes(o)
               for t, o in plan.leaf_specs]
  buckets = _buckets(
      leaves, lambda i: (jnp.dtype(leaves[i].dtype), flat_path[i]))
  grams, blocks = [], []
  for (_, is_flat), idx in buckets:
    if is_flat:
      x, n = _flatten_bucket(leaves, idx, m, size)
      x = constrain(x, _spec(None, axes))
      grams.append(_gram2d(x, gram_out))
      blocks.append((x, n, idx))
    else:
      for i in idx:
        trailing, _ = plan.leaf_specs[i]
        target = _leaf_target(trailing, leaves[i].shape[1:], axes, size,
                              plan.mesh_sizes)
        x = constrain(leaves[i], _spec(None, *target))
        # Contract in place: flattening would gather minor-axis shards.
        dims = tuple(range(1, x.ndim))
        grams.append(jax.lax.dot_general(
            x, x, ((dims, dims), ((), ())),
            precision=_HIGHEST, preferred_element_type=jnp.float32,
            **({} if gram_out is None else {'out_sharding': gram_out})))
        blocks.append((x, None, [i]))
  gram = sum(grams[1:], grams[0])
  # Replicate K before the solve, or the partitioner splits the QP's loop.
  gram = constrain(gram, PartitionSpec())
  sol = solve(gram)
  weights = constrain(sol.weights, PartitionSpec())
  out = [None] * len(leaves)
  for x, n, idx in blocks:
    d = combine_lib.combine({'x': x}, weights)['x']
    if n is not None:
      # Keep d in blocks until it is whole: otherwise the partitioner
      # gathers every group gradient instead of the combined one.
      d = constrain(d, _spec(axes))
      d = constrain(d, PartitionSpec())
      _unflatten_bucket(d[:n], leaves, idx, out)
    else:
      i = idx[0]
      out[i] = constrain(d, _spec(*plan.leaf_specs[i][1]))
  return out, sol._replace(weights=weights), gram


def run(plan: Plan, per_group: Any, solve: Callable[[jax.Array], Any]):
  """Runs ``plan``: returns ``(update_tree, solution, gram)``."""
  leaves, treedef = jax.tree_util.tree_flatten(per_group)
  if plan.kind == 'manual':
    out, sol, gram = _run_manual(plan, leaves, solve)
  else:
    out, sol, gram = _run_partitioned(plan, leaves, solve)
  out = [o.astype(leaf.dtype) for o, leaf in zip(out, leaves)]
  return jax.tree_util.tree_unflatten(treedef, out), sol, gram


# ---------------------------------------------------------------------------
# Public: the min-norm point of groups spread over devices.


class MinNormPoint(NamedTuple):
  """Result of :func:`min_norm_point`.

  Attributes:
    update: the min-norm point :math:`d = \\sum_i w_i g_i`, a pytree shaped
      like one group (the params), each leaf in its group's dtype. Inside
      ``shard_map`` it is the same on every device of ``axis_name`` (and holds
      the local parameter block where ``param_axis_name`` shards them).
    solution: the :class:`MinNormSolution` of the QP: ``[m]`` float32 weights
      over all ``m`` groups of all devices, the relative KKT residual and the
      solver's iteration count; identical on every device.
    gram: ``[m, m]`` float32 Gram matrix of all groups, identical on every
      device.
  """
  update: Any
  solution: solvers.MinNormSolution
  gram: jax.Array


def min_norm_point(
    per_group: Any,
    *,
    axis_name: Optional[AxisName] = None,
    param_axis_name: Optional[AxisName] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    param_sharding: Any = None,
    solver: str = 'exact',
    tolerance: Optional[float] = None,
    max_iterations: Optional[int] = None,
    regularization: float = 1e-7,
    stepsize: float = 0.0,
) -> MinNormPoint:
  r"""Min-norm point of group gradients that may be spread over devices.

  Computes :math:`d = \sum_i w_i g_i` with
  :math:`w = \operatorname*{argmin}_{w \in \Delta_m} \|\sum_i w_i g_i\|^2`,
  where the :math:`m` groups may live on different devices, moving the bytes
  of one gradient all-reduce (see the module docstring): an all-to-all of the
  group gradients by parameter block, an all-reduce of the partial
  :math:`m \times m` Gram matrices, the same QP solved on every device, and an
  all-gather of :math:`d`.

  Where it runs:

  * inside ``jax.shard_map`` (or ``pmap``) with ``axis_name`` a manual axis:
    each device passes its own ``k`` groups (leaves ``[k, *param_shape]``);
    the groups of all devices are ordered by device index along
    ``axis_name``, ``m = k * axis_size``. With ``param_axis_name`` (alone or
    with ``axis_name``) the leaves that vary over that axis are parameter
    blocks (FSDP, tensor parallelism): their partial Grams are summed over it
    and ``d`` stays sharded; no block is gathered. Leaves that do not vary
    over it count once. Needs ``check_vma=True`` (shard_map's default).
  * under ``jax.jit`` with the group axis sharded over ``axis_name`` of the
    mesh (leaves ``[m, *param_shape]``, global shapes): sharding constraints
    make the partitioner emit the same collectives. The mesh comes from
    ``jax.set_mesh``, or from ``mesh``. With ``Explicit`` mesh axes, leave
    ``axis_name`` as None: it is read from the arrays' types. For parameters
    sharded over the same axes (FSDP), give their ``param_sharding`` (read
    from the params' types with ``Explicit`` axes via :func:`grain`): ``d``
    then keeps that layout and is never gathered.
  * with neither (and no explicitly sharded group axis): on one device, the
    same as :func:`gram_matrix`, :func:`min_norm_weights` and :func:`combine`.

  Args:
    per_group: a pytree whose leaves all have shape ``[k, *param_shape]``.
    axis_name: the mesh axis (or tuple of axes) the groups are spread over.
    param_axis_name: inside ``shard_map``, the axis (or axes) the parameter
      dimensions are sharded over.
    mesh: under ``jax.jit`` with ``Auto`` axes, the mesh to constrain on when
      no ``jax.set_mesh`` context is active.
    param_sharding: under ``jax.jit`` with ``Auto`` axes, a pytree of
      ``PartitionSpec`` (or ``NamedSharding``) of the params; leaves sharded
      along their dimensions keep that layout.
    solver: see :func:`min_norm_weights`.
    tolerance: see :func:`min_norm_weights`.
    max_iterations: see :func:`min_norm_weights`.
    regularization: see :func:`min_norm_weights`.
    stepsize: see :func:`min_norm_weights`.

  Returns:
    A :class:`MinNormPoint` ``(update, solution, gram)``.

  Raises:
    ValueError: at trace time, if an axis is not bound (or not in the mesh),
      the axes overlap, or inside ``shard_map`` the updates do not vary over
      ``axis_name`` (the implicit psum of ``jax.grad`` on replicated params).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> import grain_optax
    >>> mesh = jax.make_mesh((1,), ('data',),
    ...                      axis_types=(jax.sharding.AxisType.Auto,))
    >>> def local(g):  # this device's groups, [k, 2]
    ...   res = grain_optax.min_norm_point(g, axis_name='data')
    ...   return res.update, res.solution.weights
    >>> step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P('data'),
    ...                              out_specs=(P(), P())))
    >>> d, w = step(jnp.array([[1., 0.], [0., 2.]]))
    >>> [round(float(v), 4) for v in d], [round(float(v), 4) for v in w]
    ([0.8, 0.4], [0.8, 0.2])
  """
  if solver not in solvers.SOLVERS:
    raise ValueError(
        f'grain_optax.min_norm_point: unknown solver {solver!r}; choose one '
        f'of {solvers.SOLVERS}.')
  validation.group_count(per_group)

  def solve(gram):
    return solvers.min_norm_weights(
        gram, solver=solver, tolerance=tolerance,
        max_iterations=max_iterations, regularization=regularization,
        stepsize=stepsize)

  plan = make_plan(per_group, axis_name=axis_name,
                   param_axis_name=param_axis_name, mesh=mesh,
                   param_sharding=param_sharding,
                   caller='grain_optax.min_norm_point')
  if plan is None:
    from grain_optax._src import gram as gram_lib  # pylint: disable=g-import-not-at-top
    gram = gram_lib.gram_matrix(per_group)
    sol = solve(gram)
    return MinNormPoint(combine_lib.combine(per_group, sol.weights), sol, gram)
  update, sol, gram = run(plan, per_group, solve)
  return MinNormPoint(update, sol, gram)


# ---------------------------------------------------------------------------
# Public: collectives of a compiled program.


class CollectiveCost(NamedTuple):
  """Collectives of one kind in a compiled program, per device.

  Attributes:
    count: the number of such collectives.
    operand_bytes: the bytes of their operands on one device.
    sent_bytes: the bytes one device sends with bandwidth-optimal algorithms
      over groups of ``n`` devices: all-reduce ``2(n-1)/n`` of its operand,
      all-gather ``n-1`` times its operand (a shard), reduce-scatter and
      all-to-all ``(n-1)/n``, collective-permute its operand.
  """
  count: int
  operand_bytes: int
  sent_bytes: float


COLLECTIVE_KINDS = ('all-reduce', 'all-gather', 'all-to-all', 'reduce-scatter',
                    'collective-permute')
_DTYPE_BYTES = {
    'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
    's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
    'c128': 16, 's4': 0.5, 'u4': 0.5, 's2': 0.25, 'u2': 0.25,
}
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s+'
    r'(?P<op>[a-z][a-z0-9\-]*)\((?P<args>[^)]*)\)(?P<rest>.*)$')
_ARRAY = re.compile(r'\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+[a-z]*)?)\[([0-9,]*)\]')


def _shape_bytes(shape: str) -> float:
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype.startswith('f8') or dtype.startswith('f4'):
      size = 1
    else:
      size = _DTYPE_BYTES.get(dtype)
      if size is None:
        continue
    total += size * math.prod(int(d) for d in dims.split(',') if d)
  return total


def _group_size(rest: str, num_devices: int) -> int:
  m = re.search(r'replica_groups=\{\{([0-9,\s]*)\}', rest)
  if m:
    return len([t for t in m.group(1).split(',') if t.strip()])
  m = re.search(r'replica_groups=\[([0-9,]+)\]<=', rest)
  if m:
    return int(m.group(1).split(',')[-1])
  # mesh['a'=2,'b'=4] {'b'}, possibly with ", device_ids=(...)" between.
  m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", rest)
  if m:
    sizes = {k.strip().strip("'\""): int(v)
             for k, v in re.findall(r"([^,=\s]+)\s*=\s*(\d+)", m.group(1))}
    names = [n.strip().strip("'\"") for n in m.group(2).split(',') if n.strip()]
    return math.prod(sizes[n] for n in names)
  return num_devices


def collective_bytes(compiled: Any, *,
                     num_devices: Optional[int] = None) -> dict:
  r"""Collectives of a compiled XLA program and the bytes each device sends.

  Reads the post-optimisation HLO (what will run) and, for every all-reduce,
  all-gather, all-to-all, reduce-scatter and collective-permute (synchronous
  or ``-start`` of an async pair), adds up its operand bytes and the bytes one
  device sends with a bandwidth-optimal algorithm over its group of :math:`n`
  devices (ring all-reduce: :math:`2(n-1)/n` of the operand). A data-parallel
  mean of :math:`P` float32 gradients costs :math:`8P(D-1)/D` bytes sent.

  Args:
    compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``)
      or its HLO text.
    num_devices: the group size of collectives that list no replica groups;
      by default the module's ``num_partitions`` times ``replica_count``.

  Returns:
    A dict from each kind in ``COLLECTIVE_KINDS`` and ``'total'`` to a
    :class:`CollectiveCost` ``(count, operand_bytes, sent_bytes)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import grain_optax
    >>> c = jax.jit(lambda x: 2 * x).lower(jnp.ones(8)).compile()
    >>> grain_optax.collective_bytes(c)['total']
    CollectiveCost(count=0, operand_bytes=0, sent_bytes=0.0)
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  if num_devices is None:
    parts = re.search(r'num_partitions=(\d+)', text)
    reps = re.search(r'replica_count=(\d+)', text)
    num_devices = (int(parts.group(1)) if parts else 1) * (
        int(reps.group(1)) if reps else 1)
  shapes, found = {}, []
  for line in text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    shapes[m.group('name')] = m.group('shape')
    op = m.group('op')
    base = op[:-len('-start')] if op.endswith('-start') else op
    if base in COLLECTIVE_KINDS:
      found.append((base, m.group('args'), m.group('rest')))
  stats = {kind: [0, 0.0, 0.0] for kind in COLLECTIVE_KINDS}
  for kind, args, rest in found:
    operand = 0.0
    for token in re.findall(r'%([\w.\-]+)', args):
      operand += _shape_bytes(shapes.get(token, ''))
    if not re.search(r'%[\w.\-]+', args):
      operand = _shape_bytes(args)
    n = max(_group_size(rest, num_devices), 1)
    factor = {'all-reduce': 2 * (n - 1) / n, 'all-gather': n - 1,
              'reduce-scatter': (n - 1) / n, 'all-to-all': (n - 1) / n,
              'collective-permute': 1.0}[kind]
    if kind == 'collective-permute' and 'source_target_pairs={}' in rest:
      factor = 0.0
    s = stats[kind]
    s[0] += 1
    s[1] += operand
    s[2] += factor * operand
  out = {k: CollectiveCost(int(c), int(b), float(s))
         for k, (c, b, s) in stats.items()}
  out['total'] = CollectiveCost(
      sum(c.count for c in out.values()),
      sum(c.operand_bytes for c in out.values()),
      float(sum(c.sent_bytes for c in out.values())))
  return out
