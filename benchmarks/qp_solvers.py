"""Min-norm simplex QP: every solver's time, iterations and KKT residual.

For m in ``--sizes`` and two families of float32 Gram matrices K = G G^T of m
group gradients of dimension P:

* ``noise``: g_i = mu + s_i * eps_i (a shared mean plus independent noise of
  different sizes, P = 8192), like the groups of one mini-batch; the
  min-norm point has full support;
* ``conflict``: independent random g_i of a low dimension P = max(2, m / 2),
  so the minimiser sits on a face of the simplex (some weights zero); the
  exact solver must fall back to its active set.

Each solver of ``grain_optax.SOLVERS`` is jitted once per m and called on
``--grams`` different matrices. Reported per (solver, family, m): median wall
time of a blocking call (dispatch included), the median device time of one
call from ``jax.profiler`` on a GPU (first kernel to last kernel of the
program, host synchronisations inside it included), the median iterations,
and the worst relative KKT residual max_i (w'Kw - (Kw)_i) / max_i K_ii,
recomputed in float64 on the host.

Usage: python benchmarks/qp_solvers.py --config full [--sizes 2 4 ...]
           [--solvers exact 'exact[xla]' projected_gradient] [--json out.jsonl]
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

import _gpt  # pylint: disable=g-import-not-at-top
import grain_optax


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', choices=['tiny', 'full'], default='tiny')
  p.add_argument('--sizes', type=int, nargs='+', default=None)
  p.add_argument('--solvers', nargs='+', default=list(grain_optax.SOLVERS))
  p.add_argument('--families', nargs='+', default=['noise', 'conflict'])
  p.add_argument('--grams', type=int, default=None,
                 help='different Gram matrices per cell')
  p.add_argument('--budget_s', type=float, default=None,
                 help='wall-clock budget for the timed calls of one cell')
  p.add_argument('--experimental', action='store_true',
                 help='also time the exact solver with its XLA implementation '
                 'forced (the default on a GPU is one Pallas kernel)')
  p.add_argument('--json', default=None)
  return p.parse_args(argv)


EXPERIMENTS = ('exact[xla]',)


def make_solver(name):
  """A jitted ``k -> MinNormSolution`` for ``name``.

  ``'exact[xla]'`` is the exact solver with its XLA implementation forced
  (on a GPU the default runs it as one Pallas kernel).
  """
  if name in grain_optax.SOLVERS:
    return jax.jit(lambda k: grain_optax.min_norm_weights(k, solver=name))
  base, backend = name[:-1].split('[')
  return jax.jit(lambda k: grain_optax.min_norm_weights(
      k, solver=base, exact_backend=backend))


def make_grams(family, m, count, seed=0):
  """``count`` float32 [m, m] Gram matrices of the given family."""
  rng = np.random.default_rng(seed + 1000 * m + (0 if family == 'noise' else 7))
  out = []
  for _ in range(count):
    if family == 'noise':
      p = 8192
      mu = rng.normal(size=(1, p)) * 0.5
      g = mu + rng.uniform(0.5, 2.0, size=(m, 1)) * rng.normal(size=(m, p))
    elif family == 'conflict':
      p = max(2, m // 2)
      g = rng.normal(size=(m, p)) * rng.uniform(0.2, 2.0, size=(m, 1))
    else:
      raise ValueError(family)
    out.append((g @ g.T).astype(np.float32))
  return out


def kkt64(k, w):
  k = np.asarray(k, np.float64)
  s = np.max(np.diag(k))
  k = k / s if s > 0 else k
  w = np.asarray(w, np.float64)
  kw = k @ w
  return float(max(np.max(w @ kw - kw), 0.0))


def device_ms(fn, k, calls=10):
  """Median device span (ms) of one call, from the profiler; nan on CPU."""
  spans = []
  import glob  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  d = tempfile.mkdtemp(prefix='grain_qp_')
  with jax.profiler.trace(d):
    for _ in range(calls):
      jax.block_until_ready(fn(k))
      time.sleep(0.002)  # separate the calls on the device timeline
  files = glob.glob(os.path.join(d, '**', '*.xplane.pb'), recursive=True)
  if not files:
    return float('nan')
  events = []
  for plane in ProfileData.from_file(files[0]).planes:
    if not plane.name.startswith('/device:GPU'):
      continue
    for line in plane.lines:
      lname = line.name.lower()
      if 'stream' in lname and 'xla' not in lname:
        events.extend((e.start_ns, e.end_ns) for e in line.events)
  if not events:
    return float('nan')
  events.sort()
  # Split into calls at gaps of more than 1 ms (the sleeps above).
  groups, cur = [], [events[0]]
  for ev in events[1:]:
    if ev[0] - max(e for _, e in cur) > 1e6:
      groups.append(cur)
      cur = [ev]
    else:
      cur.append(ev)
  groups.append(cur)
  spans = [(max(e for _, e in g) - g[0][0]) * 1e-6 for g in groups]
  return statistics.median(spans)


def main(argv=None):
  args = _parse(argv)
  full = args.config == 'full'
  sizes = args.sizes or ([2, 4, 8, 16, 32, 64, 128] if full else [2, 4, 8])
  ngrams = args.grams or (8 if full else 2)
  budget = args.budget_s or (2.0 if full else 0.2)
  info = _gpt.device_info()
  info.update(config=args.config, commit=_gpt.git_commit())
  print(json.dumps({'benchmark': 'qp_solvers', 'env': info}))
  on_gpu = info['platform'] == 'gpu'
  rows = []
  names = list(args.solvers) + (list(EXPERIMENTS) if args.experimental else [])
  for family in args.families:
    for m in sizes:
      grams = [jnp.asarray(k) for k in make_grams(family, m, ngrams)]
      for solver in names:
        fn = make_solver(solver)
        t0 = time.perf_counter()
        try:
          sols = [jax.block_until_ready(fn(k)) for k in grams]
        except Exception as e:  # pylint: disable=broad-except
          print(json.dumps({'benchmark': 'qp_solvers', 'solver': solver,
                            'm': m, 'error': f'{type(e).__name__}: {e}'[:400]}))
          continue
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for k in grams:
          jax.block_until_ready(fn(k))
        per_call = (time.perf_counter() - t0) / len(grams)
        rounds = int(max(1, min(50, budget / max(per_call * len(grams), 1e-9))))
        times = []
        for _ in range(rounds):
          for k in grams:
            t0 = time.perf_counter()
            jax.block_until_ready(fn(k))
            times.append((time.perf_counter() - t0) * 1e3)
        rec = {
            'benchmark': 'qp_solvers', 'config': args.config,
            'solver': solver, 'family': family, 'm': m,
            'ms': statistics.median(times), 'calls': len(times),
            # Slow solvers (jaxopt's loop syncs with the host every step) are
            # not profiled: their trace is huge and wall time ~ device time.
            'device_ms': (device_ms(fn, grams[0]) if on_gpu and
                          per_call < 0.005 else float('nan')),
            'iterations': float(np.median([int(s.num_iterations) for s in sols])),
            'max_iterations': int(max(int(s.num_iterations) for s in sols)),
            'kkt': max(kkt64(k, s.weights) for k, s in zip(grams, sols)),
            'kkt_reported': max(float(s.kkt_residual) for s in sols),
            'support': float(np.median([int(np.sum(np.asarray(s.weights) > 0))
                                        for s in sols])),
            'compile_s': compile_s,
            'device': info['device'], 'jax': info['jax']}
        rows.append(rec)
        line = json.dumps(rec)
        print(line, flush=True)
        if args.json:
          with open(args.json, 'a') as f:
            f.write(line + '\n')

  for family in args.families:
    table = []
    for m in sizes:
      row = {'m': m}
      for r in rows:
        if r['family'] == family and r['m'] == m:
          s = r['solver']
          row[f'{s} ms'] = r['ms']
          row[f'{s} dev ms'] = r['device_ms']
          row[f'{s} it'] = r['iterations']
          row[f'{s} kkt'] = r['kkt']
      table.append(row)
    cols = ['m'] + [f'{s} {c}' for s in names
                    for c in ('ms', 'dev ms', 'it', 'kkt')]
    _gpt.print_table(table, cols, title=f'QP solvers, family {family!r}, '
                     f'{info["device"]}, jax {info["jax"]} (ms: wall per '
                     'call; dev ms: device span; it: iterations; kkt: worst '
                     'relative KKT residual, float64)')
  return rows


if __name__ == '__main__':
  main()
