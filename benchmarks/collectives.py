"""Collective bytes per device: mean gradient vs GRAIN, on D CPU devices.

Compiles (does not run) one data-parallel step of an MLP for each form of
GRAIN on many devices and reads the collectives from the optimised HLO with
``grain_optax.testing.collective_bytes``:

* ``jit-auto``: jax.jit, batch sharded over ``data`` (Auto axes),
  ``grain(axis_name='data')``; baseline ``jax.grad`` (XLA all-reduce);
* ``jit-explicit``: the same with Explicit mesh axes and plain ``grain()``;
* ``shard_map``: ``grain(axis_name='data')`` inside ``jax.shard_map``;
  baseline ``lax.pmean`` of the per-device gradients;
* ``fsdp-jit``: params sharded over ``data`` too (ZeRO-3 / FSDP),
  ``grain(axis_name='data', param_sharding=...)`` on per-group gradients,
  the update left in the params' layout; baseline the reduce-scatter of the
  mean gradient (the all-gather of params in the forward pass is the same for
  both and left out);
* ``fsdp-shard_map``: mesh ``(data, model)``, groups over ``data``, parameter
  blocks over ``model``: ``grain(axis_name='data', param_axis_name='model')``
  on given per-group gradient blocks; baseline ``pmean`` over ``data``.

The column "model" is the expected ratio: (k+1)/2 against an all-reduce, k
against the reduce-scatter of FSDP. Bytes "sent" assume bandwidth-optimal algorithms (ring all-reduce sends
2(n-1)/n of its operand, all-to-all (n-1)/n, all-gather n-1 times its shard).

Usage: python benchmarks/collectives.py [--devices 8] [--k 1 2 4]
Prints a table and, last, one JSON line with the ratios.
"""

import argparse
import json
import math
import os
import sys


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--k', type=int, nargs='+', default=[1, 2, 4],
                      help='groups per device')
  parser.add_argument('--width', type=int, default=1024,
                      help='hidden width of the MLP (1024: 2.6 M params)')
  return parser.parse_args()


ARGS = _parse()
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') +
    f' --xla_force_host_platform_device_count={ARGS.devices}')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import optax

import grain_optax
from grain_optax.testing import collective_bytes

D = ARGS.devices
IN, OUT = 512, 10


def sizes():
  w = ARGS.width
  return (IN, w, w, w, OUT)


def param_shapes():
  s = sizes()
  return {f'layer{i}': {'w': (a, b), 'b': (b,)}
          for i, (a, b) in enumerate(zip(s[:-1], s[1:]))}


def loss_fn(params, batch):
  h = batch['x']
  for i in range(len(params)):
    h = h @ params[f'layer{i}']['w'] + params[f'layer{i}']['b']
    if i < len(params) - 1:
      h = jax.nn.relu(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, batch['y']).mean()


def num_params():
  shapes = jax.tree_util.tree_leaves(
      param_shapes(), is_leaf=lambda x: isinstance(x, tuple))
  return sum(math.prod(s) for s in shapes)


def abstract(shapes, sharding):
  return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh),
      shapes, sharding, is_leaf=lambda x: isinstance(x, tuple))


def batch_of(batch_size, sharding):
  return {'x': jax.ShapeDtypeStruct((batch_size, IN), jnp.float32,
                                    sharding=sharding),
          'y': jax.ShapeDtypeStruct((batch_size,), jnp.int32,
                                    sharding=sharding)}


def cost(fn, *args):
  return collective_bytes(jax.jit(fn).lower(*args).compile())


def fsdp_spec(shape):
  """Shard the largest dimension divisible by D over 'data' (else replicate)."""
  dims = [i for i, n in enumerate(shape) if n % D == 0]
  if not dims:
    return P()
  best = max(dims, key=lambda i: shape[i])
  return P(*[('data' if i == best else None) for i in range(len(shape))])


