"""Problems of the stability study: data, model, loss and prediction as pure
functions (the sklearn MLPs trained from scratch, MiniLM fine-tuned), and
``build_problems`` from the parsed CLI arguments."""

import dataclasses
import math
import pathlib
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass
class Problem:
  """What the runner needs of a task (all arrays already on the device)."""
  name: str
  regime: str
  kind: str                    # 'classification' | 'regression'
  metric_name: str
  x_pool: Any                  # pytree, leading axis: examples
  y_pool: Any
  sample: Any                  # seed -> np.ndarray of pool indices
  init_lanes: Any              # seeds -> (lane params [V, ...], shared params)
  frozen: Any                  # pytree passed unchanged (LoRA backbone), or ()
  rest: Any                    # other state (e.g. nnx RNG state), or ()
  loss: Any                    # (trainable, frozen, rest, batch, train) -> []
  predict: Any                 # (trainable, frozen, rest, x) -> [n]
  evals: Dict[str, Tuple[Any, np.ndarray]]   # split -> (x chunks, labels)
  majority: Dict[str, float]
  batch: int
  steps: int
  lr_grid: Tuple[float, ...]
  sweep_grid: Tuple[float, ...]
  weight_decay: float = 0.0
  program_key: Optional[str] = None   # problems with equal keys share programs
  # The regimes stage (issue 24); see _stability_regimes.py.
  num_classes: int = 0
  class_names: Tuple[str, ...] = ()
  source_names: Tuple[str, ...] = ()    # training sources, when there are any
  source_sample: Any = None    # seed -> [pool indices of each source]
  eval_sources: Dict[str, np.ndarray] = dataclasses.field(
      default_factory=dict)    # split -> source id per example (-1: none)
  regime_grids: Dict[str, Tuple[float, ...]] = dataclasses.field(
      default_factory=dict)    # optimizer -> learning rates of the regimes
  source_rule: str = ''        # how the sources were made, for the report

  def key(self):
    return self.program_key or f'{self.name}/{self.regime}'


def _chunk(x, size):
  """[n, ...] -> [ceil(n/size), size, ...] (zero padded)."""
  n = x.shape[0]
  c = max(1, math.ceil(n / size))
  pad = c * size - n
  if pad:
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
  return x.reshape((c, size) + x.shape[1:])


def _stratified_sample(labels, per_class, rng):
  idx = []
  for c in np.unique(labels):
    pool = np.flatnonzero(labels == c)
    idx.append(rng.choice(pool, min(per_class, len(pool)), replace=False))
  return rng.permutation(np.concatenate(idx))


SKLEARN_TASKS = ('digits', 'breast_cancer', 'diabetes')
# Every sklearn task is padded to these shapes, and its type (classification
# or regression, valid classes) is data, not code: the three tasks share one
# compiled program per configuration (compiling dominates on a CPU).
_SK_FEATURES, _SK_OUT, _SK_POOL, _SK_EVAL = 64, 10, 1024, 544


def _sk_forward(p, x, keys, dropout_rate):
  h = jax.nn.relu(x @ p['w1'] + p['b1'])
  if keys is not None and dropout_rate > 0:
    keep = jax.vmap(lambda k: jax.random.bernoulli(
        k, 1.0 - dropout_rate, h.shape[-1:]))(keys)
    h = jnp.where(keep, h / (1.0 - dropout_rate), 0.0)
  return h @ p['w2'] + p['b2']


def _sk_loss(trainable, frozen, rest, batch, train):
  del frozen
  out = _sk_forward(trainable['lane'], batch['x'],
                    batch['keys'] if train else None, 0.1)
  logits = jnp.where(rest['classes'], out, -1e9)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['y'].astype(jnp.int32)).mean()
  mse = jnp.mean((out[:, 0] - batch['y']) ** 2)
  return jnp.where(rest['regression'], mse, ce)


def _sk_predict(trainable, frozen, rest, x):
  del frozen
  out = _sk_forward(trainable['lane'], x, None, 0.0)
  cls = jnp.argmax(jnp.where(rest['classes'], out, -1e9), -1)
  return jnp.where(rest['regression'], out[:, 0], cls.astype(jnp.float32))


