"""Data-parallel GRAIN on D devices: step time, bytes sent, weights agreement.

Trains the GPT of ``_gpt.py`` data-parallel over the first D devices (batch
``--batch-per-device`` per device, weak scaling) with the plain mean and with
GRAIN at k groups per device (m = kD), and prints per D and form:

* ``ms``: median time per step (AdamW included), and its ratio to the mean's
  step of the same form;
* ``MB sent``: bytes one device sends per step, read from the compiled HLO
  with ``grain_optax.testing.collective_bytes`` (bandwidth-optimal
  algorithms), and the ratio to the mean's;
* ``err``: after ``--check-steps`` steps from the same start, the distance
  of the weights from a one-device run of the same step (the mean, or GRAIN
  with the same groups) on the same global batches (L2, relative to that
  run's weight change; the largest difference too), and whether every
  device holds bitwise the same weights.

Forms: ``jit`` (``jax.jit``, batch sharded ``P('data')`` over ``Auto`` axes,
``grain(axis_name='data')``), ``shard_map`` (every device its own k groups,
the mean a ``pmean``), ``fsdp`` (``jax.jit`` with the params sharded over
``data`` too, ``grain(..., param_sharding=...)``; both steps all-gather the
params in the forward pass). GRAIN variants: ``grain`` (defaults: per-group
gradients in the backward's dtype, moved in it), ``grain@params`` (float32
per-group gradients, the path before ``grad_dtype='backward'``) and
``grain@f32comm`` (bfloat16 groups moved as float32:
``communication_dtype=jnp.float32``).

    python benchmarks/data_parallel.py --devices 2 4 --json out.jsonl
    python benchmarks/data_parallel.py --config tiny --cpu-devices 4   # CPU

``--processes N`` instead runs the multi-host recipe on one machine: N
processes, one device each, ``jax.distributed.initialize`` on 127.0.0.1, a
few GRAIN steps; it checks that the weights are bitwise identical across the
processes and compares the loss curve and the weights with one process
driving the same N devices.

    python benchmarks/data_parallel.py --processes 2 --train-steps 5
"""

import argparse
import dataclasses
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='full', choices=('full', 'tiny'))
  p.add_argument('--dtype', default=None,
                 help="compute dtype instead of the config's (e.g. bfloat16)")
  p.add_argument('--devices', type=int, nargs='+', default=None,
                 help='device counts D to run (default: all devices)')
  p.add_argument('--k', type=int, nargs='+', default=[1, 2],
                 help='groups per device')
  p.add_argument('--forms', nargs='+', default=['jit', 'shard_map', 'fsdp'])
  p.add_argument('--variants', nargs='+', default=['grain', 'grain@params'],
                 help="GRAIN variants for the jit form at k = 1 (other forms "
                 "and k: 'grain' only)")
  p.add_argument('--batch-per-device', type=int, default=None,
                 help="default: the config's batch (32 for 'full')")
  p.add_argument('--check-steps', type=int, default=3)
  p.add_argument('--inner', type=int, default=10)
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--json', default=None, help='append JSON lines here')
  p.add_argument('--cpu-devices', type=int, default=8,
                 help='simulated devices when JAX runs on the CPU')
  p.add_argument('--processes', type=int, default=0,
                 help='run the multi-process check with N processes')
  p.add_argument('--train-steps', type=int, default=5)
  p.add_argument('--compile-only', action='store_true',
                 help='bytes from the compiled HLO only: no timing, no check')
  p.add_argument('--list-collectives', action='store_true',
                 help="print each collective's kind and shapes")
  # Internal: one process of the multi-process check.
  p.add_argument('--child', default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


ARGS = _parse() if __name__ == '__main__' else None
if ARGS is not None and not ARGS.child and not ARGS.processes and (
    'xla_force_host_platform_device_count' not in os.environ.get(
        'XLA_FLAGS', '')):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count='
                             f'{ARGS.cpu_devices}')

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from jax.sharding import AxisType  # pylint: disable=g-import-not-at-top
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

import _gpt  # pylint: disable=g-import-not-at-top

import grain_optax  # pylint: disable=g-import-not-at-top
from grain_optax.testing import collective_bytes  # pylint: disable=g-import-not-at-top


def _variant_options(variant):
  """``(grad_dtype, communication_dtype)`` of a GRAIN variant name."""
  return {'grain': ('backward', None),
          'grain@params': ('params', None),
          'grain@f32comm': ('backward', jnp.float32)}[variant]


def fsdp_specs(params, n):
  """Each leaf sharded over ``data`` along its largest dimension D divides."""
  def spec(x):
    dims = [j for j in range(x.ndim) if x.shape[j] % n == 0]
    if not dims:
      return P()
    j = max(dims, key=lambda j: x.shape[j])
    return P(*([None] * j + ['data']))
  return jax.tree_util.tree_map(spec, params)


