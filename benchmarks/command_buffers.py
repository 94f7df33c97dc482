"""Why XLA re-records a short step's CUDA graph on every call (issue 23).

XLA runs a jitted GPU step as CUDA graphs ("command buffers"). A graph is
reused as long as every buffer its commands touch sits at the address it was
recorded with; when one moves, XLA re-records the commands before the launch
(``command_buffer::update`` in a profile: host time on every step). Buffers
move between calls when an output of the step is not aliased to a donated
input, so that each call writes it to a freshly allocated buffer which the
next call then reads.

For the MiniLM step of ``finetune_step_time.py`` this script reports:

* the compiled program's input/output aliasing: the outputs that alias no
  donated input (index, path, shape, dtype);
* the outputs whose device address changes from one call to the next (with
  the step's result fed back as its next input, as a training loop does);
* with ``TF_CPP_VMODULE=command_buffer_thunk=3 TF_CPP_MIN_LOG_LEVEL=0`` set
  by the caller, XLA's own log lines ("Update command buffer ...
  updated_allocs=N") go to stderr.

    python benchmarks/command_buffers.py --mode lora --method grain --groups 4
    python benchmarks/command_buffers.py --tiny      # CPU smoke run

``--lowered-for cuda`` runs nothing: it lowers the donating step for that
platform (possible on a CPU-only machine) and reports, from the lowered
module's ``main``, how many inputs it takes, how many of its outputs alias a
donated input, and the floating-point work of its dot products
(2 · contracted size · output size, summed over ``dot_general``)::

    python benchmarks/command_buffers.py --lowered-for cuda --method grain

Prints a table and one JSON line (``--json`` appends it to a file too).
"""

import argparse
import math
import pathlib
import re
import statistics
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import host_profile  # pylint: disable=g-import-not-at-top,wrong-import-position


def aliased_outputs(hlo_text: str) -> set:
  """Flat output indices that alias a donated parameter, from compiled HLO.

  The module header reads ``input_output_alias={ {0}: (0, {}, may-alias),
  ... }``; the block is found by matching its braces.
  """
  start = hlo_text.find('input_output_alias={')
  if start < 0:
    return set()
  i = start + len('input_output_alias=')
  depth = 0
  for j in range(i, len(hlo_text)):
    depth += {'{': 1, '}': -1}.get(hlo_text[j], 0)
    if depth == 0:
      break
  block = hlo_text[i + 1:j]
  return {int(k) for k in re.findall(r'\{(\d+)\}\s*:\s*\(', block)}


def _dims(tensor_type: str) -> list:
  m = re.match(r'tensor<([0-9x]*)(\w+)>', tensor_type)
  return [int(d) for d in m.group(1).split('x') if d] if m else []


def lowered_counts(stablehlo_text: str) -> dict:
  """Inputs, aliased outputs and dot FLOPs of a lowered (StableHLO) module."""
  main = next(line for line in stablehlo_text.splitlines()
              if 'func.func public @main' in line)
  inputs, outputs = main.split('->', 1)
  flops = 0
  for line in stablehlo_text.splitlines():
    if 'stablehlo.dot_general' not in line:
      continue
    types = re.findall(r'tensor<[^>]*>', line.rsplit(' : ', 1)[-1])
    if len(types) < 3:
      continue
    lhs, out = _dims(types[0]), _dims(types[-1])
    contracted = re.search(r'contracting_dims = \[([0-9, ]*)\] x', line)
    axes = contracted.group(1).split(',') if contracted else []
    k = math.prod(lhs[int(i)] for i in axes if i.strip())
    flops += 2 * k * math.prod(out)
  return {'inputs': inputs.count('%arg'),
          'aliased': main.count('tf.aliasing_output'),
          'outputs': outputs.count('tensor<'), 'dot_gflop': flops / 1e9,
          'largest_tensors': largest_tensors(stablehlo_text)}


def largest_tensors(stablehlo_text: str, count: int = 5) -> list:
  """The ``count`` largest distinct tensor types the module names, by
  bytes, as ``[type, MB]`` (e.g. per-group gradients of an embedding)."""
  sizes = {}
  for t in set(re.findall(r'tensor<[0-9x]*[a-z]+[0-9]*>', stablehlo_text)):
    bits = re.search(r'[a-z]+(\d*)>$', t).group(1)
    sizes[t[len('tensor<'):-1]] = (math.prod(_dims(t)) * int(bits or 8)
                                   / 8 / 1e6)
  return [[t, round(mb, 1)] for t, mb in
          sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:count]]


