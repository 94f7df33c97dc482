"""Does GRAIN make fine-tuning stable? The study of issue 11.

Every training run is one lane of a batched, jitted program: the whole run
(``lax.scan`` over optimizer steps) plus the evaluation of the final model on
the validation and test splits is compiled once per static configuration
(task, regime, optimizer, groups m, accumulation window k, warm-up, dropout)
and ``vmap``-ed over lanes. A lane carries its own seed, learning rate and arm
as *traced* values, so the learning-rate grid, the seeds and the four
within-batch arms reuse one compiled program.

Arms (the per-group gradients are the same computation in every arm; only
what is applied differs, so a seed's dropout masks, data order, few-shot
sample and head init are identical across arms — the comparisons are paired):

* ``mean``: the plain mean of the group gradients (= the batch gradient), with
  GRAIN's statistics computed on the side (how often the groups conflicted,
  ``GrainState.mean_min_cosine < 0``; the norm ratio GRAIN would have had).
* ``grain``: ``grain_optax.grain(num_groups=m)``, the min-norm point d.
* ``mean@grain-norm``: the mean's direction at d's length, each step.
* ``grain@mean-norm``: d's direction at the mean's length, each step.
* ``grain+acc``: ``chain(grain(m), accumulate(inner, every_k=k))``: the batch
  of B examples is cut into k micro-batches of B/k (GRAIN over m groups in
  each), combined by their min-norm point before one optimizer step. The same
  examples and number of optimizer steps as the mean.
* ``plain``: no groups at all (``jax.value_and_grad`` of the batch loss), for
  the step-time ratio.

Stages (run in this order; ``--budget-seconds`` stops between chunks and still
writes everything so far):

* ``main``: per task and regime, each of mean / grain (m=4) / grain+acc
  (m=4, k=2) with AdamW: a learning-rate grid x ``--val-seeds`` seeds on the
  validation split; the best mean validation score picks the method's
  learning rate; then ``--seeds`` test seeds for every method at every
  learning rate some method picked (own and same-lr comparisons).
* ``sweep``: the learning-rate sweep (SGD + momentum 0.9 by default, full
  fine-tuning, m = ``--sweep-groups``), four arms, ``--sweep-seeds`` seeds per
  point, on the test split: where the mean fails, and whether GRAIN's
  direction or its shorter step is what helps.
* ``groups``: GRAIN with m in {2, 4, 8, B} and across-batch GRAIN with k in
  {2, 4, 8} (mean within micro-batches), at GRAIN's tuned AdamW rate (from
  the main stage, or ``--chosen-from`` an earlier run's results).
* ``variants``: the sweep again with warm-up, with dropout on, and with
  AdamW instead of SGD.
* ``timing``: the ``plain`` step (no groups) and ``grain(num_groups=m)`` as
  a user runs it, at the mean's tuned rate on the test seeds (first task
  only), for the step-time ratio.

Suites: ``sklearn`` (CPU, a few minutes: digits, breast cancer and diabetes
regression, small MLPs trained from scratch on a few examples: the same code
path as the GPU study, exercised by tests/test_stability.py in ``--tiny``
mode) and ``minilm`` (all-MiniLM-L6-v2 fine-tuned on BBC 8/class and tweets
32/class, full and LoRA; ``examples/minilm.py``, ``examples/text_data.py``).

    python benchmarks/stability.py --suite sklearn                    # CPU, ~5 min
    python benchmarks/stability.py --suite minilm --budget-seconds 840  # GPU
    python benchmarks/stability.py --report benchmarks/STABILITY.md \\
        benchmarks/results/stability_sklearn_cpu.jsonl ...
"""

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import pathlib
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _stability_stats as stats  # pylint: disable=g-import-not-at-top,wrong-import-position

import grain_optax  # pylint: disable=g-import-not-at-top,wrong-import-position

ARMS = ('mean', 'grain', 'mean@grain-norm', 'grain@mean-norm')
ARM_CODE = {name: i for i, name in enumerate(ARMS)}
RESULTS = pathlib.Path(__file__).resolve().parent / 'results'


# ============================================================================
# The arms as one optax transformation (the arm is a traced int).


# The benchmark's arm names and the library's ``apply`` values they run.
ARM_APPLY = {'mean': 'mean', 'grain': 'grain',
             'mean@grain-norm': 'mean_at_grain_length',
             'grain@mean-norm': 'grain_at_mean_length'}


