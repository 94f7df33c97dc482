"""A GPT-style causal LM in Flax NNX and the training steps the benchmarks time.

Shared by ``step_overhead.py``, ``memory.py`` and ``qp_solvers.py``. The full
configuration is the one of issue 4 (see benchmarks/RESULTS.md): d_model 768, 12
layers, 12 heads, sequence 256, batch 32, vocabulary 8192 with a tied output
head (91.5 M parameters), bfloat16 matmuls, float32 parameters, AdamW, fused
causal attention (``jax.nn.dot_product_attention``, cuDNN on a GPU).

Steps (all ``jax.jit`` with the parameters and optimizer state donated):

* ``mean``: ``jax.value_and_grad`` of the mean loss over the whole batch.
* ``grain``: per-group gradients by ``vmap`` (:func:`group_value_and_grad`),
  then ``optax.chain(grain_optax.grain(num_groups=m), adamw)``: the default
  mode, m gradients live at once.
* ``lean``: :func:`grain_optax.grain_value_and_grad` (the Gram matrix from a
  first pass, the combined gradient from a second backward pass of
  :math:`\\sum_i w_i L_i`), then adamw.
"""

import dataclasses
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import optax
from flax import nnx

import grain_optax


@dataclasses.dataclass(frozen=True)
class Config:
  """Shape of the model and the batch."""
  vocab: int = 8192
  seq: int = 256
  d_model: int = 768
  layers: int = 12
  heads: int = 12
  batch: int = 32
  dtype: str = 'bfloat16'
  scan: bool = False  # the blocks' params stacked, lax.scan over layers


FULL = Config()
TINY = Config(vocab=128, seq=16, d_model=32, layers=2, heads=2, batch=16,
              dtype='float32')
