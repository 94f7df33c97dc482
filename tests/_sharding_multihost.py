"""One process of a 2-process GRAIN run, started by tests/test_min_norm_point.py.

Usage: python tests/_sharding_multihost.py PROCESS_ID NUM_PROCESSES PORT OUT

Each process has 4 CPU devices; jax.distributed joins them on 127.0.0.1 into
one 8-device mesh (gloo collectives). The process runs several data-parallel
GRAIN training steps under jax.jit, and one step inside jax.shard_map,
compares them with a single-device run of the same steps on its own first
device, and writes a JSON report to OUT.
"""

import json
import os
import sys

LOCAL_DEVICES = 4
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') +
    f' --xla_force_host_platform_device_count={LOCAL_DEVICES}')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top

try:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
except (AttributeError, ValueError):  # Older or newer JAX: its default.
  pass

from jax.sharding import AxisType  # pylint: disable=g-import-not-at-top
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax

import grain_optax
from grain_optax.testing import collective_bytes

SIZES = (64, 256, 10)
BATCH = 32
STEPS = 3


def init_params(seed):
  rng = np.random.default_rng(seed)
  return {f'layer{i}': {'w': (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32),
                        'b': np.zeros(b, np.float32)}
          for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:]))}


def loss_fn(params, batch):
  h = batch['x']
  for i in range(len(params)):
    h = h @ params[f'layer{i}']['w'] + params[f'layer{i}']['b']
    if i < len(params) - 1:
      h = jnp.tanh(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, batch['y']).mean()


def make_batch(seed):
  x = np.random.default_rng(seed).normal(size=(BATCH, SIZES[0]))
  y = (np.argmax(x[:, :10], axis=1) + np.arange(BATCH) // 8) % 10
  return {'x': x.astype(np.float32), 'y': y.astype(np.int32)}


def max_err(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree_util.tree_leaves(a),
                             jax.tree_util.tree_leaves(b)))


def local_copy(tree):
  """A replicated global array's value, read from this process's devices."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x.addressable_shards[0].data), tree)


def main():
  process_id, num_processes, port, out_path = (
      int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  jax.distributed.initialize(
      coordinator_address=f'127.0.0.1:{port}', num_processes=num_processes,
      process_id=process_id, initialization_timeout=60)
  n = jax.device_count()
  assert jax.process_count() == num_processes
  assert jax.local_device_count() == LOCAL_DEVICES
  mesh = jax.make_mesh((n,), ('data',), axis_types=(AxisType.Auto,))
  m = n  # One group per device.

  def chain(axis_name):
    return optax.chain(grain_optax.grain(num_groups=m, axis_name=axis_name),
                       optax.sgd(0.1, momentum=0.9))

  tx, ref_tx = chain('data'), chain(None)

  def train_step(params, opt_state, batch, tx=tx):
    _, grads = grain_optax.group_value_and_grad(loss_fn, m)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # Single-device reference on this process's first device.
  device = jax.local_devices()[0]
  ref_step = jax.jit(lambda p, s, b: train_step(p, s, b, ref_tx))
  params = init_params(0)
  ref_p = jax.device_put(params, device)
  ref_s = jax.device_put(ref_tx.init(params), device)

  replicated = NamedSharding(mesh, P())
  by_batch = NamedSharding(mesh, P('data'))

  def global_batch(seed):
    batch = make_batch(seed)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_callback(x.shape, by_batch,
                                               lambda idx: x[idx]), batch)

  p = jax.device_put(params, replicated)
  s = jax.device_put(tx.init(params), replicated)
  with jax.set_mesh(mesh):
    step = jax.jit(train_step)
    for i in range(STEPS):
      p, s = step(p, s, global_batch(100 + i))
      jax.block_until_ready(p)  # One step in flight on the shared cores.
  for i in range(STEPS):
    ref_p, ref_s = ref_step(ref_p, ref_s,
                            jax.device_put(make_batch(100 + i), device))
  jit_err = max_err(local_copy(p), ref_p)

  # Collective bytes of the global program, against the plain mean step.
  def mean_step(params, batch):
    return jax.grad(loss_fn)(params, batch)

  with jax.set_mesh(mesh):
    batch = global_batch(0)
    grain_bytes = collective_bytes(
        step.lower(p, s, batch).compile())['total'].sent_bytes
    mean_bytes = collective_bytes(
        jax.jit(mean_step).lower(p, batch).compile())['total'].sent_bytes
  weights = s[0].weights
  shard_bytes = [np.asarray(x.data).tobytes().hex()
                 for x in weights.addressable_shards]

  # One step in shard_map, each device differentiating its own shard.
  sm_tx = grain_optax.grain(num_groups=m, axis_name='data')

  def local(params, batch):
    varying = jax.lax.pcast(params, 'data', to='varying')
    _, grads = grain_optax.group_value_and_grad(loss_fn, 1)(varying, batch)
    d, state = sm_tx.update(grads, sm_tx.init(params), params)
    return d, state.weights[None]

  sm = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P('data')),
                             out_specs=(P(), P('data'))))
  batch = global_batch(200)
  d, per_device = sm(jax.device_put(params, replicated), batch)
  ref_d = jax.jit(lambda p, b: sm_tx_ref_update(p, b, m))(
      jax.device_put(params, device), jax.device_put(make_batch(200), device))
  sm_err = max_err(local_copy(d), ref_d)
  per_device_rows = [np.asarray(x.data).tobytes().hex()
                     for x in per_device.addressable_shards]

  report = {
      'process_id': process_id,
      'devices': n,
      'jit_err': jit_err,
      'bytes_ratio': grain_bytes / mean_bytes,
      'shard_map_err': sm_err,
      'weights': [float(w) for w in local_copy(weights)],
      'weight_shards': shard_bytes,
      'shard_map_weight_rows': per_device_rows,
  }
  with open(out_path, 'w') as f:
    json.dump(report, f)
  jax.distributed.shutdown()


def sm_tx_ref_update(params, batch, m):
  tx = grain_optax.grain(num_groups=m)
  _, grads = grain_optax.group_value_and_grad(loss_fn, m)(params, batch)
  return tx.update(grads, tx.init(params), params)[0]


if __name__ == '__main__':
  main()
