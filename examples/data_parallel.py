"""Data-parallel GRAIN: the per-device gradients are the groups.

The batch is sharded over the mesh axis ``data``; each device computes the
gradients of its ``--groups-per-device`` slices of the batch, and GRAIN
combines all ``devices x k`` of them into their min-norm point, moving the
bytes of the usual gradient all-reduce (for k = 1). The script trains an MLP
on scikit-learn's digits with the plain data-parallel mean and with GRAIN,
from the same weights and batches, and prints both test accuracies and the
collective bytes each device sends per step (read from the compiled HLO).

Forms (``--form``):

* ``jit`` -- ``jax.jit`` with the batch sharded over ``Auto`` mesh axes:
  ``grain(axis_name='data')`` names the axis.
* ``explicit`` -- ``jax.jit`` with ``Explicit`` mesh axes: plain ``grain()``;
  the group axis's sharding is read from ``jax.typeof``.
* ``shard_map`` -- ``jax.shard_map`` over ``data``: every device computes its
  own gradients (params marked varying first) and ``grain(axis_name='data')``
  runs the collectives.

One host, many devices (8 simulated CPU devices when no accelerator):

    python examples/data_parallel.py --form jit
    python examples/data_parallel.py --form shard_map --groups-per-device 2

Many hosts: start the same command on every host (or process) with

    python examples/data_parallel.py --coordinator HOST0:1234 \\
        --num-processes 2 --process-id 0     # 1 on the other host

(on TPU pods and Slurm/Kubernetes GPU clusters ``jax.distributed.initialize()``
finds these by itself: pass ``--num-processes -1``).
"""

import argparse
import os
import sys
import time


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--form', choices=('jit', 'explicit', 'shard_map'),
                      default='jit')
  parser.add_argument('--groups-per-device', type=int, default=1)
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--batch-per-group', type=int, default=16)
  parser.add_argument('--lr', type=float, default=3e-3)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--cpu-devices', type=int, default=8,
                      help='simulated devices when running on CPU')
  parser.add_argument('--coordinator', default=None,
                      help='host:port of process 0, for multi-host runs')
  parser.add_argument('--num-processes', type=int, default=1,
                      help='-1: let jax.distributed.initialize detect it')
  parser.add_argument('--process-id', type=int, default=None)
  return parser.parse_args(argv)


ARGS = parse_args() if __name__ == '__main__' else None
if ARGS is not None and 'xla_force_host_platform_device_count' not in (
    os.environ.get('XLA_FLAGS', '')):
  # Only used when JAX runs on the CPU; must be set before jax is imported.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count='
                             f'{ARGS.cpu_devices}')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
from sklearn.datasets import load_digits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grain_optax  # pylint: disable=g-import-not-at-top
from grain_optax.testing import collective_bytes  # pylint: disable=g-import-not-at-top


def load_data(seed):
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  order = np.random.default_rng(seed).permutation(len(y))
  train, test = order[:1200], order[1200:]
  return (x[train], y[train].astype(np.int32)), (x[test], y[test])


def init_mlp(seed, sizes=(64, 256, 256, 10)):
  rng = np.random.default_rng(seed)
  return [{'w': (rng.normal(size=(a, b)) * np.sqrt(2.0 / a)).astype(np.float32),
           'b': np.zeros(b, np.float32)} for a, b in zip(sizes[:-1], sizes[1:])]


def logits_fn(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer['w'] + layer['b'])
  return x @ params[-1]['w'] + params[-1]['b']


def loss_fn(params, batch):
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_fn(params, x), y).mean()


