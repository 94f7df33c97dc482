"""Peak device memory of GRAIN steps against the mean-gradient step.

For the model of ``_gpt.py`` and each step (``mean``; ``grain`` = default
mode, per-group gradients by vmap + ``grain()``; ``lean`` =
``grain_value_and_grad``) at every m of ``--groups``:

* ``xla``: XLA's memory analysis of the compiled step (arguments + outputs -
  donated aliases + temporaries), no run needed;
* ``measured`` (``--measure``, GPU): the device's peak-bytes counter
  (``device.memory_stats()['peak_bytes_in_use']``) after a few steps, each
  step in a fresh process so that the counters do not mix.

Ratios are against the mean step. Usage:
  python benchmarks/memory.py --config full [--groups 2 4 8 16] [--measure]
      [--json out.jsonl]
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Allocate on demand, so the peak counters measure what the steps use and a
# child process finds the memory free.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax  # pylint: disable=g-import-not-at-top
import _gpt  # pylint: disable=g-import-not-at-top


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', choices=sorted(_gpt.CONFIGS), default='tiny')
  p.add_argument('--groups', type=int, nargs='+', default=[2, 4, 8, 16])
  p.add_argument('--modes', nargs='+', default=['grain', 'lean'])
  p.add_argument('--solver', default='exact')
  p.add_argument('--measure', action='store_true',
                 help='also run each step in a fresh process and read the '
                 "device's peak memory counter")
  p.add_argument('--child', nargs=2, metavar=('MODE', 'M'), default=None,
                 help=argparse.SUPPRESS)
  p.add_argument('--json', default=None)
  return p.parse_args(argv)


def _child(args):
  """Runs 3 steps of one mode and prints the device's peak bytes."""
  kind, m = args.child[0], int(args.child[1])
  cfg = _gpt.CONFIGS[args.config]
  loss_fn, params = _gpt.build(cfg)
  batch = _gpt.make_batch(cfg)
  step, tx = _gpt.make_step(kind, loss_fn, m, solver=args.solver)
  opt_state = tx.init(params)
  dev = jax.devices()[0]
  before = (dev.memory_stats() or {}).get('peak_bytes_in_use', 0)
  for _ in range(3):
    params, opt_state, loss = step(params, opt_state, batch)
  jax.block_until_ready((params, opt_state, loss))
  stats = dev.memory_stats() or {}
  print(json.dumps({'peak_bytes_in_use': stats.get('peak_bytes_in_use'),
                    'peak_before_steps': before,
                    'bytes_in_use': stats.get('bytes_in_use')}))


def _measure(args, kind, m):
  cmd = [sys.executable, os.path.abspath(__file__), '--config', args.config,
         '--solver', args.solver, '--child', kind, str(m)]
  res = subprocess.run(cmd, capture_output=True, text=True, check=False)
  for line in reversed(res.stdout.strip().splitlines()):
    if line.startswith('{'):
      return json.loads(line)
  print(res.stderr[-2000:], file=sys.stderr)
  return {}


def main(argv=None):
  args = _parse(argv)
  if args.child:
    return _child(args)
  cfg = _gpt.CONFIGS[args.config]
  info = _gpt.device_info()
  info.update(config=args.config, commit=_gpt.git_commit())
  print(json.dumps({'benchmark': 'memory', 'env': info}))
  loss_fn, params = _gpt.build(cfg)
  batch = _gpt.make_batch(cfg)
  rows = []
  runs = [('mean', 1)] + [(k, m) for m in args.groups for k in args.modes]
  base = base_measured = None
  for kind, m in runs:
    step, tx = _gpt.make_step(kind, loss_fn, m, solver=args.solver)
    opt_state = tx.init(params)
    mem = _gpt.memory_of(_gpt.compile_step(step, params, opt_state, batch))
    rec = {'benchmark': 'memory', 'config': args.config, 'mode': kind, 'm': m,
           'xla_peak_bytes': mem.get('peak'), 'xla_temp_bytes': mem.get('temp'),
           'xla_argument_bytes': mem.get('argument'),
           'device': info['device'], 'jax': info['jax']}
    if args.measure:
      rec['measured_peak_bytes'] = _measure(args, kind, m).get(
          'peak_bytes_in_use')
    if kind == 'mean':
      base = rec['xla_peak_bytes']
      base_measured = rec.get('measured_peak_bytes')
    rec['xla_ratio'] = rec['xla_peak_bytes'] / base if base else float('nan')
    if rec.get('measured_peak_bytes') and base_measured:
      rec['measured_ratio'] = rec['measured_peak_bytes'] / base_measured
    rows.append(rec)
    line = json.dumps(rec)
    print(line, flush=True)
    if args.json:
      with open(args.json, 'a') as f:
        f.write(line + '\n')
  table = [{'step': r['mode'] if r['mode'] == 'mean' else f"{r['mode']} m={r['m']}",
            'XLA peak GB': r['xla_peak_bytes'] / 1e9,
            'XLA temp GB': r['xla_temp_bytes'] / 1e9,
            'XLA ratio': r['xla_ratio'],
            'measured peak GB': (r.get('measured_peak_bytes') or float('nan')) / 1e9,
            'measured ratio': r.get('measured_ratio', float('nan'))}
           for r in rows]
  _gpt.print_table(table, ['step', 'XLA peak GB', 'XLA temp GB', 'XLA ratio',
                           'measured peak GB', 'measured ratio'],
                   title=f'Peak device memory, {info["device"]}, jax '
                   f'{info["jax"]}, {args.config} config')
  return rows


if __name__ == '__main__':
  main()