CONFIGS = {'full': FULL, 'tiny': TINY,
           'full_scan': dataclasses.replace(FULL, scan=True),
           'tiny_scan': dataclasses.replace(TINY, scan=True)}


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: causal self-attention and a GELU MLP."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    d, dt = cfg.d_model, jnp.dtype(cfg.dtype)
    lin = lambda a, b: nnx.Linear(a, b, dtype=dt, param_dtype=jnp.float32,
                                  rngs=rngs)
    self.ln1 = nnx.LayerNorm(d, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
    self.qkv = lin(d, 3 * d)
    self.proj = lin(d, d)
    self.ln2 = nnx.LayerNorm(d, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
    self.fc = lin(d, 4 * d)
    self.out = lin(4 * d, d)
    self.heads = cfg.heads

  def __call__(self, x):
    b, t, d = x.shape
    qkv = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads)
    att = jax.nn.dot_product_attention(
        qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True)
    x = x + self.proj(att.reshape(b, t, d))
    return x + self.out(jax.nn.gelu(self.fc(self.ln2(x))))


class GPT(nnx.Module):
  """Token and position embeddings, blocks, final LayerNorm, tied head."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.dtype)
    self.wte = nnx.Embed(cfg.vocab, cfg.d_model, dtype=dt,
                         param_dtype=jnp.float32, rngs=rngs)
    self.wpe = nnx.Param(
        0.01 * jax.random.normal(rngs.params(), (cfg.seq, cfg.d_model)))
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
    self.ln_f = nnx.LayerNorm(cfg.d_model, dtype=dt, param_dtype=jnp.float32,
                              rngs=rngs)
    self.dtype = dt

  def __call__(self, tokens):
    x = self.wte(tokens) + self.wpe[...][: tokens.shape[1]].astype(self.dtype)
    for block in self.blocks:
      x = block(x)
    return self.wte.attend(self.ln_f(x))


def build(cfg: Config, seed: int = 0) -> Tuple[Callable[..., Any], Any]:
  """Returns ``(loss_fn, params)``: a pure loss of a dict of float32 params.

  ``loss_fn(params, batch)`` is the mean next-token cross-entropy (float32)
  over the tokens of ``batch = {'tokens': int32[B, seq + 1]}``.
  """
  if cfg.scan:
    return _build_scanned(cfg, seed)
  model = GPT(cfg, nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)

  def loss_fn(params, batch):
    st = jax.tree_util.tree_map(lambda x: x, state)
    nnx.replace_by_pure_dict(st, params)
    model = nnx.merge(graphdef, st)
    tokens = batch['tokens']
    logits = model(tokens[:, :-1]).astype(jnp.float32)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]))

  return loss_fn, params


def _build_scanned(cfg: Config, seed: int):
  """``build`` with the blocks' params stacked ``[layers, ...]`` and scanned.

  The same model and initial values as the unscanned one (``params['blocks']``
  is the stack of its blocks' params); the forward pass is a ``lax.scan``
  over the layers, as models that scan their layers (``nnx.scan``) compile.
  """
  model = GPT(cfg, nnx.Rngs(seed))
  block_def, block_state = nnx.split(model.blocks[0])
  blocks = [nnx.to_pure_dict(nnx.state(b)) for b in model.blocks]
  model.blocks = nnx.List([])
  graphdef, state = nnx.split(model)
  params = dict(nnx.to_pure_dict(state))
  params['blocks'] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)

  def loss_fn(params, batch):
    st = jax.tree_util.tree_map(lambda x: x, state)
    nnx.replace_by_pure_dict(
        st, {k: v for k, v in params.items() if k != 'blocks'})
    outer = nnx.merge(graphdef, st)
    tokens = batch['tokens'][:, :-1]
    x = outer.wte(tokens) + outer.wpe[...][: tokens.shape[1]].astype(
        outer.dtype)

    def layer(x, block_params):
      bst = jax.tree_util.tree_map(lambda y: y, block_state)
      nnx.replace_by_pure_dict(bst, block_params)
      return nnx.merge(block_def, bst)(x), None

    x, _ = jax.lax.scan(layer, x, params['blocks'])
    logits = outer.wte.attend(outer.ln_f(x)).astype(jnp.float32)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['tokens'][:, 1:]))

  return loss_fn, params


def num_params(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def make_batch(cfg: Config, seed: int = 1) -> Dict[str, jax.Array]:
  return {'tokens': jax.random.randint(
      jax.random.key(seed), (cfg.batch, cfg.seq + 1), 0, cfg.vocab, jnp.int32)}


def adamw():
  return optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1)


def make_step(kind: str, loss_fn, m: int = 1, *, solver: str = 'exact',
              grad_dtype: str = 'backward', group_exec: str = 'vmap',
              gram_backend=None):
  """``(step, tx)``: a jitted ``step(params, opt_state, batch)`` and its tx.

  ``step`` returns ``(params, opt_state, loss)`` with params and optimizer
  state donated. ``kind`` is ``'mean'``, ``'grain'``, ``'monitor'``
  (``grain(apply='mean')``) or ``'lean'``; a suffix ``'+xla'`` compiles
  the step with the Gram by XLA's dots (``SolverOptions(gram_backend=
  'xla')``); a suffix ``'@params'`` takes the per-group gradients in the
  params' dtype (``grad_dtype='params'``).
  """
  if '~' in kind:
    # Experimental: how the per-group gradients are executed. '~map' runs the
    # groups one at a time (group_value_and_grad's chunk_size=1, a lax.map);
    # '~unroll' takes each group's gradient as a separate backward pass in
    # the same program (a Python loop) and stacks them; '~inner' vmaps over
    # interleaved groups (axis 1 of a [B/m, m] view of the batch); '~nosplit'
    # is the default without split_sums (each per-group sum in one stage).
    base, how = kind.split('~')
    return make_step(base, loss_fn, m, solver=solver, grad_dtype=grad_dtype,
                     group_exec=how, gram_backend=gram_backend)
  if kind.endswith('@params'):
    # The per-group gradients in the params' dtype (float32), as before
    # grad_dtype='backward' became the default.
    return make_step(kind[:-len('@params')], loss_fn, m, solver=solver,
                     grad_dtype='params', gram_backend=gram_backend)
  if '+' in kind:
    base, backend = kind.split('+')
    if backend != 'xla':
      raise ValueError(
          f'step kind {kind!r}: only the Gram backend +xla compiles into a '
          'step; time the experimental Gram variants alone with '
          'step_overhead.py --gram_times --gram_variants')
    return make_step(base, loss_fn, m, solver=solver, grad_dtype=grad_dtype,
                     group_exec=group_exec, gram_backend=backend)
  options = grain_optax.SolverOptions(solver=solver,
                                      gram_backend=gram_backend)
  if kind == 'mean':
    tx = adamw()

    def step(params, opt_state, batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss
  elif kind in ('grain', 'monitor'):
    # 'monitor': grain(apply='mean'), the mean applied, GRAIN computed and
    # logged (what monitoring a run costs).
    apply = 'mean' if kind == 'monitor' else 'grain'
    tx = optax.chain(grain_optax.grain(num_groups=m, apply=apply,
                                       solver_options=options), adamw())
    grad_fn = _group_grad_fn(loss_fn, m, grad_dtype, group_exec)

    def step(params, opt_state, batch):
      losses, grads = grad_fn(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, jnp.mean(losses)
  elif kind == 'lean':
    tx = adamw()
    grad_fn = grain_optax.grain_value_and_grad(
        loss_fn, m, grad_dtype=grad_dtype, solver_options=options)

    def step(params, opt_state, batch):
      out = grad_fn(params, batch)
      updates, opt_state = tx.update(out.grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state,
              jnp.mean(out.losses))
  else:
    raise ValueError(f'unknown step kind {kind!r}')
  return jax.jit(step, donate_argnums=(0, 1)), tx


def _group_grad_fn(loss_fn, m, grad_dtype, group_exec):
  """Per-group ``(losses, grads)`` of ``loss_fn`` executed as ``group_exec``."""
  if group_exec == 'vmap':
    return grain_optax.group_value_and_grad(loss_fn, m, grad_dtype=grad_dtype)
  if group_exec == 'nosplit':
    return grain_optax.group_value_and_grad(loss_fn, m, grad_dtype=grad_dtype,
                                            split_sums=False)
  if group_exec == 'map':
    return grain_optax.group_value_and_grad(loss_fn, m, grad_dtype=grad_dtype,
                                            chunk_size=1)
  one = grain_optax.group_value_and_grad(loss_fn, 1, grad_dtype=grad_dtype)
  if group_exec == 'inner':
    # Interleaved groups (example j in group j % m), vmapped over axis 1.
    def inner_fn(params, batch):
      inner = jax.tree_util.tree_map(
          lambda x: x.reshape(x.shape[0] // m, m, *x.shape[1:]), batch)
      out = jax.vmap(one, in_axes=(None, 1))(params, inner)
      return jax.tree_util.tree_map(lambda x: x[:, 0], out)
    return inner_fn
  if group_exec != 'unroll':
    raise ValueError(f'unknown group execution {group_exec!r}')

  def grad_fn(params, batch):
    groups = grain_optax.split_into_groups(batch, m)
    outs = [one(params, jax.tree_util.tree_map(lambda x, i=i: x[i], groups))
            for i in range(m)]
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *outs)
  return grad_fn


def compile_step(step, params, opt_state, batch):
  """Lowers and compiles ``step``; returns the compiled program."""
  return step.lower(params, opt_state, batch).compile()


def memory_of(compiled) -> Dict[str, int]:
  """XLA's memory analysis of a compiled program, in bytes.

  ``peak`` is arguments + outputs - aliased (donated) + temporaries: the
  device memory the program needs while it runs.
  """
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  out = {k: int(getattr(ma, f'{k}_size_in_bytes', 0))
         for k in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  out['peak'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


def bytes_accessed(compiled) -> float:
  """XLA's cost-analysis estimate of the bytes a program reads and writes."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return float('nan')
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return float((ca or {}).get('bytes accessed', float('nan')))