def sklearn_problem(name: str, *, steps: int, batch: int = 16,
                    hidden: int = 64, source_shots: Optional[int] = None
                    ) -> Problem:
  """A small MLP trained from scratch on a few examples of a sklearn set."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  if name == 'digits':
    x, y = datasets.load_digits(return_X_y=True)
    x = x / 16.0
    kind, shots = 'classification', 5
  elif name == 'breast_cancer':
    x, y = datasets.load_breast_cancer(return_X_y=True)
    kind, shots = 'classification', 16
  elif name == 'diabetes':
    x, y = datasets.load_diabetes(return_X_y=True)
    kind, shots = 'regression', 48
  else:
    raise ValueError(name)
  x = x.astype(np.float32)
  strat = y if kind == 'classification' else None
  x_rest, x_te, y_rest, y_te = train_test_split(
      x, y, test_size=0.3, random_state=0, stratify=strat)
  strat = y_rest if kind == 'classification' else None
  x_pool, x_va, y_pool, y_va = train_test_split(
      x_rest, y_rest, test_size=0.25, random_state=0, stratify=strat)
  if name != 'digits':
    mu, sd = x_pool.mean(0), x_pool.std(0) + 1e-6
    x_pool, x_va, x_te = [(a - mu) / sd for a in (x_pool, x_va, x_te)]
  if kind == 'classification':
    y_pool, y_va, y_te = [a.astype(np.int32) for a in (y_pool, y_va, y_te)]
    n_cls = int(y.max()) + 1
  else:
    ym, ys = y_pool.mean(), y_pool.std()
    y_pool, y_va, y_te = [((a - ym) / ys).astype(np.float32)
                          for a in (y_pool, y_va, y_te)]
    n_cls = 1
  d_in = x.shape[1]

  # Two sources for the regimes stage, defined by the features: the sum of
  # an example's (scaled) features, below or above its median over the
  # pool ('low' / 'high': digits: ink; breast cancer: overall size).
  # Validation and test examples are split by the same threshold.
  threshold = float(np.median(x_pool.sum(1)))
  src_of = lambda a: (a.sum(1) > threshold).astype(np.int32)
  src_pool = src_of(x_pool)
  per_source = source_shots or -(-shots // 2)

  def source_sample(seed):
    rng = np.random.default_rng([seed, 5])
    out = []
    for src in (0, 1):
      idx = np.flatnonzero(src_pool == src)
      out.append(idx[_stratified_sample(y_pool[idx], per_source, rng)])
    return out

  def pad(a, rows):
    out = np.zeros((rows, _SK_FEATURES), np.float32)
    out[:len(a), :a.shape[1]] = a
    return out

  def sample(seed):
    rng = np.random.default_rng([seed, 0])
    if kind == 'classification':
      return _stratified_sample(y_pool, shots, rng)
    return rng.permutation(len(y_pool))[:shots]

  def init_one(key):
    k1, k2 = jax.random.split(key)
    w1 = jax.random.normal(k1, (_SK_FEATURES, hidden)) * np.sqrt(2.0 / d_in)
    return {  # rows of padded features are zero: their weights never move
        'w1': w1 * (jnp.arange(_SK_FEATURES) < d_in)[:, None],
        'b1': jnp.zeros(hidden),
        'w2': jax.random.normal(k2, (hidden, _SK_OUT)) * np.sqrt(1.0 / hidden),
        'b2': jnp.zeros(_SK_OUT)}

  init_many = jax.jit(jax.vmap(init_one))

  def init_lanes(seeds):
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), 1))(
        jnp.asarray(seeds, jnp.uint32))
    return init_many(keys), {}

  y_pad = np.zeros(_SK_POOL, np.float32)
  y_pad[:len(y_pool)] = y_pool
  evals = {'val': (jnp.asarray(pad(x_va, _SK_EVAL))[None], y_va),
           'test': (jnp.asarray(pad(x_te, _SK_EVAL))[None], y_te)}
  majority = {}
  for split, labels in (('val', y_va), ('test', y_te)):
    majority[split] = (float(np.max(np.bincount(labels)) / len(labels))
                       if kind == 'classification' else 0.0)
  rest = {'classes': jnp.arange(_SK_OUT) < n_cls,
          'regression': jnp.asarray(kind == 'regression')}
  return Problem(
      name=name, regime='full', kind=kind,
      metric_name='accuracy' if kind == 'classification' else 'R²',
      x_pool=jnp.asarray(pad(x_pool, _SK_POOL)), y_pool=jnp.asarray(y_pad),
      sample=sample, init_lanes=init_lanes, frozen=(), rest=rest,
      loss=_sk_loss, predict=_sk_predict, evals=evals, majority=majority,
      batch=batch, steps=steps, lr_grid=(1e-3, 3e-3, 1e-2, 3e-2),
      sweep_grid=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0), weight_decay=1e-4,
      program_key='sklearn-mlp', num_classes=n_cls,
      class_names=tuple(str(c) for c in range(n_cls)),
      source_names=('low', 'high') if kind == 'classification' else (),
      source_sample=source_sample if kind == 'classification' else None,
      eval_sources={'val': src_of(x_va), 'test': src_of(x_te)},
      regime_grids={'adamw': (3e-3, 1e-2, 3e-2), 'sgdm': (0.03, 0.1, 0.3)},
      source_rule=(f'feature sum of the (scaled) inputs below / above its '
                   f'pool median {threshold:.3g}; {per_source} shots per '
                   f'class from each'))


# ---------------------------------------------------------------------------
# MiniLM (examples/minilm.py, examples/text_data.py): a thin adapter.

MINILM_TASKS = {'bbc': dict(shots=8, max_len=128),
                'tweets': dict(shots=32, max_len=64)}


def minilm_problem(task_name: str, regime: str, *, steps: int, batch: int = 16,
                   lora_rank: int = 8, shots: Optional[int] = None,
                   max_len: Optional[int] = None, compute_dtype=jnp.bfloat16,
                   max_eval: Optional[int] = None, eval_chunk: int = 256,
                   seeds_needed: Sequence[int] = (), num_layers=None,
                   sources: bool = False, source_shots: Optional[int] = None,
                   encoder_cache: Dict[str, Any] = {}) -> Problem:  # pylint: disable=dangerous-default-value
  """MiniLM + a linear head, full fine-tuning (regime 'full') or LoRA.

  The pretrained backbone is shared by all lanes (full: as the initial value
  of the trainable encoder; LoRA: as a frozen argument); what a seed changes
  (the head, the LoRA adapters' random A) is built per seed on the host with
  ``TextClassifier(..., rngs=nnx.Rngs(seed))``. Dropout keys: each group of
  a step draws its own (``fold_in`` of a per-example key into every RNG
  stream of the model).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  examples = pathlib.Path(__file__).resolve().parent.parent / 'examples'
  sys.path.insert(0, str(examples))
  import minilm  # pylint: disable=g-import-not-at-top
  import text_data  # pylint: disable=g-import-not-at-top

  spec = dict(MINILM_TASKS[task_name])
  shots = shots or spec['shots']
  max_len = max_len or spec['max_len']
  task = text_data.load_task(task_name)
  n_cls = task.num_classes
  rank = lora_rank if regime == 'lora' else 0

  # Tokenize the union of every needed seed's few-shot sample once.
  samples, texts, index = {}, [], {}
  for seed in seeds_needed:
    t, l = text_data.few_shot(task, shots, seed)
    ids = []
    for text, label in zip(t, l):
      if text not in index:
        index[text] = len(texts)
        texts.append((text, int(label)))
      ids.append(index[text])
    samples[seed] = np.asarray(ids)

  # Sources (tweets only): annotator confidence, 'sure' = at least the upper
  # tertile of the training pool's confidences, 'unsure' = below the lower
  # tertile (tweets with no confidence value in neither); each seed draws
  # source_shots per class from each source (default half the task's
  # shots), seeded by (seed, 5, source).
  source_samples, eval_conf, source_rule = {}, None, ''
  if sources and task_name == 'tweets':
    conf = text_data.tweet_confidence(task.train[0])
    lo, hi = np.nanquantile(conf, [1 / 3, 2 / 3])
    eval_conf = (lo, hi)
    src_train = np.where(conf >= hi, 0, np.where(conf < lo, 1, -1))
    per_source = source_shots or shots // 2
    source_rule = (f'annotator confidence >= {hi:.4g} (the upper tertile of '
                   f'the pool\'s {np.sum(np.isfinite(conf))} rated tweets; '
                   f'{np.sum(src_train == 0)} tweets) = sure, < {lo:.4g} '
                   f'(lower tertile; {np.sum(src_train == 1)}) = unsure; '
                   f'{per_source} shots per class from each')
    for seed in seeds_needed:
      parts = []
      for src in (0, 1):
        rng = np.random.default_rng([seed, 5, src])
        chosen = []
        for c in range(n_cls):
          cand = np.flatnonzero((src_train == src) & (task.train[1] == c))
          chosen.append(rng.choice(cand, per_source, replace=False))
        ids = []
        for i in rng.permutation(np.concatenate(chosen)):
          text = task.train[0][i]
          if text not in index:
            index[text] = len(texts)
            texts.append((text, int(task.train[1][i])))
          ids.append(index[text])
        parts.append(np.asarray(ids))
      source_samples[seed] = parts
  pool_ids, pool_mask = minilm.tokenize([t for t, _ in texts], max_len)
  pool_y = np.asarray([l for _, l in texts], np.int32)

  def sample(seed):
    if seed not in samples:
      raise KeyError(f'seed {seed} was not declared in seeds_needed')
    return samples[seed]

  key = (str(compute_dtype), num_layers)
  if key not in encoder_cache:
    encoder_cache[key] = minilm.load_minilm(
        compute_dtype=compute_dtype, rngs=nnx.Rngs(0), num_layers=num_layers)
  encoder = encoder_cache[key]

  def build(seed):
    return minilm.TextClassifier(nnx.clone(encoder), n_cls,
                                 rngs=nnx.Rngs(seed), lora_rank=rank)

  head = nnx.All(nnx.Param, nnx.PathContains('head'))
  lane_filter = minilm.trainable_filter(rank) if rank else head
  graphdef, lane0, second, rest = nnx.split(build(0), lane_filter, nnx.Param,
                                            ...)
  shared = second if not rank else {}
  frozen = second if rank else ()

  def init_lanes(seeds):
    lanes = [nnx.split(build(s), lane_filter, nnx.Param, ...)[1] for s in seeds]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *lanes)
    return stacked, shared

  def _rekey(rest_state, key):
    leaves, treedef = jax.tree_util.tree_flatten(rest_state)
    base = jax.random.wrap_key_data(key)
    out = []
    for i, leaf in enumerate(leaves):
      if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.fold_in(base, i)
      out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)

  def _model(trainable, frozen, rest_state):
    second_state = trainable['shared'] if not rank else frozen
    return nnx.merge(graphdef, trainable['lane'], second_state, rest_state)

  def loss(trainable, frozen, rest_state, batch, train):
    if train:
      rest_state = _rekey(rest_state, batch['keys'][0])
    model = _model(trainable, frozen, rest_state)
    ids, mask = batch['x']
    logits = model(ids, mask, deterministic=not train)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch['y']).mean()

  def predict(trainable, frozen, rest_state, x):
    ids, mask = x
    logits = _model(trainable, frozen, rest_state)(ids, mask,
                                                   deterministic=True)
    return jnp.argmax(logits, -1).astype(jnp.int32)

  evals, majority, eval_sources = {}, {}, {}
  for split, data in (('val', task.validation), ('test', task.test)):
    if max_eval:
      data = text_data.subsample(data, max_eval)
    if eval_conf is not None:
      conf = text_data.tweet_confidence(data[0])
      eval_sources[split] = np.where(conf >= eval_conf[1], 0, np.where(
          conf < eval_conf[0], 1, -1)).astype(np.int32)
    ids, mask = minilm.tokenize(data[0], max_len)
    evals[split] = ((jnp.asarray(_chunk(ids, eval_chunk)),
                     jnp.asarray(_chunk(mask, eval_chunk))),
                    np.asarray(data[1], np.int32))
    majority[split] = float(np.max(np.bincount(data[1])) / len(data[1]))
  if regime == 'lora':
    lr_grid, sweep_grid = (3e-4, 1e-3, 3e-3, 1e-2), (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
  else:
    lr_grid, sweep_grid = (2e-5, 5e-5, 1e-4, 2e-4), (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)
  return Problem(
      name=task_name, regime=regime, kind='classification',
      metric_name='accuracy',
      x_pool=(jnp.asarray(pool_ids), jnp.asarray(pool_mask)),
      y_pool=jnp.asarray(pool_y), sample=sample, init_lanes=init_lanes,
      frozen=frozen, rest=rest, loss=loss, predict=predict, evals=evals,
      majority=majority, batch=batch, steps=steps, lr_grid=lr_grid,
      sweep_grid=sweep_grid, weight_decay=0.01, num_classes=n_cls,
      class_names=tuple(task.classes),
      source_names=('sure', 'unsure') if source_samples else (),
      source_sample=source_samples.__getitem__ if source_samples else None,
      eval_sources=eval_sources, source_rule=source_rule,
      regime_grids=({'adamw': (3e-4, 1e-3, 3e-3), 'sgdm': (0.03, 0.1, 0.3)}
                    if regime == 'lora' else
                    {'adamw': (5e-5, 1e-4, 2e-4), 'sgdm': (1e-3, 3e-3, 1e-2)}))



def build_problems(args):
  seeds_needed = (list(range(args.seeds)) + list(range(1000, 1000 + args.val_seeds))
                  + list(range(args.sweep_seeds)))
  problems = {}
  if args.suite == 'sklearn':
    for t in args.tasks or SKLEARN_TASKS:
      problems[(t, 'full')] = sklearn_problem(
          t, steps=args.steps or 150, source_shots=args.source_shots)
  else:
    for t in args.tasks or tuple(MINILM_TASKS):
      for regime in args.regimes:
        problems[(t, regime)] = minilm_problem(
            t, regime, steps=args.steps or 60, lora_rank=args.lora_rank,
            compute_dtype=jnp.dtype(args.compute_dtype),
            max_eval=args.max_eval, seeds_needed=sorted(set(seeds_needed)),
            num_layers=args.num_layers,
            sources='regimes' in args.stages and 'sources' in args.conditions,
            source_shots=args.source_shots)
  if args.lr_grid or args.sweep_grid:
    for p in problems.values():
      if args.lr_grid:
        p.lr_grid = tuple(args.lr_grid)
      if args.sweep_grid:
        p.sweep_grid = tuple(args.sweep_grid)
  return problems