def make_step(form, variant, loss_fn, mesh, n, k, param_specs=None):
  """A jitted ``step(params, opt_state, batch) -> (params, opt_state, loss)``
  and its optimizer; ``variant`` is ``'mean'`` or a GRAIN variant."""
  m = n * k
  if variant == 'mean':
    tx = _gpt.adamw()
  else:
    grad_dtype, comm = _variant_options(variant)
    tx = optax.chain(
        grain_optax.grain(num_groups=m, axis_name='data',
                          communication_dtype=comm,
                          param_sharding=param_specs),
        _gpt.adamw())

  if form == 'shard_map':
    def local(params, opt_state, batch):
      varying = jax.lax.pcast(params, 'data', to='varying')
      if variant == 'mean':
        loss, grads = jax.value_and_grad(loss_fn)(varying, batch)
        grads = jax.lax.pmean(grads, 'data')
      else:
        losses, grads = grain_optax.group_value_and_grad(
            loss_fn, k, grad_dtype=grad_dtype)(varying, batch)
        loss = jnp.mean(losses)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state,
              jax.lax.pmean(loss, 'data'))
    step = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P('data')),
                         out_specs=(P(), P(), P()))
  else:
    def step(params, opt_state, batch):
      if variant == 'mean':
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      else:
        losses, grads = grain_optax.group_value_and_grad(
            loss_fn, m, grad_dtype=grad_dtype)(params, batch)
        loss = jnp.mean(losses)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1)), tx


def batches(cfg, global_batch, count, seed=100):
  return [{'tokens': np.asarray(jax.random.randint(
      jax.random.key(seed + i), (global_batch, cfg.seq + 1), 0, cfg.vocab,
      jnp.int32))} for i in range(count)]


def host(tree):
  """A global array's value on the host (replicated or sharded)."""
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def bitwise_replicated(tree):
  """True if every device's copy of every replicated leaf is bitwise equal."""
  for x in jax.tree_util.tree_leaves(tree):
    if not x.sharding.is_fully_replicated:
      continue
    shards = [np.asarray(s.data).tobytes() for s in x.addressable_shards]
    if any(s != shards[0] for s in shards):
      return False
  return True


_REFERENCES = {}
_COLLECTIVE = re.compile(
    r'\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(all-to-all|all-gather|'
    r'all-reduce|reduce-scatter|collective-permute)(?:-start)?\(')


def l2(a, b):
  return float(np.sqrt(sum(
      np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
      for x, y in zip(jax.tree_util.tree_leaves(a),
                      jax.tree_util.tree_leaves(b)))))


def max_abs(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) -
                                 np.asarray(y, np.float64))))
             for x, y in zip(jax.tree_util.tree_leaves(a),
                             jax.tree_util.tree_leaves(b)))