def time_steps(step, params, opt_state, batch, *, inner: int, reps: int,
               warmup: int = 2):
  """Median and spread of the time per step, in ms.

  ``step`` is a compiled step (or a jitted one) taking and donating
  ``(params, opt_state, batch)``.

  Each repetition dispatches ``inner`` steps back to back (as a training
  loop does) and blocks once at the end; the result is the median over
  ``reps`` repetitions of (elapsed / inner). Returns
  ``(median_ms, min_ms, max_ms, params, opt_state)``.
  """
  for _ in range(warmup):
    params, opt_state, loss = step(params, opt_state, batch)
  jax.block_until_ready((params, opt_state, loss))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      params, opt_state, loss = step(params, opt_state, batch)
    jax.block_until_ready((params, opt_state, loss))
    times.append((time.perf_counter() - t0) * 1e3 / inner)
  return statistics.median(times), min(times), max(times), params, opt_state


def device_info() -> Dict[str, str]:
  dev = jax.devices()[0]
  info = {'platform': dev.platform, 'device': getattr(dev, 'device_kind', str(dev)),
          'jax': jax.__version__, 'jaxlib': jax.lib.__version__
          if hasattr(jax.lib, '__version__') else '', 'optax': optax.__version__,
          'date': time.strftime('%Y-%m-%d')}
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
    info['jaxlib'] = jaxlib.__version__
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    import flax  # pylint: disable=g-import-not-at-top
    info['flax'] = flax.__version__
  except Exception:  # pylint: disable=broad-except
    pass
  return info