def forms(k):
  m = D * k
  batch_size = 8 * m
  shapes = param_shapes()
  is_shape = lambda x: isinstance(x, tuple)

  def grain_step(tx):
    def step(params, batch):
      _, grads = grain_optax.group_value_and_grad(loss_fn, m)(params, batch)
      return tx.update(grads, tx.init(params), params)[0]
    return step

  # 1, 2: jit with a replicated model, Auto (axis named) or Explicit axes.
  for name, axis_type, axis_name in (('jit-auto', AxisType.Auto, 'data'),
                                     ('jit-explicit', AxisType.Explicit, None)):
    mesh = jax.make_mesh((D,), ('data',), axis_types=(axis_type,))
    rep = jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), shapes,
                                 is_leaf=is_shape)
    params = abstract(shapes, rep)
    batch = batch_of(batch_size, NamedSharding(mesh, P('data')))
    with jax.set_mesh(mesh):
      mean = cost(jax.grad(loss_fn), params, batch)
      grain = cost(grain_step(grain_optax.grain(num_groups=m,
                                                axis_name=axis_name)),
                   params, batch)
    yield name, mean, grain, (k + 1) / 2

  # 3: shard_map, each device differentiating its own shard of the batch.
  mesh = jax.make_mesh((D,), ('data',), axis_types=(AxisType.Auto,))
  params = abstract(shapes, jax.tree_util.tree_map(
      lambda _: NamedSharding(mesh, P()), shapes, is_leaf=is_shape))
  batch = batch_of(batch_size, NamedSharding(mesh, P('data')))
  tx = grain_optax.grain(num_groups=m, axis_name='data')

  def mean_local(params, batch):
    varying = jax.lax.pcast(params, 'data', to='varying')
    return jax.lax.pmean(jax.grad(loss_fn)(varying, batch), 'data')

  def grain_local(params, batch):
    varying = jax.lax.pcast(params, 'data', to='varying')
    _, grads = grain_optax.group_value_and_grad(loss_fn, k)(varying, batch)
    return tx.update(grads, tx.init(params), params)[0]

  smap = lambda f: jax.shard_map(f, mesh=mesh, in_specs=(P(), P('data')),
                                 out_specs=P())
  yield ('shard_map', cost(smap(mean_local), params, batch),
         cost(smap(grain_local), params, batch), (k + 1) / 2)

  # 4: FSDP under jit: params sharded over the batch axis. The aggregation
  #    alone (per-group gradients in, update in the params' layout out): the
  #    forward's all-gather of params is the same for both. Baseline: the
  #    mean's reduce-scatter (psum_scatter of each leaf along its sharded
  #    dimension, pmean of the replicated ones).
  specs = jax.tree_util.tree_map(fsdp_spec, shapes, is_leaf=is_shape)
  shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs)
  groups = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct((m,) + s, jnp.float32,
                                     sharding=NamedSharding(mesh, P('data'))),
      shapes, is_leaf=is_shape)
  tx = grain_optax.grain(num_groups=m, axis_name='data', param_sharding=specs)

  def reduce_scatter_mean(g):
    def leaf(x, spec):
      x = jnp.sum(x, 0) / m
      dims = [i for i, e in enumerate(spec) if e == 'data']
      if not dims:
        return jax.lax.psum(x, 'data')
      return jax.lax.psum_scatter(x, 'data', scatter_dimension=dims[0],
                                  tiled=True)
    return jax.tree_util.tree_map(leaf, g, specs,
                                  is_leaf=lambda x: isinstance(x, P))

  rs = jax.shard_map(reduce_scatter_mean, mesh=mesh,
                     in_specs=(jax.tree_util.tree_map(
                         lambda _: P('data'), specs,
                         is_leaf=lambda x: isinstance(x, P)),),
                     out_specs=specs)
  with jax.set_mesh(mesh):
    mean = cost(rs, groups)
    grain = collective_bytes(jax.jit(
        lambda g: tx.update(g, tx.init(None))[0],
        out_shardings=shardings).lower(groups).compile())
  # The mean sums a device's k groups before its reduce-scatter; GRAIN's
  # all-to-all carries all k: k times the bytes.
  yield 'fsdp-jit', mean, grain, k

  # 5: shard_map over (data, model) with parameter blocks over 'model'.
  if D % 2 == 0:
    mesh2 = jax.make_mesh((D // 2, 2), ('data', 'model'),
                          axis_types=(AxisType.Auto,) * 2)
    block = jax.tree_util.tree_map(
        lambda s: P(*([None] * (len(s) - 1) + ['model'])), shapes,
        is_leaf=is_shape)
    groups = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(((D // 2) * k,) + s, jnp.float32,
                                       sharding=NamedSharding(
                                           mesh2, P('data', *block_spec(s)))),
        shapes, is_leaf=is_shape)
    tx2 = grain_optax.grain(num_groups=(D // 2) * k, axis_name='data',
                            param_axis_name='model')
    out_specs = block

    def mean_blocks(g):
      return jax.tree_util.tree_map(
          lambda x: jax.lax.pmean(jnp.mean(x, 0), 'data'), g)

    def grain_blocks(g):
      return tx2.update(g, tx2.init(None))[0]

    in_specs = (jax.tree_util.tree_map(lambda s: P('data', *s), block,
                                       is_leaf=lambda x: isinstance(x, P)),)
    sm2 = lambda f: jax.shard_map(f, mesh=mesh2, in_specs=in_specs,
                                  out_specs=out_specs)
    yield ('fsdp-shard_map', cost(sm2(mean_blocks), groups),
           cost(sm2(grain_blocks), groups), (k + 1) / 2)


def block_spec(shape):
  return [None] * (len(shape) - 1) + ['model']


def summary(c):
  kinds = [f"{n.replace('collective-', '')} x{c[n].count}"
           for n in c if n != 'total' and c[n].count]
  return ', '.join(kinds) or '-'


def main():
  p = num_params()
  print(f'{D} CPU devices, {p:,} float32 parameters ({4 * p:,} bytes), '
        f'jax {jax.__version__}')
  print(f'ring all-reduce of the gradient: {8 * p * (D - 1) / D:,.0f} bytes '
        'sent per device\n')
  header = (f"{'form':<16}{'k':>3}  {'mean bytes/dev':>16}  "
            f"{'GRAIN bytes/dev':>16}  {'ratio':>8}  {'model':>7}  "
            'GRAIN collectives  |  mean collectives')
  print(header)
  print('-' * len(header))
  ratios = {}
  for k in ARGS.k:
    for name, mean, grain, model in forms(k):
      # A form whose mean step sends nothing (on 2 devices the partitioner
      # may keep every operand local) has no ratio: None in the JSON.
      sent = mean['total'].sent_bytes
      ratio = grain['total'].sent_bytes / sent if sent else None
      ratios[f'{name}/k={k}'] = None if ratio is None else round(ratio, 6)
      shown = f'{ratio:>8.5f}' if ratio is not None else f"{'-':>8}"
      print(f'{name:<16}{k:>3}  {mean["total"].sent_bytes:>16,.0f}  '
            f'{grain["total"].sent_bytes:>16,.0f}  {shown}  '
            f'{model:>7.1f}  {summary(grain)}  |  {summary(mean)}')
  print(json.dumps({'benchmark': 'collectives', 'devices': D,
                    'params': p, 'jax': jax.__version__,
                    'ratio_grain_over_mean': ratios}))


if __name__ == '__main__':
  main()