def arm_transform(num_groups: int, arm) -> optax.GradientTransformation:
  """``grain(num_groups, apply=...)`` with the arm chosen by a traced int.

  The arm indexes :data:`ARMS`; each is the library's own option
  (:data:`ARM_APPLY`), so the study runs exactly what users get. Lanes of
  different arms share one compiled program: ``lax.switch`` on the arm
  (under ``vmap`` every branch is computed and one selected; the Gram and
  the solve are the same computation in all four, which XLA shares). The
  state is ``grain()``'s ``GrainState`` in every arm, so GRAIN's statistics
  are logged for the mean too.
  """
  txs = [grain_optax.grain(num_groups=num_groups, apply=ARM_APPLY[name])
         for name in ARMS]

  def update(updates, state, params=None, **extra):
    branches = [lambda u, s, tx=tx: tx.update(u, s, params, **extra)
                for tx in txs]
    return jax.lax.switch(arm, branches, updates, state)

  return optax.GradientTransformationExtraArgs(txs[0].init, update)


# ============================================================================
# Problems: data, model, loss and prediction as pure functions.


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
                    hidden: int = 64) -> Problem:
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
      program_key='sklearn-mlp')


# ---------------------------------------------------------------------------
# MiniLM (examples/minilm.py, examples/text_data.py): a thin adapter.

MINILM_TASKS = {'bbc': dict(shots=8, max_len=128),
                'tweets': dict(shots=32, max_len=64)}


def minilm_problem(task_name: str, regime: str, *, steps: int, batch: int = 16,
                   lora_rank: int = 8, shots: Optional[int] = None,
                   max_len: Optional[int] = None, compute_dtype=jnp.bfloat16,
                   max_eval: Optional[int] = None, eval_chunk: int = 256,
                   seeds_needed: Sequence[int] = (), num_layers=None,
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

  evals, majority = {}, {}
  for split, data in (('val', task.validation), ('test', task.test)):
    if max_eval:
      data = text_data.subsample(data, max_eval)
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
      sweep_grid=sweep_grid, weight_decay=0.01)


# ============================================================================
# The runner: one compiled program per static configuration.


@dataclasses.dataclass(frozen=True)
class Config:
  """What one compiled program is specialised to (the rest is per lane).

  Each step computes the gradients of ``cells`` equal cells of the batch
  (one ``vmap``), then runs up to ``window`` micro-steps: micro-step j
  combines the cells of micro-batch j into up to ``slots`` group gradients
  with a per-lane matrix (unused slots masked out with ``group_mask``), passes
  them through the arm transform (``grain(num_groups=slots)``) and
  ``accumulate(inner, every_k=k, max_every_k=window)``. A lane with window
  k < ``window`` runs k micro-steps (the rest are no-ops), so every lane takes
  exactly one optimizer step per batch. ``cells = 0``: the plain batch
  gradient, no groups (the timing baseline).
  """
  optimizer: str = 'adamw'     # 'adamw' | 'sgdm'
  cells: int = 8
  slots: int = 4
  window: int = 2
  warmup: int = 0              # linear warm-up steps
  dropout: bool = False
  variant: str = ''            # label of the sweep variant
  direct: bool = False         # every lane: m = cells = slots, k = 1 (the
                               # cells are the groups; no combination step)


@dataclasses.dataclass(frozen=True)
class Lane:
  arm: str
  lr: float
  seed: int
  m: int = 4                   # groups per micro-batch
  k: int = 1                   # micro-batches per optimizer step


def lane_plan(cfg: Config, lane: Lane):
  """(combination [W, S, G], group mask [W, S], active [W]) of a lane."""
  g, s, w = cfg.cells, cfg.slots, cfg.window
  if lane.k > w or g % lane.k or (g // lane.k) % lane.m or lane.m > s or (
      cfg.direct and (lane.m != g or lane.k != 1 or s != g or w != 1)):
    raise ValueError(f'lane m={lane.m}, k={lane.k} does not fit {cfg}')
  per_micro = g // lane.k
  per_group = per_micro // lane.m
  comb = np.zeros((w, s, g), np.float32)
  for j in range(lane.k):
    for i in range(lane.m):
      start = j * per_micro + i * per_group
      comb[j, i, start:start + per_group] = 1.0 / per_group
  mask = np.zeros((w, s), bool)
  mask[:lane.k, :lane.m] = True
  return comb, mask, np.arange(w) < lane.k


def _make_tx(problem, cfg, lr, arm, k):
  if cfg.warmup:
    lr_of = lambda count: lr * jnp.minimum(1.0, (count + 1.0) / cfg.warmup)
  else:
    lr_of = lr
  if cfg.optimizer == 'adamw':
    inner = optax.adamw(lr_of, weight_decay=problem.weight_decay)
  elif cfg.optimizer == 'sgdm':
    inner = optax.sgd(lr_of, momentum=0.9)
  else:
    raise ValueError(cfg.optimizer)
  if not cfg.cells:
    return inner
  first = arm_transform(cfg.slots, arm)
  if cfg.window > 1:
    return optax.chain(first, grain_optax.accumulate(
        inner, every_k=k, max_every_k=cfg.window))
  return optax.chain(first, inner)


