"""Collectives of a compiled XLA program, and the bytes each device sends.

:func:`collective_bytes` reads the post-optimisation HLO, to check on the
machine at hand what :func:`min_norm_point` (or any step) moves between
devices. A measurement tool, not part of GRAIN: public as
``grain_optax.testing``, not in the top-level ``grain_optax`` namespace.
"""

import math
import re
from typing import Any, Dict, NamedTuple, Optional


class CollectiveCost(NamedTuple):
  """Collectives of one kind in a compiled program, per device.

  Attributes:
    count: the number of such collectives.
    operand_bytes: the bytes of their operands on one device.
    sent_bytes: the bytes one device sends with bandwidth-optimal algorithms
      over groups of ``n`` devices: all-reduce ``2(n-1)/n`` of its operand,
      all-gather ``n-1`` times its operand (a shard), reduce-scatter and
      all-to-all ``(n-1)/n``, collective-permute its operand.
  """
  count: int
  operand_bytes: int
  sent_bytes: float


COLLECTIVE_KINDS = ('all-reduce', 'all-gather', 'all-to-all', 'reduce-scatter',
                    'collective-permute')
_DTYPE_BYTES = {
    'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
    's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
    'c128': 16, 's4': 0.5, 'u4': 0.5, 's2': 0.25, 'u2': 0.25,
}
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s+'
    r'(?P<op>[a-z][a-z0-9\-]*)\((?P<args>[^)]*)\)(?P<rest>.*)$')
_ARRAY = re.compile(r'\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+[a-z]*)?)\[([0-9,]*)\]')


def _shape_bytes(shape: str) -> float:
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype.startswith('f8') or dtype.startswith('f4'):
      size = 1
    else:
      size = _DTYPE_BYTES.get(dtype)
      if size is None:
        continue
    total += size * math.prod(int(d) for d in dims.split(',') if d)
  return total


def _group_size(rest: str, num_devices: int) -> int:
  m = re.search(r'replica_groups=\{\{([0-9,\s]*)\}', rest)
  if m:
    return len([t for t in m.group(1).split(',') if t.strip()])
  m = re.search(r'replica_groups=\[([0-9,]+)\]<=', rest)
  if m:
    return int(m.group(1).split(',')[-1])
  # mesh['a'=2,'b'=4] {'b'}, possibly with ", device_ids=(...)" between.
  m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", rest)
  if m:
    sizes = {k.strip().strip("'\""): int(v)
             for k, v in re.findall(r"([^,=\s]+)\s*=\s*(\d+)", m.group(1))}
    names = [n.strip().strip("'\"") for n in m.group(2).split(',') if n.strip()]
    return math.prod(sizes[n] for n in names)
  return num_devices


def collective_bytes(compiled: Any, *,
                     num_devices: Optional[int] = None
                     ) -> Dict[str, CollectiveCost]:
  r"""Collectives of a compiled XLA program and the bytes each device sends.

  Reads the post-optimisation HLO (what will run) and, for every all-reduce,
  all-gather, all-to-all, reduce-scatter and collective-permute (synchronous
  or ``-start`` of an async pair), adds up its operand bytes and the bytes one
  device sends with a bandwidth-optimal algorithm over its group of :math:`n`
  devices (ring all-reduce: :math:`2(n-1)/n` of the operand). A data-parallel
  mean of :math:`P` float32 gradients costs :math:`8P(D-1)/D` bytes sent.

  Args:
    compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``)
      or its HLO text.
    num_devices: the group size of collectives that list no replica groups;
      by default the module's ``num_partitions`` times ``replica_count``.

  Returns:
    A dict from each kind in ``COLLECTIVE_KINDS`` and ``'total'`` to a
    :class:`CollectiveCost` ``(count, operand_bytes, sent_bytes)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from grain_optax.testing import collective_bytes
    >>> c = jax.jit(lambda x: 2 * x).lower(jnp.ones(8)).compile()
    >>> collective_bytes(c)['total']
    CollectiveCost(count=0, operand_bytes=0, sent_bytes=0.0)
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  if num_devices is None:
    parts = re.search(r'num_partitions=(\d+)', text)
    reps = re.search(r'replica_count=(\d+)', text)
    num_devices = (int(parts.group(1)) if parts else 1) * (
        int(reps.group(1)) if reps else 1)
  shapes, found = {}, []
  for line in text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    shapes[m.group('name')] = m.group('shape')
    op = m.group('op')
    base = op[:-len('-start')] if op.endswith('-start') else op
    if base in COLLECTIVE_KINDS:
      found.append((base, m.group('args'), m.group('rest')))
  stats = {kind: [0, 0.0, 0.0] for kind in COLLECTIVE_KINDS}
  for kind, args, rest in found:
    operand = 0.0
    for token in re.findall(r'%([\w.\-]+)', args):
      operand += _shape_bytes(shapes.get(token, ''))
    if not re.search(r'%[\w.\-]+', args):
      operand = _shape_bytes(args)
    n = max(_group_size(rest, num_devices), 1)
    factor = {'all-reduce': 2 * (n - 1) / n, 'all-gather': n - 1,
              'reduce-scatter': (n - 1) / n, 'all-to-all': (n - 1) / n,
              'collective-permute': 1.0}[kind]
    if kind == 'collective-permute' and 'source_target_pairs={}' in rest:
      factor = 0.0
    s = stats[kind]
    s[0] += 1
    s[1] += operand
    s[2] += factor * operand
  out = {k: CollectiveCost(int(c), int(b), float(s))
         for k, (c, b, s) in stats.items()}
  out['total'] = CollectiveCost(
      sum(c.count for c in out.values()),
      sum(c.operand_bytes for c in out.values()),
      float(sum(c.sent_bytes for c in out.values())))
  return out