def git_commit() -> str:
  try:
    return subprocess.run(
        ['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
        cwd=os.path.dirname(os.path.abspath(__file__)), check=False
    ).stdout.strip()
  except Exception:  # pylint: disable=broad-except
    return ''


def print_table(rows, columns, title=None):
  """Prints ``rows`` (dicts) as a markdown table with the given columns."""
  if title:
    print(f'\n{title}')
  def fmt(v):
    if isinstance(v, float):
      if v != v:
        return 'nan'
      if abs(v) >= 100:
        return f'{v:.1f}'
      if abs(v) >= 1e-3 or v == 0:
        return f'{v:.3f}'
      return f'{v:.1e}'
    return str(v)
  print('| ' + ' | '.join(columns) + ' |')
  print('|' + '---|' * len(columns))
  for r in rows:
    print('| ' + ' | '.join(fmt(r.get(c, '')) for c in columns) + ' |')


def _categorize(name: str) -> str:
  n = name.lower()
  rules = (
      ('attention', ('cudnn', 'flash', 'fmha', 'attention', 'sdpa')),
      ('solver', ('potrf', 'getrf', 'trsm', 'cusolver', 'getrs', 'lu_', 'cholesky',
                  'triangular')),
      ('gemm', ('gemm', 'cublas', 'cutlass', 'xmma', 'nvjet', 'dot', 'triton')),
      ('memcpy', ('memcpy', 'memset', 'copy')),
      ('reduce', ('reduce', 'reduction')),
      ('elementwise', ('fusion', 'loop', 'convert', 'add', 'multiply')),
  )
  for cat, keys in rules:
    if any(k in n for k in keys):
      return cat
  return 'other'


def union_ns(intervals) -> float:
  """Total length of the union of ``(start, end)`` intervals."""
  busy, cur_s, cur_e = 0.0, None, None
  for s, e in sorted(intervals):
    if cur_e is None or s > cur_e:
      if cur_e is not None:
        busy += cur_e - cur_s
      cur_s, cur_e = s, e
    else:
      cur_e = max(cur_e, e)
  if cur_e is not None:
    busy += cur_e - cur_s
  return busy


def describe_kernels(hlo_text: str, names) -> dict:
  """Where profiled kernels come from: ``{kernel: 'shape  op_name'}``.

  A GPU profile names a fusion's kernel after its HLO instruction with ``_``
  for ``.`` (``gemm_fusion_dot_320`` for ``%gemm_fusion_dot.320``). For each
  name found in ``hlo_text`` (a compiled program's ``as_text()``) this gives
  the instruction's result shape and the JAX operation it was lowered from
  (its ``op_name`` metadata: the name stack, e.g. ``transpose(jvp(...))``).
  """
  import re  # pylint: disable=g-import-not-at-top
  found = {}
  for name in names:
    candidates = {name}
    head, sep, tail = name.rpartition('_')
    if sep and tail.isdigit():
      candidates.add(f'{head}.{tail}')
    for cand in candidates:
      m = re.search(r'%' + re.escape(cand) + r' = (\S+) .*?op_name="([^"]*)"',
                    hlo_text)
      if m:
        found[name] = f'{m.group(1)}  {m.group(2)}'
        break
  return found


def profile_device(run, *, steps: int = 3):
  """Device-side profile of ``steps`` calls of ``run()`` (blocking each).

  Uses ``jax.profiler`` and reads the trace with ``jax.profiler.ProfileData``.
  Returns a dict with, per step: ``busy_ms`` (union of kernel intervals on
  the device), ``span_ms`` (first kernel start to last kernel end),
  ``kernels`` (count), time per category (gemm, attention, reduce,
  elementwise, solver, memcpy, other) and the 80 most expensive kernels.
  Empty on a platform without device planes (CPU).
  """
  import glob  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  out = run()
  jax.block_until_ready(out)
  d = tempfile.mkdtemp(prefix='grain_prof_')
  with jax.profiler.trace(d):
    for _ in range(steps):
      jax.block_until_ready(run())
  files = glob.glob(os.path.join(d, '**', '*.xplane.pb'), recursive=True)
  if not files:
    return {}
  pd = ProfileData.from_file(files[0])
  events = []
  for plane in pd.planes:
    if not plane.name.startswith('/device:GPU'):
      continue
    for line in plane.lines:
      lname = line.name.lower()
      if 'stream' not in lname or 'xla' in lname:
        continue
      for e in line.events:
        events.append((e.start_ns, e.end_ns, e.name))
  if not events:
    return {}
  events.sort()
  busy = union_ns([(s, e) for s, e, _ in events])
  per_cat, per_name = {}, {}
  for s, e, name in events:
    cat = _categorize(name)
    per_cat[cat] = per_cat.get(cat, 0.0) + (e - s)
    per_name[name] = per_name.get(name, 0.0) + (e - s)
  top = sorted(per_name.items(), key=lambda kv: -kv[1])[:80]
  scale = 1e-6 / steps
  return {
      'busy_ms': busy * scale,
      'span_ms': (events[-1][1] - events[0][0]) * scale,
      'kernels': len(events) / steps,
      'category_ms': {k: v * scale for k, v in sorted(per_cat.items())},
      'top_kernels_ms': [(k[:120], v * scale) for k, v in top],
  }