def _select(flag, new, old):
  return jax.tree_util.tree_map(lambda a, b: jnp.where(flag, a, b), new, old)


def _program(problem: Problem, cfg: Config):
  """The jitted, lane-vmapped program: train, then predict on eval sets."""
  b, g = problem.batch, cfg.cells
  if g and b % g:
    raise ValueError(f'batch {b} must split into {g} cells')
  tree_map = jax.tree_util.tree_map
  hi = jax.lax.Precision.HIGHEST

  def one_lane(lane_params, lr, arm, k, comb, gmask, active, order, key,
               shared, frozen, rest, x_pool, y_pool, eval_x):
    params = {'lane': lane_params, 'shared': shared}
    tx = _make_tx(problem, cfg, lr, arm, k)
    state = tx.init(params)

    def loss_fn(p, batch):
      return problem.loss(p, frozen, rest, batch, cfg.dropout)

    def step(carry, inp):
      params, state = carry
      idx, skey = inp
      batch = {'x': tree_map(lambda a: a[idx], x_pool), 'y': y_pool[idx],
               'keys': jax.random.split(skey, b)}
      if not g:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), {'loss': loss}
      cell_losses, cells = grain_optax.group_value_and_grad(loss_fn, g)(
          params, batch)

      def micro(carry, inp):
        params, state = carry
        c, gm, on = inp
        if cfg.direct:
          groups = cells
        else:
          groups = tree_map(
              lambda x: jnp.einsum('sg,g...->s...', c, x.astype(jnp.float32),
                                   precision=hi).astype(x.dtype), cells)
        updates, new_state = tx.update(groups, state, params, group_mask=gm)
        new_params = optax.apply_updates(params, updates)
        gs = new_state[0]
        out = {'mmc': jnp.where(on, gs.mean_min_cosine, jnp.nan),
               'nr': jnp.where(on, gs.norm_ratio, jnp.nan)}
        return (_select(on, new_params, params),
                _select(on, new_state, state)), out

      (params, state), out = jax.lax.scan(micro, (params, state),
                                          (comb, gmask, active))
      trace = {'loss': jnp.mean(cell_losses), **out}
      if cfg.window > 1:
        trace['acc_mmc'] = state[1].stats.mean_min_cosine
        trace['acc_nr'] = state[1].stats.norm_ratio
      return (params, state), trace

    keys = jax.random.split(key, problem.steps)
    (params, _), trace = jax.lax.scan(step, (params, state), (order, keys))

    def evaluate(xc):
      out = jax.lax.map(
          lambda chunk: problem.predict(params, frozen, rest, chunk), xc)
      return out.reshape((-1,) + out.shape[2:])

    preds = {split: evaluate(xc) for split, xc in eval_x.items()}
    return preds, trace

  in_axes = (0,) * 9 + (None,) * 6
  return jax.jit(jax.vmap(one_lane, in_axes=in_axes))


@jax.jit
def _lane_keys(seeds):
  return jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), 2))(seeds)


