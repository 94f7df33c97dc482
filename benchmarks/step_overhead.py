"""Step time of GRAIN against a plain mean-gradient step on a GPT-style LM.

For the model of ``_gpt.py`` (full: 91.5 M parameters, batch 32 x 256, bf16
matmuls, fp32 params, AdamW, fused attention) it times

* ``mean``: the ordinary step (``jax.value_and_grad`` + AdamW);
* ``grain``: the default GRAIN mode, per-group gradients by ``vmap`` then
  ``optax.chain(grain_optax.grain(num_groups=m), adamw)``;
* ``lean``: ``grain_optax.grain_value_and_grad`` (Gram pass + weighted-loss
  backward pass) then AdamW;

for every m in ``--groups``. Each time is the median over ``--reps``
repetitions of ``--inner`` steps dispatched back to back (one block at the
end), after warm-up. With ``--pieces`` it also times the parts of a GRAIN
step (per-group gradients, Gram, solve, GRAIN+AdamW update) and, with
``--profile``, reads the device kernels of one step from ``jax.profiler``
(busy time and time per kernel category), to say where the overhead goes.

Usage:
  python benchmarks/step_overhead.py --config full [--groups 2 4 8 16]
      [--modes grain lean] [--pieces 4 8] [--profile 4 8] [--json out.jsonl]

Prints a table; writes one JSON line per measurement to ``--json`` (and the
summary as the last line of stdout).
"""

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import optax

import _gpt  # pylint: disable=g-import-not-at-top
import grain_optax


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', choices=sorted(_gpt.CONFIGS), default='tiny')
  p.add_argument('--groups', type=int, nargs='+', default=[2, 4, 8, 16])
  p.add_argument('--modes', nargs='+', default=['grain', 'lean'],
                 help="'grain', 'monitor' (grain(apply='mean')), 'lean', or "
                 "'grain+xla' / 'lean+xla' (the Gram by XLA's dots, no kernel)")
  p.add_argument('--gram_accuracy', type=int, nargs='*', default=[],
                 help='m values at which to compare the Gram variants with '
                 'the library Gram on real per-group gradients')
  p.add_argument('--split_accuracy', type=int, nargs='*', default=[],
                 help='m values at which to compare the per-group gradients '
                 'and weights with split_sums on and off')
  p.add_argument('--gram_times', type=int, nargs='*', default=[],
                 help='time each experimental Gram variant alone at these m')
  p.add_argument('--gram_variants', nargs='*', default=None,
                 help='the variants --gram_times times (default: all)')
  p.add_argument('--gram_tune', type=int, nargs='*', default=[],
                 help='time the Gram kernel under other block settings')
  p.add_argument('--solver', default='exact')
  p.add_argument('--inner', type=int, default=None)
  p.add_argument('--reps', type=int, default=None)
  p.add_argument('--pieces', type=int, nargs='*', default=[])
  p.add_argument('--profile', type=int, nargs='*', default=[])
  p.add_argument('--json', default=None, help='append JSON lines here')
  p.add_argument('--dump_hlo', default=None,
                 help='write the optimised HLO of every step to this folder')
  p.add_argument('--lowered_for', default=None, metavar='PLATFORM',
                 help='run nothing: lower every step for PLATFORM (cuda works '
                 'on a CPU-only machine) and write its StableHLO, source '
                 'locations stripped, to the --dump_hlo folder, so that two '
                 'commits can be compared with diff')
  return p.parse_args(argv)


def _emit(record, path):
  line = json.dumps(record)
  if path:
    with open(path, 'a') as f:
      f.write(line + '\n')
  return line


def _copy(tree):
  return jax.tree_util.tree_map(jnp.copy, tree)


def _time_fn(fn, args, inner, reps):
  """Median ms per call of a jitted fn (no donation), calls back to back."""
  import statistics  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) * 1e3 / inner)
  return statistics.median(times)


def gram_grouped(per_group, small=1 << 20):
  """Experimental Gram: leaves under ``small`` elements concatenated first.

  One ``[m, P_small]`` product for all small leaves (biases, LayerNorm
  scales) instead of one small product each; the large leaves as in
  :func:`grain_optax.gram_matrix`.
  """
  leaves = jax.tree_util.tree_leaves(per_group)
  m = leaves[0].shape[0]
  big = [x for x in leaves if x[0].size >= small]
  tiny = [x.reshape(m, -1) for x in leaves if x[0].size < small]
  if tiny:
    big.append(jnp.concatenate(tiny, axis=1))
  return grain_optax.gram_matrix(big)