def make_steps(form, mesh, num_devices, k, lr):
  """(tx, step) for the plain mean and for GRAIN, in the chosen form."""
  m = num_devices * k
  mean_tx = optax.adamw(lr)
  # Auto axes and shard_map need the axis name; Explicit axes show it.
  axis_name = None if form == 'explicit' else 'data'
  grain_tx = optax.chain(grain_optax.grain(num_groups=m, axis_name=axis_name),
                         optax.adamw(lr))

  if form == 'shard_map':
    def mean_local(params, opt_state, batch):
      varying = jax.lax.pcast(params, 'data', to='varying')
      loss, grads = jax.value_and_grad(loss_fn)(varying, batch)
      grads = jax.lax.pmean(grads, 'data')
      updates, opt_state = mean_tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state,
              jax.lax.pmean(loss, 'data'))

    def grain_local(params, opt_state, batch):
      # Without the pcast, jax.grad of replicated params would sum the
      # gradients over 'data' (GRAIN rejects that with an error).
      varying = jax.lax.pcast(params, 'data', to='varying')
      losses, grads = grain_optax.group_value_and_grad(loss_fn, k)(varying,
                                                                   batch)
      updates, opt_state = grain_tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state,
              jax.lax.pmean(jnp.mean(losses), 'data'))

    def wrap(f):
      return jax.jit(jax.shard_map(
          f, mesh=mesh, in_specs=(P(), P(), P('data')),
          out_specs=(P(), P(), P())))
    return (mean_tx, wrap(mean_local)), (grain_tx, wrap(grain_local))

  @jax.jit
  def mean_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = mean_tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def grain_step(params, opt_state, batch):
    losses, grads = grain_optax.group_value_and_grad(loss_fn, m)(params, batch)
    updates, opt_state = grain_tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, jnp.mean(losses)

  return (mean_tx, mean_step), (grain_tx, grain_step)


def host_value(tree):
  """A replicated array's value from this process's first device."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x.addressable_shards[0].data), tree)


def main(args):
  if args.num_processes != 1:
    if args.num_processes == -1:
      jax.distributed.initialize()
    else:
      jax.distributed.initialize(args.coordinator, args.num_processes,
                                 args.process_id)
  n = jax.device_count()
  axis_type = AxisType.Explicit if args.form == 'explicit' else AxisType.Auto
  mesh = jax.make_mesh((n,), ('data',), axis_types=(axis_type,))
  k = args.groups_per_device
  batch_size = n * k * args.batch_per_group
  (x_train, y_train), (x_test, y_test) = load_data(args.seed)
  replicated = NamedSharding(mesh, P())
  by_batch = NamedSharding(mesh, P('data'))

  def global_batch(idx):
    # Every process holds the whole dataset here; each device gets its rows.
    return tuple(jax.make_array_from_callback(
        (batch_size,) + a.shape[1:], by_batch, lambda i, a=a: a[idx][i])
                 for a in (x_train, y_train))

  is_main = jax.process_index() == 0
  results = {}
  for name, (tx, step) in zip(('mean', 'grain'),
                              make_steps(args.form, mesh, n, k, args.lr)):
    rng = np.random.default_rng(args.seed)
    params = init_mlp(args.seed)
    with jax.set_mesh(mesh):
      params = jax.device_put(params, replicated)
      opt_state = jax.device_put(tx.init(params), replicated)
      first = global_batch(rng.choice(len(y_train), batch_size, replace=False))
      compiled = step.lower(params, opt_state, first).compile()
      sent = collective_bytes(compiled)['total'].sent_bytes
      start = time.time()
      for _ in range(args.steps):
        idx = rng.choice(len(y_train), batch_size, replace=False)
        params, opt_state, loss = compiled(params, opt_state,
                                           global_batch(idx))
        # One step in flight: simulated CPU devices share a few cores, and
        # queued steps can starve a device thread at a collective.
        loss.block_until_ready()
      loss = float(host_value(loss))
    pred = np.argmax(np.asarray(logits_fn(host_value(params), x_test)), -1)
    results[name] = (float(np.mean(pred == y_test)), loss, sent,
                     time.time() - start)

  if is_main:
    print(f'{n} devices ({jax.devices()[0].platform}), {jax.process_count()} '
          f'process(es), form {args.form!r}, {k} group(s) per device '
          f'(m = {n * k}), batch {batch_size}, {args.steps} AdamW steps')
    print(f'{"":<7}{"test acc":>9}{"last loss":>11}'
          f'{"bytes sent/device/step":>25}{"seconds":>9}')
    for name, (acc, loss, sent, secs) in results.items():
      print(f'{name:<7}{acc:>9.4f}{loss:>11.4f}{sent:>25,.0f}{secs:>9.1f}')
    ratio = results['grain'][2] / results['mean'][2]
    print(f'GRAIN / mean collective bytes: {ratio:.5f} '
          f'(expected (k+1)/2 = {(k + 1) / 2})')
  if args.num_processes != 1:
    jax.distributed.shutdown()
  return results


if __name__ == '__main__':
  main(ARGS)
