"""Device time of a bias gradient's reduction, whole batch vs per group.

Issue 13's profile of the GPT step (benchmarks/RESULTS.md, section 1e) found
most of GRAIN's remaining overhead in XLA's code for the per-group bias and
LayerNorm gradients of the user's backward pass: under ``vmap`` a bias
gradient is a reduction of ``[m, n, d]`` over ``n`` (kept ``[m, d]``), fused
by XLA with the element-wise work that produces the residual stream's
gradient. This script isolates that pattern on its own, with the shapes of
the GPT (``N = 32 * 256`` tokens, ``d = 768``), and times, per call (device
busy time from ``jax.profiler``):

* ``mean``: ``out = a + (b * s)``, ``bias = sum(a, axis=0)`` over ``[N, d]``;
* ``group``: the same on ``[m, N/m, d]``, ``bias = sum(a, axis=1)``;
* ``group_split``: the per-group sum in two stages, ``[m, k, N/(m k), d]``
  summed over axis 2 in float32, an optimization barrier, then over ``k``;
* ``elementwise``: ``out`` alone, no reduction (what the bytes cost).

Without a device profile (on a CPU) each time is the wall-clock median of
20 calls instead.

``--step_tokens T`` also times whole per-group gradients,
``jax.jit(group_value_and_grad(loss, m, split_sums=...))`` with ``True`` and
``False``, on a small GPT of ``_gpt.py`` (``--step_width`` wide, 2 layers,
``T`` tokens), the two interleaved (wall clock): whether the rewrite pays on
this device (``split_sums='auto'`` turns it on on GPUs only).

    python benchmarks/group_reductions.py [--groups 4 8] [--json out.jsonl]
    python benchmarks/group_reductions.py --step_tokens 8192 [--step_width 256]

Prints a table and one JSON line per row.
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

import _gpt  # pylint: disable=g-import-not-at-top


def _fns(m: int, split: int):
  """The variants as ``f(a, b, s) -> (out, bias)``, inputs ``[N, d]``."""

  def elementwise(a, b, s):
    return a + (b.astype(jnp.float32) * s[:, None]).astype(a.dtype), None

  def mean(a, b, s):
    out, _ = elementwise(a, b, s)
    return out, jnp.sum(a, axis=0, dtype=jnp.float32).astype(a.dtype)

  def group(a, b, s):
    out, _ = elementwise(a, b, s)
    g = a.reshape(m, -1, a.shape[-1])
    return out, jnp.sum(g, axis=1, dtype=jnp.float32).astype(a.dtype)

  def group_split(a, b, s):
    out, _ = elementwise(a, b, s)
    g = a.reshape(m, split, -1, a.shape[-1])
    part = jax.lax.optimization_barrier(jnp.sum(g, axis=2, dtype=jnp.float32))
    return out, jnp.sum(part, axis=1).astype(a.dtype)

  return {'elementwise': elementwise, 'mean': mean, 'group': group,
          'group_split': group_split}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--tokens', type=int, default=32 * 256)
  p.add_argument('--width', type=int, nargs='+', default=[768, 3072])
  p.add_argument('--groups', type=int, nargs='+', default=[4, 8])
  p.add_argument('--split', type=int, default=16,
                 help='k, the first stage of group_split')
  p.add_argument('--step_tokens', type=int, default=0,
                 help='tokens of the split_sums step comparison (0: none)')
  p.add_argument('--step_width', type=int, default=256)
  p.add_argument('--step_dtype', default='float32')
  p.add_argument('--step_reps', type=int, default=10)
  p.add_argument('--json', default=None)
  args = p.parse_args(argv)
  info = _gpt.device_info()
  rows = []
  for d in args.width:
    ka, kb, ks = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(ka, (args.tokens, d), jnp.bfloat16)
    b = jax.random.normal(kb, (args.tokens, d), jnp.bfloat16)
    s = jax.random.normal(ks, (args.tokens,), jnp.float32)
    for m in args.groups:
      fns = _fns(m, args.split)
      ref = jax.jit(fns['group'])(a, b, s)[1].astype(jnp.float32)
      for name, fn in fns.items():
        if m != args.groups[0] and name in ('mean', 'elementwise'):
          continue
        f = jax.jit(fn)
        err = 0.0
        if name.startswith('group'):
          err = float(jnp.max(jnp.abs(f(a, b, s)[1].astype(jnp.float32)
                                      - ref)))
        prof = _gpt.profile_device(lambda f=f: f(a, b, s), steps=20)
        if prof:
          us = prof['busy_ms'] * 1e3
        else:  # no device profile (CPU): the wall-clock median of 20 calls
          times = []
          for _ in range(20):
            start = time.perf_counter()
            jax.block_until_ready(f(a, b, s))
            times.append(time.perf_counter() - start)
          us = statistics.median(times) * 1e6
        nbytes = 3 * a.size * a.dtype.itemsize  # read a, b; write out
        rec = {'benchmark': 'group_reductions', 'variant': name,
               'timing': 'device busy' if prof else 'wall clock',
               'm': 1 if name in ('mean', 'elementwise') else m,
               'tokens': args.tokens, 'width': d, 'us': us,
               'GB_per_s': nbytes / (us * 1e-6) / 1e9 if us == us else None,
               'kernels': prof.get('kernels'), 'max_abs_diff_vs_group': err,
               'device': info['device'], 'jax': info['jax']}
        rows.append(rec)
        line = json.dumps(rec)
        print(line, flush=True)
        if args.json:
          with open(args.json, 'a') as fh:
            fh.write(line + '\n')
  _gpt.print_table(
      [{'width': r['width'], 'variant': r['variant'], 'm': r['m'],
        'us': r['us'], 'GB/s': r['GB_per_s'], 'kernels': r['kernels']}
       for r in rows],
      ['width', 'variant', 'm', 'us', 'GB/s', 'kernels'],
      title=f'Bias-gradient reduction, {info["device"]}, jax {info["jax"]}')
  if args.step_tokens:
    rows += _split_sums_steps(args, info)
  return rows


def _split_sums_steps(args, info):
  """Per-group gradients of a small GPT with and without split_sums."""
  import grain_optax  # pylint: disable=g-import-not-at-top
  seq = 128
  cfg = _gpt.Config(vocab=512, seq=seq, d_model=args.step_width, layers=2,
                    heads=4, batch=max(1, args.step_tokens // seq),
                    dtype=args.step_dtype)
  loss_fn, params = _gpt.build(cfg)
  batch = _gpt.make_batch(cfg)
  rows = []
  for m in args.groups:
    fns, barriers, times = {}, {}, {False: [], True: []}
    for split in (False, True):
      f = jax.jit(grain_optax.group_value_and_grad(loss_fn, m,
                                                   split_sums=split))
      barriers[split] = f.lower(params, batch).as_text().count(
          'optimization_barrier')
      jax.block_until_ready(f(params, batch))  # compile and warm up
      fns[split] = f
    # Wall clock, the two variants interleaved in alternating order, so that
    # a load that changes during the run (a shared machine) hits both alike.
    for r in range(args.step_reps):
      for split in ((False, True) if r % 2 == 0 else (True, False)):
        start = time.perf_counter()
        jax.block_until_ready(fns[split](params, batch))
        times[split].append(time.perf_counter() - start)
    for split in (False, True):
      rec = {'benchmark': 'split_sums_step', 'm': m, 'split_sums': split,
             'timing': 'wall clock, median, interleaved',
             'reps': args.step_reps, 'tokens': cfg.batch * seq,
             'width': cfg.d_model, 'dtype': cfg.dtype,
             'us': statistics.median(times[split]) * 1e6,
             'min_us': min(times[split]) * 1e6,
             'barriers': barriers[split],
             'device': info['device'], 'jax': info['jax']}
      rows.append(rec)
      line = json.dumps(rec)
      print(line, flush=True)
      if args.json:
        with open(args.json, 'a') as fh:
          fh.write(line + '\n')
  _gpt.print_table(
      [{'m': r['m'], 'split_sums': r['split_sums'], 'barriers': r['barriers'],
        'us': r['us'], 'ratio': r['us'] / next(
            q['us'] for q in rows if q['m'] == r['m'] and not q['split_sums'])}
       for r in rows],
      ['m', 'split_sums', 'barriers', 'us', 'ratio'],
      title=(f'Per-group gradients with and without split_sums '
             f'({rows[0]["tokens"]} tokens, width {cfg.d_model}, '
             f'{cfg.dtype}), {info["device"]}, jax {info["jax"]}'))
  return rows


if __name__ == '__main__':
  main()