def split_accuracy(loss_fn, params, batch, m):
  """GRAIN's Gram and weights with ``split_sums`` on and off, on real grads.

  Per-group gradients three ways: the default (two-stage sums), one-stage
  sums (``split_sums=False``), and float32 gradients with one-stage sums
  (``grad_dtype='params'``). Returns the largest weight difference and the
  Gram difference (relative to max diag K) of the default against the
  one-stage path, the KKT residual of the default's weights on the
  one-stage Gram, and both paths' weight differences from the float32 one.
  """
  def gram_and_weights(**kw):
    _, g = jax.jit(grain_optax.group_value_and_grad(loss_fn, m, **kw))(
        params, batch)
    k = jax.jit(grain_optax.gram_matrix)(g)
    return k, grain_optax.min_norm_weights(k).weights

  k2, w2 = gram_and_weights(split_sums=True)  # the GPU's default
  k1, w1 = gram_and_weights(split_sums=False)
  k32, w32 = gram_and_weights(split_sums=False, grad_dtype='params')
  scale = jnp.max(jnp.diagonal(k1))
  return {
      'weights_diff': float(jnp.max(jnp.abs(w2 - w1))),
      'gram_rel_diff': float(jnp.max(jnp.abs(k2 - k1)) / scale),
      'kkt_on_one_stage': float(grain_optax.kkt_residual(k1, w2)),
      'weights_diff_vs_f32': float(jnp.max(jnp.abs(w2 - w32))),
      'one_stage_weights_diff_vs_f32': float(jnp.max(jnp.abs(w1 - w32))),
      'weights': [float(x) for x in w2],
  }


def pieces(loss_fn, params, batch, m, inner, reps, solver):
  """Times of the parts of a GRAIN step at m groups, in ms."""
  tx_adam = _gpt.adamw()
  adam_state = tx_adam.init(params)
  tx = optax.chain(grain_optax.grain(num_groups=m, solver=solver),
                   _gpt.adamw())
  state = tx.init(params)
  mean_grad = jax.jit(jax.value_and_grad(loss_fn))
  group_grad = jax.jit(grain_optax.group_value_and_grad(loss_fn, m))
  gram = jax.jit(grain_optax.gram_matrix)
  solve = jax.jit(lambda k: grain_optax.min_norm_weights(k, solver=solver))
  combine = jax.jit(grain_optax.combine)
  update = jax.jit(tx.update)
  adam_update = jax.jit(tx_adam.update)
  _, grads = mean_grad(params, batch)
  _, per_group = group_grad(params, batch)
  k = gram(per_group)
  w = solve(k).weights
  out = {
      'mean_value_and_grad': _time_fn(mean_grad, (params, batch), inner, reps),
      'adamw_update': _time_fn(adam_update, (grads, adam_state, params),
                               inner, reps),
      'group_value_and_grad': _time_fn(group_grad, (params, batch), inner,
                                       reps),
      'gram_matrix': _time_fn(gram, (per_group,), inner, reps),
      'gram_grouped': _time_fn(jax.jit(gram_grouped), (per_group,), inner,
                               reps),
      'gram_matrix_bf16_input': _time_fn(
          gram, (jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16),
                                        per_group),), inner, reps),
      'min_norm_weights': _time_fn(solve, (k,), inner, reps),
      'combine': _time_fn(combine, (per_group, w), inner, reps),
      'grain_adamw_update': _time_fn(update, (per_group, state, params),
                                     inner, reps),
  }
  out['bytes_per_group_gradients'] = int(sum(
      x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(per_group)))
  out['gram_leaves'] = len(jax.tree_util.tree_leaves(per_group))
  return out