class Runner:
  """Compiles once per (problem, config), runs lanes in fixed-size chunks."""

  def __init__(self, lanes: int, log):
    self.lanes = lanes
    self.log = log
    self.compiled: Dict[Any, Any] = {}
    self.compile_s: Dict[Any, float] = {}

  @staticmethod
  def order(problem, seed):
    """[steps, B] pool indices: the seed's few-shot sample, reshuffled every
    epoch, cut into consecutive batches (the same for every method)."""
    sample = problem.sample(seed)
    rng = np.random.default_rng([seed, 3])
    need = problem.steps * problem.batch
    perms = [rng.permutation(sample) for _ in range(-(-need // len(sample)))]
    return np.concatenate(perms)[:need].reshape(problem.steps, problem.batch)

  def run(self, problem: Problem, cfg: Config, lanes: List[Lane]):
    """Trains every lane; returns per-lane dicts (preds per split, traces)."""
    n = len(lanes)
    padded = lanes + [lanes[-1]] * (-n % self.lanes)
    results = []
    for c in range(0, len(padded), self.lanes):
      chunk = padded[c:c + self.lanes]
      lane_params, shared = problem.init_lanes([l.seed for l in chunk])
      if cfg.cells:
        plans = [lane_plan(cfg, l) for l in chunk]
      else:
        plans = [(np.zeros((1, 1, 1), np.float32), np.ones((1, 1), bool),
                  np.ones(1, bool))] * len(chunk)
      args = (lane_params,
              jnp.asarray([l.lr for l in chunk], jnp.float32),
              jnp.asarray([ARM_CODE[l.arm] for l in chunk], jnp.int32),
              jnp.asarray([l.k for l in chunk], jnp.int32),
              jnp.asarray(np.stack([p[0] for p in plans])),
              jnp.asarray(np.stack([p[1] for p in plans])),
              jnp.asarray(np.stack([p[2] for p in plans])),
              jnp.asarray(np.stack([self.order(problem, l.seed) for l in chunk]),
                          jnp.int32),
              _lane_keys(np.asarray([l.seed for l in chunk], np.uint32)),
              shared, problem.frozen, problem.rest, problem.x_pool,
              problem.y_pool, {s: x for s, (x, _) in problem.evals.items()})
      key = (problem.key(), cfg)
      if key not in self.compiled:
        t0 = time.perf_counter()
        self.compiled[key] = _program(problem, cfg).lower(*args).compile()
        self.compile_s[key] = time.perf_counter() - t0
        self.log(f'  compiled {problem.key()} {cfg} in '
                 f'{self.compile_s[key]:.1f} s')
      t0 = time.perf_counter()
      preds, trace = self.compiled[key](*args)
      preds, trace = jax.device_get((preds, trace))
      dt = time.perf_counter() - t0
      for i in range(len(chunk)):
        if c + i >= n:
          break
        results.append({
            'preds': {s: np.asarray(p[i]) for s, p in preds.items()},
            'trace': {name: np.asarray(v[i]) for name, v in trace.items()},
            'train_s': dt / len(chunk),
            'compile_s': self.compile_s[key]})
    return results


def _record(problem, cfg, lane, res, split, **extra):
  preds = res['preds'][split]
  labels = problem.evals[split][1]
  n = len(labels)
  preds = preds[:n]
  trace = res['trace']
  losses = trace['loss']
  final_loss = float(np.mean(losses[-5:]))
  if problem.kind == 'classification':
    preds = preds.astype(np.int64)
    metric = float(np.mean(preds == labels))
    top_share = float(np.max(np.bincount(preds.astype(np.int64))) / n)
    failed = (not np.isfinite(final_loss)
              or metric <= problem.majority[split] + 0.02)
  else:
    ss = np.sum((labels - labels.mean()) ** 2)
    metric = float(1.0 - np.sum((preds - labels) ** 2) / ss)
    top_share = None
    failed = not np.isfinite(final_loss) or not metric > 0.0
  if not cfg.cells:
    method = 'plain'
  elif lane.k > 1:   # across-batch GRAIN; within: the arm (m > 1) or nothing
    method = lane.arm + '+acc' if lane.m > 1 else 'acc'
  else:
    method = lane.arm
  rec = {
      'task': problem.name, 'regime': problem.regime,
      'optimizer': cfg.optimizer, 'variant': cfg.variant, 'method': method,
      'm': lane.m if cfg.cells else 0, 'k': lane.k, 'lr': lane.lr,
      'seed': lane.seed, 'split': split,
      'metric_name': problem.metric_name, 'metric': metric,
      'failed': bool(failed), 'majority': problem.majority[split],
      'top_share': top_share, 'final_loss': final_loss,
      'steps': problem.steps, 'batch': problem.batch,
      'warmup': cfg.warmup, 'dropout': cfg.dropout,
      'train_s': res['train_s'], 'compile_s': res['compile_s'],
  }
  if cfg.cells and lane.m > 1:
    mmc = trace['mmc'][np.isfinite(trace['mmc'])]
    rec['conflict_share'] = float(np.mean(mmc < 0)) if mmc.size else None
    rec['norm_ratio'] = float(np.nanmean(trace['nr']))
  if cfg.cells and lane.k > 1:
    rec['acc_conflict_share'] = float(np.mean(trace['acc_mmc'] < 0))
    rec['acc_norm_ratio'] = float(np.mean(trace['acc_nr']))
    if lane.m <= 1:
      rec['norm_ratio'] = rec['acc_norm_ratio']
  if split == 'test' and problem.kind == 'classification':
    rec['preds'] = stats.encode_predictions(preds)
  rec.update(extra)
  return rec


# ============================================================================
# The study.


class Budget(Exception):
  pass


class Study:

  def __init__(self, args, problems, out_path):
    self.args = args
    self.problems = problems          # (task, regime) -> Problem
    self.out = open(out_path, 'a')
    self.t0 = time.perf_counter()
    self.runner = Runner(args.lanes, self.log)
    # The groups m-sweep holds B cells and B group gradients per lane.
    self.runners = {'groups': Runner(max(1, args.lanes // 2), self.log)}
    self.chosen = {}
    self.chunk_s = []
    self.compile_times = []

  def log(self, msg):
    print(f'[{time.perf_counter() - self.t0:7.1f} s] {msg}', flush=True)

  def write(self, rec):
    self.out.write(json.dumps(rec) + '\n')
    self.out.flush()

  def check_budget(self, n_chunks, compile_needed=False):
    if not self.args.budget_seconds:
      return
    per = np.median(self.chunk_s) if self.chunk_s else 0.0
    need = per * n_chunks
    if compile_needed and self.compile_times:
      need += np.mean(self.compile_times)
    left = self.args.budget_seconds - (time.perf_counter() - self.t0)
    if left < need:
      raise Budget(f'{left:.0f} s left, next job needs ~{need:.0f} s')

  def execute(self, problem, cfg, lanes, split, stage, **extra):
    runner = self.runners.get(stage, self.runner)
    n_chunks = -(-len(lanes) // runner.lanes)
    key = (problem.key(), cfg)
    fresh = key not in runner.compiled
    self.check_budget(n_chunks, fresh)
    t0 = time.perf_counter()
    res = runner.run(problem, cfg, lanes)
    dt = time.perf_counter() - t0 - (runner.compile_s[key] if fresh else 0)
    self.chunk_s.append(dt / n_chunks)
    if fresh:
      self.compile_times.append(runner.compile_s[key])
    recs = []
    for lane, r in zip(lanes, res):
      rec = _record(problem, cfg, lane, r, split, suite=self.args.suite,
                    stage=stage, **extra)
      self.write(rec)
      recs.append(rec)
    self.log(f'  {stage} {problem.name}/{problem.regime} {cfg.optimizer} '
             f'{cfg.variant or ""}: {len(lanes)} runs in {n_chunks} chunks, '
             f'{dt:.1f} s ({dt / max(1, len(lanes)):.3f} s/run)')
    return recs

  # -------------------------------------------------------------- stages

  def main_cfg(self):
    a = self.args
    return Config(cells=a.groups * a.accumulate, slots=a.groups,
                  window=a.accumulate)

  def main_methods(self):
    a = self.args
    return [('mean', 'mean', a.groups, 1), ('grain', 'grain', a.groups, 1),
            ('grain+acc', 'grain', a.groups, a.accumulate)]

  def main_stage(self, problem):
    a = self.args
    cfg = self.main_cfg()
    val_seeds = list(range(1000, 1000 + a.val_seeds))
    test_seeds = list(range(a.seeds))
    methods = self.main_methods()
    scores = {}
    lanes = [Lane(arm, lr, s, m, k) for (_, arm, m, k) in methods
             for lr in problem.lr_grid for s in val_seeds]
    for rec in self.execute(problem, cfg, lanes, 'val', 'main'):
      scores.setdefault((rec['method'], rec['lr']), []).append(rec['metric'])
    names = [n for n, *_ in methods]
    for name in names:
      best = max(problem.lr_grid,
                 key=lambda lr: np.nan_to_num(np.nanmean(scores[(name, lr)]),
                                              nan=-np.inf))
      self.chosen[(problem.name, problem.regime, name)] = best
      self.log(f'  {problem.name}/{problem.regime} {name}: lr {best:g} (val '
               + ', '.join(f'{lr:g}: {np.nanmean(scores[(name, lr)]):.3f}'
                           for lr in problem.lr_grid) + ')')
      self.write({'type': 'meta', 'stage': 'main', 'task': problem.name,
                  'regime': problem.regime, 'method': name, 'chosen_lr': best,
                  'val_scores': {f'{lr:g}': float(np.nanmean(scores[(name, lr)]))
                                 for lr in problem.lr_grid}})
    lrs = sorted({self.chosen[(problem.name, problem.regime, n)] for n in names})
    lanes = [Lane(arm, lr, s, m, k) for (_, arm, m, k) in methods
             for lr in lrs for s in test_seeds]
    self.execute(problem, cfg, lanes, 'test', 'main')

  def sweep_cfg(self, **kw):
    m = self.args.sweep_groups
    kw.setdefault('optimizer', self.args.sweep_optimizer)
    if not m:   # the main program (no extra compile; tests use this)
      return dataclasses.replace(self.main_cfg(), **kw)
    return Config(cells=m, slots=m, window=1, direct=True, **kw)

  def sweep_stage(self, problem, cfg, grid=None):
    seeds = list(range(self.args.sweep_seeds))
    grid = grid or problem.sweep_grid
    m = self.args.sweep_groups or self.args.groups
    lanes = [Lane(arm, lr, s, m, 1) for lr in grid for arm in ARMS
             for s in seeds]
    self.execute(problem, cfg, lanes, 'test', 'sweep')

  def groups_cfgs(self, problem):
    """Two programs: m-sweep (one example per cell, up to B slots, no
    window) and k-sweep (2-example cells, one group, a window of up to 8):
    one program covering both would hold B cells x B slots x 8 micro-steps."""
    b = problem.batch
    ks = [k for k in (2, 4, 8) if b % k == 0 and (b // 2) % k == 0]
    return (Config(cells=b, slots=b, window=1),
            Config(cells=b // 2, slots=1, window=max(ks)) if ks else None), ks

  def groups_stage(self, problem):
    """GRAIN with m in {2, 4, 8, B} groups (and the mean), and GRAIN across
    k in {2, 4, 8} micro-batches with the plain mean inside each, at GRAIN's
    tuned AdamW rate (the middle of the grid without the main stage)."""
    a = self.args
    b = problem.batch
    lr = self.chosen.get((problem.name, problem.regime, 'grain'),
                         problem.lr_grid[len(problem.lr_grid) // 2])
    seeds = list(range(a.sweep_seeds))
    (cfg_m, cfg_k), ks = self.groups_cfgs(problem)
    specs = [('mean', b)] + [('grain', m) for m in sorted({2, 4, 8, b})
                             if b % m == 0 and m > 1]
    self.execute(problem, cfg_m, [Lane(arm, lr, s, m, 1) for (arm, m) in specs
                                  for s in seeds], 'test', 'groups')
    if cfg_k is not None:
      self.execute(problem, cfg_k, [Lane('grain', lr, s, 1, k) for k in ks
                                    for s in seeds], 'test', 'groups')

  def timing_cfgs(self):
    return (Config(cells=0, slots=0, window=1),
            Config(cells=self.args.groups, slots=self.args.groups, window=1))

  def timing_stage(self, problem):
    """The plain batch gradient (no groups) against grain(num_groups=m) as a
    user runs it (cells = groups = m, no window), at the mean's rate."""
    a = self.args
    lr = self.chosen.get((problem.name, problem.regime, 'mean'),
                         problem.lr_grid[len(problem.lr_grid) // 2])
    seeds = list(range(a.seeds))
    plain, grain = self.timing_cfgs()
    self.execute(problem, plain, [Lane('mean', lr, s, 0, 1) for s in seeds],
                 'test', 'timing')
    self.execute(problem, grain,
                 [Lane('grain', lr, s, a.groups, 1) for s in seeds], 'test',
                 'timing')

  def jobs(self):
    """The plan: (stage, problem, thunk, configs it compiles), by priority."""
    a = self.args
    probs = list(self.problems.values())
    full = [p for p in probs if p.regime == 'full']
    part = functools.partial
    plan = []
    if 'main' in a.stages:
      plan += [('main', p, part(self.main_stage, p), [self.main_cfg()])
               for p in probs]
    if 'sweep' in a.stages:
      plan += [('sweep', p, part(self.sweep_stage, p, self.sweep_cfg()),
                [self.sweep_cfg()]) for p in full]
    if 'groups' in a.stages:
      plan += [('groups', p, part(self.groups_stage, p),
                [c for c in self.groups_cfgs(p)[0] if c]) for p in full]
    if 'variants' in a.stages:
      for p in full:
        warm = max(1, p.steps // 10)
        cfgs = [self.sweep_cfg(warmup=warm, variant=f'warmup{warm}'),
                self.sweep_cfg(dropout=True, variant='dropout')]
        for cfg in cfgs:
          plan.append(('variants', p, part(self.sweep_stage, p, cfg), [cfg]))
        if a.sweep_optimizer != 'adamw':
          cfg = self.sweep_cfg(optimizer='adamw', variant='adamw')
          plan.append(('variants', p, part(
              self.sweep_stage, p, cfg,
              tuple(lr * 1e-2 for lr in p.sweep_grid)), [cfg]))
    if 'timing' in a.stages:   # the first task only (2 compiles per problem)
      plan += [('timing', p, part(self.timing_stage, p), list(self.timing_cfgs()))
               for p in probs if p.name == probs[0].name]
    return plan

  def run(self):
    plan = self.jobs()
    self.estimate(plan, 0)
    stopped = None
    try:
      for i, (stage, p, thunk, _) in enumerate(plan):
        self.log(f'stage {stage}: {p.name}/{p.regime}')
        thunk()
        if i == 0:
          self.estimate(plan, 1)
    except Budget as e:
      stopped = str(e)
      self.log(f'stopping: {e}')
    return stopped

  def estimate(self, plan, done):
    """Chunks and compiles left; seconds once a chunk was timed."""
    a = self.args
    n_chunks = 0
    ch = lambda n, lanes=a.lanes: -(-n // lanes)
    compiled = {k for r in [self.runner, *self.runners.values()]
                for k in r.compiled}
    for stage, p, _, cfgs in plan[done:]:
      compiled |= {(p.key(), c) for c in cfgs}
      g = len(p.lr_grid)
      if stage == 'main':
        n_chunks += ch(3 * g * a.val_seeds) + ch(3 * 2 * a.seeds)
      elif stage in ('sweep', 'variants'):
        n_chunks += ch(len(ARMS) * len(p.sweep_grid) * a.sweep_seeds)
      elif stage == 'groups':
        n_chunks += 2 * ch(5 * a.sweep_seeds) + ch(3 * a.sweep_seeds)
      elif stage == 'timing':
        n_chunks += 2 * ch(a.seeds)
    n_compiles = len(compiled) - sum(len(r.compiled) for r in
                                     [self.runner, *self.runners.values()])
    msg = (f'plan: {len(plan) - done} jobs left, ~{n_chunks} chunks of <= '
           f'{a.lanes} lanes, {n_compiles} compiles')
    if self.chunk_s and self.compile_times:
      c = float(np.mean(self.compile_times))
      per = float(np.median(self.chunk_s))
      est = n_chunks * per + n_compiles * c
      msg += (f'; estimate {est:.0f} s more (a chunk {per:.1f} s, a compile '
              f'{c:.1f} s)')
    self.log(msg)


# ============================================================================
# CLI.


def _versions():
  out = {'python': platform.python_version()}
  for name in ('jax', 'jaxlib', 'optax', 'flax', 'numpy', 'scikit-learn'):
    try:
      import importlib.metadata as md  # pylint: disable=g-import-not-at-top
      out[name] = md.version(name)
    except Exception:  # pylint: disable=broad-except
      pass
  dev = jax.devices()[0]
  out['device'] = f'{dev.platform}: {getattr(dev, "device_kind", "")} ' \
                  f'x{jax.device_count()}'
  out['cpu_count'] = os.cpu_count()
  return out


def build_problems(args):
  seeds_needed = (list(range(args.seeds)) + list(range(1000, 1000 + args.val_seeds))
                  + list(range(args.sweep_seeds)))
  problems = {}
  if args.suite == 'sklearn':
    for t in args.tasks or SKLEARN_TASKS:
      problems[(t, 'full')] = sklearn_problem(t, steps=args.steps or 150)
  else:
    for t in args.tasks or tuple(MINILM_TASKS):
      for regime in args.regimes:
        problems[(t, regime)] = minilm_problem(
            t, regime, steps=args.steps or 60, lora_rank=args.lora_rank,
            compute_dtype=jnp.dtype(args.compute_dtype),
            max_eval=args.max_eval, seeds_needed=sorted(set(seeds_needed)),
            num_layers=args.num_layers)
  if args.lr_grid or args.sweep_grid:
    for p in problems.values():
      if args.lr_grid:
        p.lr_grid = tuple(args.lr_grid)
      if args.sweep_grid:
        p.sweep_grid = tuple(args.sweep_grid)
  return problems


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--suite', choices=('sklearn', 'minilm'), default='sklearn')
  p.add_argument('--tiny', action='store_true',
                 help='a few steps, 2 seeds, 2 learning rates (CI smoke test)')
  p.add_argument('--stages', nargs='+',
                 default=['main', 'sweep', 'groups', 'variants', 'timing'],
                 choices=['main', 'sweep', 'groups', 'variants', 'timing'])
  p.add_argument('--tasks', nargs='+', default=None)
  p.add_argument('--regimes', nargs='+', default=['full', 'lora'],
                 choices=['full', 'lora'])
  p.add_argument('--seeds', type=int, default=20, help='test seeds per cell')
  p.add_argument('--val-seeds', type=int, default=5)
  p.add_argument('--sweep-seeds', type=int, default=10)
  p.add_argument('--steps', type=int, default=None,
                 help='optimizer steps (default sklearn 150, minilm 60)')
  p.add_argument('--groups', type=int, default=4)
  p.add_argument('--accumulate', type=int, default=2)
  p.add_argument('--sweep-groups', type=int, default=16,
                 help='m of the learning-rate sweep (16 = one example per '
                 'group at batch 16, the setting of the issue\'s probe)')
  p.add_argument('--sweep-optimizer', default='sgdm', choices=['sgdm', 'adamw'])
  p.add_argument('--lr-grid', type=float, nargs='+', default=None)
  p.add_argument('--sweep-grid', type=float, nargs='+', default=None)
  p.add_argument('--lanes', type=int, default=None,
                 help='runs batched (vmap) in one call of a compiled program '
                 '(default: sklearn 60, minilm 20)')
  p.add_argument('--lora-rank', type=int, default=8)
  p.add_argument('--compute-dtype', default='bfloat16')
  p.add_argument('--max-eval', type=int, default=None,
                 help='subsample the validation/test splits (minilm)')
  p.add_argument('--num-layers', type=int, default=None,
                 help='load only the first MiniLM layers (smoke tests)')
  p.add_argument('--budget-seconds', type=float, default=None,
                 help='stop between chunks when the next would not fit')
  p.add_argument('--out', default=None, help='JSON lines file (appended)')
  p.add_argument('--chosen-from', nargs='+', default=None, metavar='JSONL',
                 help='take the tuned learning rates (for the groups and '
                 'timing stages) from earlier result files, e.g. of a '
                 '--stages main run')
  p.add_argument('--report', nargs='+', default=None, metavar='FILE',
                 help='--report OUT.md IN.jsonl...: write the markdown report '
                 '(and OUT.png) from result files, no training')
  args = p.parse_args(argv)
  if args.lanes is None:
    args.lanes = 60 if args.suite == 'sklearn' else 20
  if args.tiny:
    args.seeds, args.val_seeds, args.sweep_seeds = 3, 2, 2
    args.steps = args.steps or 6
    args.lanes = min(args.lanes, 8)
    args.lr_grid = args.lr_grid or ([1e-3, 1e-2] if args.suite == 'sklearn'
                                    else [5e-5, 2e-4])
    args.sweep_grid = args.sweep_grid or ([0.1, 3.0] if args.suite == 'sklearn'
                                          else [1e-2, 0.3])
    args.max_eval = args.max_eval or 64
  return args


def report(paths: Sequence[str]):
  """Writes the markdown report paths[0] (and a PNG beside it) from the
  JSON-lines result files paths[1:], one section per file."""
  md_path = pathlib.Path(paths[0])
  png = md_path.with_suffix('.png')
  all_runs = []
  sections = []
  for path in paths[1:]:
    runs, metas = stats.load([path])
    for meta in metas:
      if meta.get('stage') == 'main' and 'chosen_lr' in meta:
        for r in runs:
          if (r.get('stage') == 'main' and r['task'] == meta['task'] and
              r['regime'] == meta['regime'] and r['method'] == meta['method']):
            r['chosen_lr'] = meta['chosen_lr']
    all_runs += runs
    head = [m for m in metas if m.get('kind') == 'run']
    suite = head[0].get('suite') if head else '?'
    device = head[0].get('device', '?') if head else '?'
    title = (f'{suite} suite ({"CPU" if "cpu" in device.lower() else "GPU"} '
             f'results, {pathlib.Path(path).name})')
    notes = pathlib.Path(path).with_suffix('.notes.md')
    if notes.exists():
      head = head + [{'notes': notes.read_text()}]
    sections.append((title, runs, head))
  fig = stats.figure(all_runs, str(png),
                     title='Per-seed test scores, each method at its own '
                     'tuned learning rate')
  text = [stats.HEADER]
  for title, runs, head in sections:
    text.append(stats.markdown(runs, head, title=title,
                               figure=png.name if fig else None))
    fig = None  # the figure is shown once, in the first section
  md_path.write_text('\n'.join(text))
  print(f'wrote {md_path}' + (f' and {png}' if png.exists() else ''))


def main(argv=None):
  args = parse_args(argv)
  if args.report:
    report(args.report)
    return 0
  t0 = time.perf_counter()
  device = 'gpu' if jax.default_backend() == 'gpu' else 'cpu'
  out = pathlib.Path(args.out or RESULTS / (
      f'stability_{args.suite}_{device}{"_tiny" if args.tiny else ""}.jsonl'))
  out.parent.mkdir(parents=True, exist_ok=True)
  command = 'python benchmarks/stability.py ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  print(f'stability study: suite {args.suite}, writing {out}', flush=True)
  problems = build_problems(args)
  study = Study(args, problems, out)
  if args.chosen_from:
    for meta in stats.load(args.chosen_from)[1]:
      if 'chosen_lr' in meta:
        study.chosen[(meta['task'], meta['regime'], meta['method'])] = (
            meta['chosen_lr'])
  meta = {'type': 'meta', 'kind': 'run', 'suite': args.suite,
          'command': command, 'date': datetime.date.today().isoformat(),
          'args': vars(args), **_versions()}
  stopped = study.run()
  meta['elapsed_s'] = time.perf_counter() - t0
  meta['stopped'] = stopped
  meta['compile_s'] = {f'{k[0]} {k[1]}': v
                       for r in [study.runner, *study.runners.values()]
                       for k, v in r.compile_s.items()}
  meta['chosen'] = {'/'.join(k): v for k, v in study.chosen.items()}
  study.write(meta)
  study.out.close()
  print(f'done in {meta["elapsed_s"]:.0f} s' +
        (f' (stopped: {stopped})' if stopped else '') + f'; results in {out}',
        flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