def reference_run(variant, loss_fn, params0, data, m):
  """The same steps on one device over the same global batches (GRAIN with m
  groups, or the mean)."""
  if variant == 'mean':
    tx = _gpt.adamw()

    def grad_fn(params, batch):
      return jax.grad(loss_fn)(params, batch)
  else:
    grad_dtype, _ = _variant_options(variant)
    tx = optax.chain(grain_optax.grain(num_groups=m), _gpt.adamw())

    def grad_fn(params, batch):
      return grain_optax.group_value_and_grad(
          loss_fn, m, grad_dtype=grad_dtype)(params, batch)[1]

  @jax.jit
  def step(params, opt_state, batch):
    updates, opt_state = tx.update(grad_fn(params, batch), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  dev = jax.devices()[0]
  params = jax.device_put(params0, dev)
  opt_state = tx.init(params)
  for b in data:
    params, opt_state = step(params, opt_state, jax.device_put(b, dev))
  return host(params)


def run_form(form, n, args, cfg, loss_fn, params0):
  """Rows of one form on the first n devices."""
  mesh = jax.make_mesh((n,), ('data',), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:n])
  bpd = args.batch_per_device or cfg.batch
  param_specs = fsdp_specs(params0, n) if form == 'fsdp' else None
  runs = [('mean', 1)]
  for k in args.k:
    variants = (args.variants if form == 'jit' and k == 1 else ['grain'])
    runs += [(v, k) for v in variants]
  rows = []
  data_sharding = NamedSharding(mesh, P('data'))
  rep = NamedSharding(mesh, P())
  if param_specs is None:
    param_sharding = jax.tree_util.tree_map(lambda _: rep, params0)
  else:
    param_sharding = jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), param_specs)
  mean_ms = mean_bytes = None
  for variant, k in runs:
    step, tx = make_step(form, variant, loss_fn, mesh, n, k, param_specs)
    with jax.set_mesh(mesh):
      params = jax.device_put(params0, param_sharding)
      opt_state = tx.init(params)
      batch = jax.device_put(batches(cfg, bpd * n, 1, seed=7)[0],
                             data_sharding)
      start = time.perf_counter()
      compiled = step.lower(params, opt_state, batch).compile()
      compile_s = time.perf_counter() - start
      sent = collective_bytes(compiled)['total'].sent_bytes
      if args.list_collectives:
        for line in compiled.as_text().splitlines():
          found = _COLLECTIVE.match(line)
          if found:
            print(f'  {form} {variant} k={k}: {found.group(2)} '
                  f'{found.group(1)[:160]}', flush=True)
      if args.compile_only:
        ms = lo = hi = float('nan')
      else:
        ms, lo, hi, params, opt_state = _gpt.time_steps(
            compiled, params, opt_state, batch, inner=args.inner,
            reps=args.reps)
      del params, opt_state
      row = {'D': n, 'form': form, 'step': variant, 'k': k, 'm': n * k,
             'ms': round(ms, 3), 'ms_min': round(lo, 3),
             'ms_max': round(hi, 3), 'MB_sent': round(sent / 1e6, 2),
             'compile_s': round(compile_s, 1)}
      if variant == 'mean':
        mean_ms, mean_bytes = ms, sent
      row['time_ratio'] = round(ms / mean_ms, 3)
      row['bytes_ratio'] = round(sent / mean_bytes, 4) if mean_bytes else None
      if args.check_steps and not args.compile_only:
        data = batches(cfg, bpd * n, args.check_steps)
        params = jax.device_put(params0, param_sharding)
        opt_state = tx.init(params)
        for b in data:
          params, opt_state, _ = compiled(params, opt_state,
                                          jax.device_put(b, data_sharding))
        row['bitwise_across_devices'] = bitwise_replicated(params)
        got = host(params)
        del params, opt_state
    if args.check_steps and not args.compile_only:
      key = (variant, n * k, n)
      if key not in _REFERENCES:
        _REFERENCES[key] = reference_run(variant, loss_fn, params0, data,
                                         n * k)
      ref = _REFERENCES[key]
      # Relative to the weights' change: AdamW's first steps move each
      # weight by about lr * sign(g), so a weight whose gradient is near zero
      # can flip by 2 lr on rounding alone; the L2 norm weighs that fairly.
      row['weights_max_abs_err'] = max_abs(got, ref)
      row['weights_err_rel'] = l2(got, ref) / l2(ref, params0)
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def config_of(args):
  cfg = _gpt.CONFIGS[args.config]
  return dataclasses.replace(cfg, dtype=args.dtype) if args.dtype else cfg


def benchmark(args):
  cfg = config_of(args)
  loss_fn, params0 = _gpt.build(cfg)
  params0 = host(params0)
  info = _gpt.device_info()
  info['commit'] = _gpt.git_commit()
  info['num_params'] = _gpt.num_params(params0)
  info['config'] = args.config
  print(json.dumps({'info': info}), flush=True)
  all_rows = []
  for n in args.devices or [jax.device_count()]:
    for form in args.forms:
      rows = run_form(form, n, args, cfg, loss_fn, params0)
      for r in rows:
        r.update(info)
      all_rows += rows
  _gpt.print_table(all_rows, ['D', 'form', 'step', 'm', 'ms', 'time_ratio',
                              'MB_sent', 'bytes_ratio', 'weights_err_rel',
                              'bitwise_across_devices'],
                   title=f"{info['device']} x {jax.device_count()}, JAX "
                   f"{info['jax']}, {info['num_params']:,} params")
  if args.json:
    with open(args.json, 'a') as f:
      for r in all_rows:
        f.write(json.dumps(r) + '\n')


# ---------------------------------------------------------------------------
# Multi-process check.