def main(argv=None):
  args = _parse(argv)
  cfg = _gpt.CONFIGS[args.config]
  full = args.config == 'full'
  inner = args.inner or (10 if full else 2)
  reps = args.reps or (7 if full else 2)
  info = _gpt.device_info()
  info.update(config=args.config, commit=_gpt.git_commit(), inner=inner,
              reps=reps, solver=args.solver)
  print(json.dumps({'benchmark': 'step_overhead', 'env': info}))
  loss_fn, params = _gpt.build(cfg)
  batch = _gpt.make_batch(cfg)
  nparams = _gpt.num_params(params)
  print(f'# {info["device"]}  jax {info["jax"]}  params {nparams/1e6:.1f} M  '
        f'batch {cfg.batch} x {cfg.seq}')

  rows = []
  runs = [('mean', 1)] + [(mode, m) for m in args.groups for mode in args.modes]
  if args.lowered_for:
    if not args.dump_hlo:
      raise SystemExit('--lowered_for needs --dump_hlo FOLDER')
    os.makedirs(args.dump_hlo, exist_ok=True)
    for kind, m in runs:
      step, tx = _gpt.make_step(kind, loss_fn, m, solver=args.solver)
      text = step.trace(params, jax.eval_shape(tx.init, params), batch).lower(
          lowering_platforms=(args.lowered_for,)).as_text()
      text = re.sub(r'loc\([^)]*\)|#loc[0-9]*', '', text)
      name = ''.join(c if c.isalnum() else '-' for c in kind)
      path = os.path.join(args.dump_hlo, f'{name}_m{m}.{args.lowered_for}.mlir')
      with open(path, 'w') as f:
        f.write(text)
      print(f'{path}: {text.count(chr(10))} lines')
    return []
  base = None
  for kind, m in runs:
    step, tx = _gpt.make_step(kind, loss_fn, m, solver=args.solver)
    p = _copy(params)
    s = tx.init(p)
    compiled = _gpt.compile_step(step, p, s, batch)
    mem = _gpt.memory_of(compiled)
    if args.dump_hlo:
      os.makedirs(args.dump_hlo, exist_ok=True)
      name = ''.join(c if c.isalnum() else '-' for c in kind)
      with open(os.path.join(args.dump_hlo, f'{name}_m{m}.hlo.txt'), 'w') as f:
        f.write(compiled.as_text())
    ms, lo, hi, p, s = _gpt.time_steps(compiled, p, s, batch, inner=inner,
                                       reps=reps)
    if kind == 'mean':
      base = ms
      base_mem = mem.get('peak', float('nan'))
    rec = {'benchmark': 'step_overhead', 'config': args.config, 'mode': kind,
           'm': m, 'ms': ms, 'ms_min': lo, 'ms_max': hi, 'ratio': ms / base,
           'peak_bytes': mem.get('peak'), 'temp_bytes': mem.get('temp'),
           'mem_ratio': mem.get('peak', float('nan')) / base_mem,
           'bytes_accessed': _gpt.bytes_accessed(compiled),
           'device': info['device'], 'jax': info['jax']}
    if m in args.profile or (kind == 'mean' and args.profile):
      holder = [p, s]

      def run(compiled=compiled, holder=holder):
        holder[0], holder[1], loss = compiled(holder[0], holder[1], batch)
        return loss
      rec['profile'] = _gpt.profile_device(run, steps=3)
      p, s = holder
    rows.append(rec)
    print(_emit(rec, args.json), flush=True)
    del p, s, compiled

  table = [{'step': r['mode'] if r['mode'] == 'mean' else f"{r['mode']} m={r['m']}",
            'ms': r['ms'], 'ratio': r['ratio'],
            'ms (min-max)': f"{r['ms_min']:.2f}-{r['ms_max']:.2f}",
            'peak GB': (r['peak_bytes'] or 0) / 1e9, 'mem ratio': r['mem_ratio'],
            'GB accessed (XLA)': r['bytes_accessed'] / 1e9,
            'device busy ms': r.get('profile', {}).get('busy_ms', float('nan'))}
           for r in rows]
  _gpt.print_table(table, ['step', 'ms', 'ratio', 'ms (min-max)', 'peak GB',
                           'mem ratio', 'GB accessed (XLA)', 'device busy ms'],
                   title=f'Step time, {info["device"]}, jax {info["jax"]}, '
                   f'{args.config} config ({nparams/1e6:.1f} M params)')
  for r in rows:
    prof = r.get('profile')
    if prof:
      name = r['mode'] if r['mode'] == 'mean' else f"{r['mode']} m={r['m']}"
      cats = ', '.join(f'{k} {v:.2f}' for k, v in prof['category_ms'].items())
      print(f'profile {name}: busy {prof["busy_ms"]:.2f} ms, '
            f'{prof["kernels"]:.0f} kernels; {cats}')

  piece_rows = []
  for m in args.pieces:
    pr = pieces(loss_fn, params, batch, m, inner, reps, args.solver)
    rec = {'benchmark': 'step_pieces', 'config': args.config, 'm': m, **pr,
           'device': info['device'], 'jax': info['jax']}
    piece_rows.append(rec)
    print(_emit(rec, args.json), flush=True)
  if piece_rows:
    cols = ['m', 'mean_value_and_grad', 'group_value_and_grad', 'gram_matrix',
            'gram_grouped', 'gram_matrix_bf16_input', 'min_norm_weights', 'combine', 'adamw_update',
            'grain_adamw_update']
    _gpt.print_table(piece_rows, cols, title='Pieces of a step (ms each)')

  for m in args.gram_times:
    import _gram_variants  # pylint: disable=g-import-not-at-top
    _, per_group = jax.jit(grain_optax.group_value_and_grad(loss_fn, m))(
        params, batch)
    interp = info['platform'] != 'gpu'
    times = {'library': _time_fn(jax.jit(grain_optax.gram_matrix),
                                 (per_group,), inner, reps)}
    for name in args.gram_variants or _gram_variants.VARIANTS:
      try:
        times[name] = _time_fn(jax.jit(_gram_variants.make_gram(name, interp)),
                               (per_group,), inner, reps)
      except Exception as e:  # pylint: disable=broad-except
        times[name] = f'{type(e).__name__}: {e}'[:200]
    rec = {'benchmark': 'gram_times', 'config': args.config, 'm': m,
           'ms': times, 'bytes': int(sum(
               x.size * x.dtype.itemsize
               for x in jax.tree_util.tree_leaves(per_group))),
           'device': info['device'], 'jax': info['jax']}
    print(_emit(rec, args.json), flush=True)
    print(f'gram times m={m} (ms): ' + ', '.join(
        f'{k} {v:.3f}' if isinstance(v, float) else f'{k} {v}'
        for k, v in times.items()))

  for m in args.gram_tune:
    import dataclasses  # pylint: disable=g-import-not-at-top
    from grain_optax._src import gram as gram_lib  # pylint: disable=g-import-not-at-top
    from grain_optax._src import gram_kernel  # pylint: disable=g-import-not-at-top
    _, per_group = jax.jit(grain_optax.group_value_and_grad(loss_fn, m))(
        params, batch)
    leaves = tuple(jax.tree_util.tree_leaves(per_group))
    # Each trial is a KernelConfig passed to the kernel (nothing in the
    # library is changed); the records keep the former constants' names.
    names = {'CHUNK': 'chunk', 'NUM_WARPS': 'num_warps',
             'NUM_STAGES': 'num_stages', 'MIN_PROGRAMS': 'min_programs',
             'MAX_SPAN': 'max_span'}
    default = {n: getattr(gram_kernel.DEFAULT, f) for n, f in names.items()}
    trials = [dict(default, CHUNK=c, NUM_WARPS=w)
              for c in (64, 128, 256) for w in (2, 4, 8)]
    trials += [dict(default, NUM_STAGES=s) for s in (2, 4)]
    trials += [dict(default, MIN_PROGRAMS=n) for n in (128, 256, 1024, 2048)]
    trials += [dict(default, MAX_SPAN=n) for n in (2048, 32768)]
    for trial in trials:
      config = dataclasses.replace(
          gram_kernel.DEFAULT, **{names[n]: v for n, v in trial.items()})
      try:
        ms = _time_fn(jax.jit(lambda t, c=config: gram_lib.kernel_gram(
            t, False, c)), (leaves,), inner, reps)
      except Exception as e:  # pylint: disable=broad-except
        ms = f'{type(e).__name__}: {e}'[:160]
      rec = {'benchmark': 'gram_tune', 'm': m, 'settings': trial, 'ms': ms,
             'device': info['device'], 'jax': info['jax']}
      print(_emit(rec, args.json), flush=True)
      print(f'gram tune m={m} {trial}: {ms}')

  for m in args.gram_accuracy:
    import _gram_variants  # pylint: disable=g-import-not-at-top
    _, per_group = jax.jit(grain_optax.group_value_and_grad(loss_fn, m))(
        params, batch)
    acc = _gram_variants.gram_accuracy(
        per_group, interpret=info['platform'] != 'gpu')
    rec = {'benchmark': 'gram_accuracy', 'config': args.config, 'm': m,
           'variants': acc, 'device': info['device'], 'jax': info['jax']}
    print(_emit(rec, args.json), flush=True)
    for name, v in acc.items():
      if 'error' in v:
        print(f'gram accuracy m={m} {name}: {v["error"]}')
        continue
      print(f"gram accuracy m={m} {name}: gram_err {v['gram_err']:.2e}, "
            f"KKT of its weights on the exact Gram {v['kkt_on_reference']:.2e}")

  for m in args.split_accuracy:
    rec = {'benchmark': 'split_accuracy', 'config': args.config, 'm': m,
           **split_accuracy(loss_fn, params, batch, m),
           'device': info['device'], 'jax': info['jax']}
    print(_emit(rec, args.json), flush=True)
    print(f"split_sums m={m}: weights max diff {rec['weights_diff']:.2e}, "
          f"KKT on the one-stage Gram {rec['kkt_on_one_stage']:.2e}, "
          f"Gram rel diff {rec['gram_rel_diff']:.2e}; vs float32 grads: "
          f"weights {rec['weights_diff_vs_f32']:.2e} (one-stage "
          f"{rec['one_stage_weights_diff_vs_f32']:.2e})")

  summary = {'benchmark': 'step_overhead_summary', 'config': args.config,
             'device': info['device'], 'jax': info['jax'],
             'ratios': {f"{r['mode']}_m{r['m']}": round(r['ratio'], 4)
                        for r in rows if r['mode'] != 'mean'},
             'mean_ms': base}
  print(_emit(summary, args.json))
  return rows


if __name__ == '__main__':
  main()
