"""Where the host time of a short training step goes (issue 23).

Builds the MiniLM fine-tuning step of ``finetune_step_time.py`` (full or
LoRA, mean, GRAIN or monitor), times it by wall clock, and records a
``jax.profiler`` trace of a few steps. From the trace it reports, per step:
device busy time and kernel count (GPU planes), and on the host planes every
event name with its count and total time, e.g. kernel and graph launches,
stream synchronisations and device-to-host copies (``cuLaunchKernel``,
``cuGraphLaunch``, ``cuStreamSynchronize``, ``cuMemcpyDtoH``), and XLA's
thunks. Launches and synchronisations per step say whether a step is bound by
kernel launches or by host round trips.

    python benchmarks/host_profile.py --mode lora --method grain --groups 4
    python benchmarks/host_profile.py --tiny      # CPU smoke run

Prints a table and one JSON line (``--json`` appends it to a file too).
"""

import argparse
import glob
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent
                       / 'examples'))
import _gpt  # pylint: disable=g-import-not-at-top,wrong-import-position
import finetune_text  # pylint: disable=g-import-not-at-top,wrong-import-position


def add_aliasing_arguments(p):
  """How the step's state and metrics are passed: ``--keep-unused`` and
  ``--metrics-in-state`` (shared with ``finetune_step_time.py``)."""
  p.add_argument('--keep-unused', action='store_true',
                 help="jax.jit(keep_unused=True) for the step: the state's "
                 'write-only leaves stay inputs, donated and aliased')
  p.add_argument('--metrics-in-state', action='store_true',
                 help='the metrics travel in the donated state (every output '
                 'of the step aliased to a donated input)')
  p.add_argument('--stats', choices=('metrics', 'state', 'packed'),
                 default='metrics',
                 help="GRAIN's logged cosines as outputs of the step "
                 "('metrics'), read from the donated state ('state'), or "
                 "outputs stacked with the loss into one vector ('packed')")


def metrics_options(args):
  """``make_train_step``'s options for how the step returns its metrics,
  from ``--keep-unused``, ``--metrics-in-state`` and ``--stats``."""
  return {'keep_unused': args.keep_unused,
          'metrics_in_state': args.metrics_in_state,
          'stats_in_metrics': args.stats != 'state',
          'pack_metrics': args.stats == 'packed'}


def step_loss(args, method, state, metrics):
  """The loss of the step's last call, wherever ``args`` put it (of the
  call's last step, where a call runs several)."""
  if args.metrics_in_state:
    return state[-len(finetune_text.metric_names(method,
                                                 args.stats != 'state'))]
  if args.stats == 'packed':
    return np.reshape(np.asarray(metrics['packed'])[..., 0], (-1,))[-1]
  return np.reshape(np.asarray(metrics['loss']), (-1,))[-1]


def add_step_arguments(p):
  """The options of the step that :func:`build` makes, and the common ones.

  Shared with ``command_buffers.py``, which builds the same step.
  """
  p.add_argument('--mode', choices=('full', 'lora'), default='lora')
  p.add_argument('--method', choices=('mean', 'grain', 'monitor'),
                 default='grain')
  p.add_argument('--groups', type=int, default=4)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--seq', type=int, default=128)
  p.add_argument('--lora-rank', type=int, default=8)
  p.add_argument('--layers', type=int, default=None)
  p.add_argument('--dtype', choices=tuple(finetune_text.DTYPES),
                 default='bfloat16')
  p.add_argument('--steps', type=int, default=30)
  p.add_argument('--label', default='')
  add_aliasing_arguments(p)
  p.add_argument('--json', default=None,
                 help='also append the JSON line to this file')
  p.add_argument('--tiny', action='store_true', help='CPU smoke run')


def build(args, *, donate=None):
  """The jitted step, its initial state and one device batch, from ``args``.

  ``donate``: as ``finetune_text.make_train_step``'s (None: on a GPU only).
  """
  lora_rank = args.lora_rank if args.mode == 'lora' else 0
  model = finetune_text.build_model(
      5, lora_rank=lora_rank, seed=0,
      compute_dtype=finetune_text.DTYPES[args.dtype], num_layers=args.layers)
  optimizer = finetune_text.make_optimizer(
      model, method=args.method, groups=args.groups, accumulate=1, lr=1e-5,
      total_steps=10_000)
  step, state, _ = finetune_text.make_train_step(
      model, optimizer, method=args.method, groups=args.groups,
      flat=not args.nnx_state, donate=donate, **metrics_options(args))
  rng = np.random.default_rng(0)
  data = {
      'input_ids': rng.integers(1000, 30000,
                                (args.batch, args.seq)).astype(np.int32),
      'attention_mask': np.ones((args.batch, args.seq), np.int32),
      'labels': rng.integers(0, 5, args.batch).astype(np.int32),
  }
  return step, state, jax.device_put(data)


def time_steps(compiled, state, data, *, steps, repeats):
  """Wall clock of ``repeats`` runs of ``steps`` calls, each to completion.

  The step's state is fed back as a training loop does. Returns the last
  ``(state, metrics)`` and the ms per step of each repeat.
  """
  per_step = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, data)
    jax.block_until_ready((state, metrics))
    per_step.append((time.perf_counter() - start) / steps * 1e3)
  return state, metrics, per_step


def emit(row, path=None):
  """Prints ``row`` as a JSON line, and appends it to ``path`` if given."""
  print(json.dumps(row))
  if path:
    with open(path, 'a') as f:
      f.write(json.dumps(row) + '\n')