def _child(args):
  """One process (or, with num_processes 1, the single-process reference)."""
  spec = json.loads(args.child)
  if spec['num_processes'] > 1:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{spec['port']}",
        num_processes=spec['num_processes'], process_id=spec['process_id'],
        initialization_timeout=120)
  n = jax.device_count()
  cfg = config_of(args)
  loss_fn, params0 = _gpt.build(cfg)
  params0 = host(params0)
  mesh = jax.make_mesh((n,), ('data',), axis_types=(AxisType.Auto,))
  step, tx = make_step('jit', 'grain', loss_fn, mesh, n, 1)
  bpd = args.batch_per_device or cfg.batch
  rep = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P('data'))

  def global_array(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  losses = []
  with jax.set_mesh(mesh):
    params = jax.tree_util.tree_map(lambda x: global_array(x, rep), params0)
    opt_state = jax.tree_util.tree_map(
        lambda x: global_array(x, rep), host(tx.init(params0)))
    for b in batches(cfg, bpd * n, args.train_steps):
      batch = jax.tree_util.tree_map(lambda x: global_array(x, data_sharding),
                                     b)
      params, opt_state, loss = step(params, opt_state, batch)
      losses.append(float(np.asarray(loss.addressable_shards[0].data)))
  # This process's copy of the (replicated) weights.
  local = [np.asarray(x.addressable_shards[0].data)
           for x in jax.tree_util.tree_leaves(params)]
  digest = hashlib.sha256(b''.join(x.tobytes() for x in local)).hexdigest()
  out = {'process_id': jax.process_index(), 'processes': jax.process_count(),
         'devices': n, 'platform': jax.devices()[0].platform,
         'device': jax.devices()[0].device_kind, 'losses': losses,
         'weights_sha256': digest,
         'bitwise_local_devices': bitwise_replicated(params)}
  np.savez(spec['out'] + '.npz', *local)
  with open(spec['out'] + '.json', 'w') as f:
    json.dump(out, f)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def multiprocess(args):
  n = args.processes
  here = os.path.abspath(__file__)
  tmp = tempfile.mkdtemp(prefix='grain_dp_')
  on_gpu = subprocess.run(
      [sys.executable, '-c', 'import jax; print(jax.default_backend())'],
      capture_output=True, text=True, check=True).stdout.strip() == 'gpu'

  def env_for(devices):
    env = dict(os.environ)
    if on_gpu:
      env['CUDA_VISIBLE_DEVICES'] = ','.join(str(d) for d in devices)
    else:
      env['JAX_PLATFORMS'] = 'cpu'
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                          ' --xla_force_host_platform_device_count='
                          f'{len(devices)}')
      env['JAX_CPU_COLLECTIVES_IMPLEMENTATION'] = 'gloo'
    return env

  common = [sys.executable, here, '--config', args.config,
            '--dtype', config_of(args).dtype,
            '--train-steps', str(args.train_steps)]
  if args.batch_per_device:
    common += ['--batch-per-device', str(args.batch_per_device)]
  port = _free_port()
  procs = []
  for i in range(n):
    spec = {'num_processes': n, 'process_id': i, 'port': port,
            'out': os.path.join(tmp, f'proc{i}')}
    procs.append(subprocess.Popen(common + ['--child', json.dumps(spec)],
                                  env=env_for([i])))
  codes = [p.wait(timeout=900) for p in procs]
  spec = {'num_processes': 1, 'process_id': 0, 'port': 0,
          'out': os.path.join(tmp, 'single')}
  single_code = subprocess.run(common + ['--child', json.dumps(spec)],
                               env=env_for(list(range(n))),
                               timeout=900).returncode
  if any(codes) or single_code:
    raise SystemExit(f'multi-process check failed: exit codes {codes}, '
                     f'single process {single_code}')
  outs = [json.load(open(os.path.join(tmp, f'proc{i}.json')))
          for i in range(n)]
  single = json.load(open(os.path.join(tmp, 'single.json')))
  multi_w = np.load(os.path.join(tmp, 'proc0.npz'))
  single_w = np.load(os.path.join(tmp, 'single.npz'))
  weights_diff = max(float(np.max(np.abs(multi_w[k].astype(np.float64) -
                                         single_w[k])))
                     for k in multi_w.files)
  result = {
      'processes': n, 'platform': outs[0]['platform'],
      'device': outs[0]['device'], 'config': args.config,
      'train_steps': args.train_steps, 'commit': _gpt.git_commit(),
      'jax': jax.__version__,
      'bitwise_across_processes': len({o['weights_sha256'] for o in outs}) == 1,
      'losses_multi': outs[0]['losses'],
      'losses_single': single['losses'],
      'losses_max_diff': max(abs(a - b) for a, b in
                             zip(outs[0]['losses'], single['losses'])),
      'losses_equal_across_processes': all(
          o['losses'] == outs[0]['losses'] for o in outs),
      'weights_max_diff_vs_single_process': weights_diff,
      'weights_bitwise_vs_single_process':
          outs[0]['weights_sha256'] == single['weights_sha256'],
  }
  print(json.dumps(result), flush=True)
  if args.json:
    with open(args.json, 'a') as f:
      f.write(json.dumps(result) + '\n')
  if not (result['bitwise_across_processes']
          and result['losses_equal_across_processes']):
    raise SystemExit('weights or losses differ across processes')


if __name__ == '__main__':
  if ARGS.child:
    _child(ARGS)
  elif ARGS.processes:
    multiprocess(ARGS)
  else:
    benchmark(ARGS)