def addresses(tree):
  out = []
  for x in jax.tree_util.tree_leaves(tree):
    try:
      out.append(x.unsafe_buffer_pointer())
    except Exception:  # pylint: disable=broad-except
      out.append(None)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  host_profile.add_step_arguments(p)
  p.add_argument('--lowered-for', default=None, metavar='PLATFORM',
                 help='lower the donating step for PLATFORM (e.g. cuda) and '
                      'report its aliasing and dot FLOPs; runs nothing')
  p.add_argument('--dump-hlo', default=None, metavar='FILE',
                 help="write the compiled step's HLO (after XLA's passes, "
                 'its command buffers included) to FILE')
  args = p.parse_args(argv)
  args.nnx_state = False
  if args.tiny:
    args.batch, args.seq, args.layers, args.groups, args.steps = 4, 16, 1, 2, 3
  row = {'benchmark': 'command_buffers', 'label': args.label,
         'mode': args.mode, 'method': args.method, 'groups': args.groups,
         'dtype': args.dtype, 'jax': jax.__version__}
  if args.lowered_for:
    step, state, data = host_profile.build(args, donate=True)
    text = step.trace(state, data).lower(
        lowering_platforms=(args.lowered_for,)).as_text()
    row.update(lowered_for=args.lowered_for, batch=args.batch, seq=args.seq,
               state_leaves=len(jax.tree_util.tree_leaves(state)),
               data_inputs=len(jax.tree_util.tree_leaves(data)),
               **lowered_counts(text))
    print(f"{args.mode} {args.method} m={args.groups} lowered for "
          f"{args.lowered_for}: state leaves {row['state_leaves']}, inputs "
          f"{row['inputs']} (data {row['data_inputs']}), outputs "
          f"{row['outputs']}, aliased {row['aliased']}, dots "
          f"{row['dot_gflop']:.1f} GFLOP; largest tensors "
          f"{row['largest_tensors'][:3]}")
    host_profile.emit(row, args.json)
    return row
  step, state, data = host_profile.build(args)
  compiled = step.lower(state, data).compile()
  hlo = compiled.as_text()
  if args.dump_hlo:
    pathlib.Path(args.dump_hlo).write_text(hlo)
  out_shape = jax.eval_shape(step, state, data)
  paths = [jax.tree_util.keystr(k) for k, _ in
           jax.tree_util.tree_flatten_with_path(out_shape)[0]]
  leaves = jax.tree_util.tree_leaves(out_shape)

  def described(i):
    return {'index': i, 'path': paths[i], 'shape': list(leaves[i].shape),
            'dtype': str(leaves[i].dtype)}

  aliased = aliased_outputs(hlo)
  unaliased = [described(i) for i in range(len(leaves)) if i not in aliased]
  for _ in range(3):
    state, metrics = compiled(state, data)
  jax.block_until_ready((state, metrics))
  history = []
  for _ in range(4):
    state, metrics = compiled(state, data)
    jax.block_until_ready((state, metrics))
    history.append(addresses((state, metrics)))
  moving = [i for i in range(len(leaves))
            if len({h[i] for h in history}) > 1]
  state, metrics, times = host_profile.time_steps(
      compiled, state, data, steps=args.steps, repeats=3)
  row.update(
      keep_unused=args.keep_unused, metrics_in_state=args.metrics_in_state,
      stats=args.stats,
      device=str(jax.devices()[0].device_kind), outputs=len(leaves),
      aliased=len(aliased), unaliased=unaliased,
      moving=[described(i) for i in moving],
      ms_per_step=statistics.median(times), ms_repeats=times)
  print(f"{args.label} {args.mode} {args.method} m={args.groups}: "
        f"{row['ms_per_step']:.2f} ms/step, outputs {len(leaves)}, aliased "
        f"{len(aliased)}, moving {len(moving)}")
  for u in unaliased:
    print(f"   not aliased: #{u['index']} {u['path']} {u['shape']} "
          f"{u['dtype']}")
  for u in row['moving']:
    print(f"   moves:       #{u['index']} {u['path']} {u['shape']} "
          f"{u['dtype']}")
  host_profile.emit(row, args.json)
  return row


if __name__ == '__main__':
  main()