def summarize(trace_dir, steps):
  """Per-step device busy time and host event counts from a trace."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  files = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'),
                    recursive=True)
  if not files:
    return {}
  pd = ProfileData.from_file(files[0])
  device, host = [], {}
  for plane in pd.planes:
    on_gpu = plane.name.startswith('/device:GPU')
    for line in plane.lines:
      lname = line.name
      for e in line.events:
        if on_gpu:
          low = lname.lower()
          if 'stream' in low and 'xla' not in low:
            device.append((e.start_ns, e.end_ns))
          continue
        key = (plane.name, lname, e.name[:80])
        n, t = host.get(key, (0, 0.0))
        host[key] = (n + 1, t + (e.end_ns - e.start_ns))
  out = {}
  if device:
    out['device_busy_ms'] = _gpt.union_ns(device) * 1e-6 / steps
    out['device_kernels'] = len(device) / steps
  rows = sorted(host.items(), key=lambda kv: -kv[1][1])
  out['host_events'] = [
      {'plane': p, 'line': l, 'name': n, 'per_step': c / steps,
       'ms_per_step': t * 1e-6 / steps}
      for (p, l, n), (c, t) in rows[:60]]

  def count(*words):
    return sum(c for (_, _, n), (c, _) in host.items()
               if any(w.lower() in n.lower() for w in words)) / steps

  out['launches_per_step'] = count('cuLaunchKernel', 'cudaLaunchKernel',
                                   'cuLaunchKernelEx')
  out['graph_launches_per_step'] = count('cuGraphLaunch', 'cudaGraphLaunch')
  out['syncs_per_step'] = count('Synchronize')
  out['dtoh_per_step'] = count('MemcpyDtoH', 'cuMemcpyD2H', 'DtoH')
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add_step_arguments(p)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--trace-steps', type=int, default=5)
  p.add_argument('--nnx-state', action='store_true',
                 help='pass the nnx.State (slow pattern), not flat arrays')
  args = p.parse_args(argv)
  if args.tiny:
    args.batch, args.seq, args.layers, args.groups = 4, 16, 1, 2
    args.steps, args.repeats, args.trace_steps = 2, 1, 1
  step, state, data = build(args)
  compiled = step.lower(state, data).compile()
  for _ in range(3):
    state, metrics = compiled(state, data)
  jax.block_until_ready((state, metrics))
  state, metrics, per_step = time_steps(compiled, state, data,
                                       steps=args.steps, repeats=args.repeats)
  # Host time of one call alone (dispatch, no waiting on the device).
  dispatch = []
  for _ in range(args.steps):
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    state, metrics = compiled(state, data)
    dispatch.append((time.perf_counter() - start) * 1e3)
  jax.block_until_ready((state, metrics))
  d = tempfile.mkdtemp(prefix='grain_host_prof_')
  with jax.profiler.trace(d):
    for _ in range(args.trace_steps):
      state, metrics = compiled(state, data)
    jax.block_until_ready((state, metrics))
  prof = summarize(d, args.trace_steps)
  hlo = compiled.as_text()
  row = {
      'benchmark': 'host_profile', 'label': args.label, 'mode': args.mode,
      'method': args.method, 'groups': args.groups if args.method != 'mean'
      else 1, 'batch': args.batch, 'seq': args.seq, 'dtype': args.dtype,
      'device': str(jax.devices()[0].device_kind), 'jax': jax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'nnx_state': args.nnx_state, 'keep_unused': args.keep_unused,
      'metrics_in_state': args.metrics_in_state,
      'env': {k: v for k, v in os.environ.items()
              if k.startswith('GRAIN_OPTAX')},
      'ms_per_step': statistics.median(per_step),
      'ms_per_step_repeats': per_step,
      'dispatch_ms': statistics.median(dispatch),
      'input_leaves': len(jax.tree_util.tree_leaves(state)),
      'hlo_while_loops': hlo.count(' while('),
      'hlo_conditionals': hlo.count(' conditional('),
      'hlo_custom_calls': hlo.count('custom-call('),
      **{k: v for k, v in prof.items() if k != 'host_events'},
  }
  print(f"{args.label or ''} {args.mode} {args.method} m={row['groups']}: "
        f"wall {row['ms_per_step']:.2f} ms/step "
        f"(repeats {', '.join(f'{x:.2f}' for x in per_step)}), dispatch "
        f"{row['dispatch_ms']:.2f} ms, device busy "
        f"{row.get('device_busy_ms', float('nan')):.2f} ms, kernels "
        f"{row.get('device_kernels', float('nan')):.0f}, launches "
        f"{row['launches_per_step']:.0f}, graph launches "
        f"{row['graph_launches_per_step']:.0f}, syncs "
        f"{row['syncs_per_step']:.0f}, DtoH {row['dtoh_per_step']:.0f}, "
        f"while {row['hlo_while_loops']}, custom calls "
        f"{row['hlo_custom_calls']}, leaves {row['input_leaves']}")
  for e in prof.get('host_events', [])[:25]:
    print(f"   {e['ms_per_step']:8.3f} ms {e['per_step']:7.1f}x  "
          f"{e['line'][:28]:<28} {e['name']}")
  row['host_events'] = prof.get('host_events', [])[:60]
  emit(row, args.json)
  return row


if __name__ == '__main__':
  main()
