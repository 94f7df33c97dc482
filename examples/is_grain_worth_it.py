"""Is GRAIN worth it for my run? Train in monitor mode and read the verdict.

Monitor mode is ``grain(num_groups=m, apply='mean')`` chained before your
optimizer: the update is the plain mean of the m group gradients, so training
is the same as without ``grain()`` (to float32 rounding), while GRAIN's weights
and statistics are still computed every step. Two lines change::

    tx = optax.chain(grain_optax.grain(num_groups=4, apply='mean'), optax.adamw(lr))
    losses, grads = grain_optax.group_value_and_grad(loss_fn, 4)(params, batch)

This script runs such a training for ``--steps`` steps and logs
``grain_optax.metrics(...)`` three ways: a tqdm progress bar (conflict rate
so far, norm ratio), a JSON-lines file (one line per step) and a PNG plot of
the conflict rate and the norm ratio over training. It then prints the
conflict rate, the median norm ratio and the effective number of groups, and
what this project's stability study (``benchmarks/STABILITY.md``, summarised
in ``docs/when_grain_helps.md``) found for the closest regime, with the
variant to try. The guide is ``docs/guides/monitor.md``.

    python examples/is_grain_worth_it.py                         # digits MLP, AdamW 3e-3, m=4, 300 steps
    python examples/is_grain_worth_it.py --optimizer sgd --lr 1  # SGD + momentum 0.9 at a high rate
    python examples/is_grain_worth_it.py --minilm                # MiniLM-L6 fine-tuning, BBC 8/class
    python examples/is_grain_worth_it.py --tiny                  # a few seconds on a CPU (the test)
    python examples/is_grain_worth_it.py --cost 50               # + time a step with and without it
    python examples/is_grain_worth_it.py --noisy-labels          # the verdict for noisy labels

The metrics are computed inside the jitted step (``grain_optax.metrics`` on a
traced state returns scalar arrays) and converted to Python numbers outside;
called outside ``jit`` on the final state, the same function returns Python
``bool``/``int``/``float`` directly.
"""

import argparse
import json
import math
import pathlib
import statistics
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position

import grain_optax  # pylint: disable=g-import-not-at-top,wrong-import-position

# The keys of grain_optax.metrics() for grain() in first place of a chain.
KEYS = ('grain/count', 'grain/conflict', 'grain/mean_min_cosine', 'grain/update_min_cosine',
        'grain/min_norm_min_cosine', 'grain/norm_ratio',
        'grain/effective_groups', 'grain/num_nonfinite', 'grain/num_excluded',
        'grain/solver_iterations', 'grain/kkt_residual')


def make_inner(optimizer, lr):
  """The user's optimizer: AdamW, or SGD with momentum 0.9."""
  if optimizer == 'adamw':
    return optax.adamw(lr)
  if optimizer == 'sgd':
    return optax.sgd(lr, momentum=0.9)
  raise ValueError(f'optimizer: adamw or sgd, not {optimizer!r}')


def monitored(inner, num_groups):
  """Monitor mode: the plain mean applied, GRAIN computed and logged."""
  return optax.chain(grain_optax.grain(num_groups=num_groups, apply='mean'),
                     inner)


# ------------------------------------------------------------------ digits


class Digits:
  """The MLP on scikit-learn's digits of ``examples/quickstart.py``."""

  def __init__(self, args):
    self.args = args
    (self.x, self.y), self.test = quickstart.load_data(args.per_class,
                                                       args.seed)
    self.inner = make_inner(args.optimizer, args.lr)
    self.tx = monitored(self.inner, args.groups)
    self.rng = np.random.default_rng(args.seed)
    m = args.groups
    tx = self.tx

    @jax.jit
    def step(carry, batch):
      params, opt_state = carry
      losses, grads = grain_optax.group_value_and_grad(quickstart.loss_fn, m)(
          params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      # Inside jit: a dict of scalar arrays, returned with the step.
      logs = grain_optax.metrics(opt_state)
      return (optax.apply_updates(params, updates), opt_state), losses.mean(), logs

    inner = self.inner

    @jax.jit
    def plain_step(carry, batch):  # the same step without grain(), for --cost
      params, opt_state = carry
      loss, grads = jax.value_and_grad(quickstart.loss_fn)(params, batch)
      updates, opt_state = inner.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss, {}

    self.step, self.plain_step = step, plain_step
    self.description = (
        f'digits MLP, {args.per_class} images/class, batch {args.batch}, '
        f'm={m}, {args.optimizer} lr {args.lr:g}')

  def init(self):
    params = quickstart.init_mlp(jax.random.PRNGKey(self.args.seed))
    return params, self.tx.init(params)

  def init_plain(self):
    params = quickstart.init_mlp(jax.random.PRNGKey(self.args.seed))
    return params, self.inner.init(params)

  def batches(self):
    while True:
      idx = self.rng.choice(len(self.y), self.args.batch, replace=False)
      yield self.x[idx], self.y[idx]

  def opt_state(self, carry):
    return carry[1]

  def evaluate(self, carry):
    """(test accuracy, majority-class share of the test set)."""
    x, y = self.test
    pred = jnp.argmax(quickstart.logits_fn(carry[0], x), axis=-1)
    return float(jnp.mean(pred == y)), float(np.bincount(y).max() / len(y))


# ------------------------------------------------------------------ MiniLM


class MiniLM:
  """Few-shot fine-tuning of all-MiniLM-L6-v2 (Flax NNX), the setup of
  ``examples/finetune_text.py`` (its model, loss and batches), with the
  optimizer in an ``nnx.Optimizer``."""

  def __init__(self, args):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    import finetune_text  # pylint: disable=g-import-not-at-top
    import minilm  # pylint: disable=g-import-not-at-top
    import text_data  # pylint: disable=g-import-not-at-top
    self.args, self.nnx, self.ft = args, nnx, finetune_text
    task = text_data.load_task(args.task)
    texts, labels = text_data.few_shot(task, args.shots, args.seed)
    if len(texts) < args.batch:
      raise SystemExit(f'{len(texts)} training examples < --batch {args.batch}')
    self.ids, self.mask = minilm.tokenize(texts, args.max_len)
    self.labels = labels
    self.test = text_data.subsample(task.test, args.eval_size)
    self.num_classes = task.num_classes
    self.inner = make_inner(args.optimizer, args.lr)
    m = args.groups
    loss_fn = finetune_text.loss_fn

    @nnx.jit
    def step(model, optimizer, batch):
      wrt = model.trainable()
      losses, grads = grain_optax.nnx_group_value_and_grad(
          loss_fn, m, wrt=wrt)(model, batch)
      optimizer.update(model, grads)
      return losses.mean(), grain_optax.metrics(optimizer.opt_state)

    @nnx.jit
    def plain_step(model, optimizer, batch):
      grad_fn = nnx.value_and_grad(
          loss_fn, argnums=nnx.DiffState(0, model.trainable()))
      loss, grads = grad_fn(model, batch)
      optimizer.update(model, grads)
      return loss, {}

    # (model, optimizer) objects are updated in place by nnx.jit.
    self.step = lambda carry, batch: (carry, *step(*carry, batch))
    self.plain_step = lambda carry, batch: (carry, *plain_step(*carry, batch))
    kind = f'LoRA r={args.lora_rank}' if args.lora_rank else 'full'
    self.description = (
        f'MiniLM-L6 {kind} fine-tuning, {args.task} {args.shots}/class, batch '
        f'{args.batch} x {args.max_len} tokens, m={m}, {args.optimizer} lr '
        f'{args.lr:g}')

  def _model(self):
    a = self.args
    return self.ft.build_model(self.num_classes, lora_rank=a.lora_rank,
                               seed=a.seed, num_layers=a.layers)

  def init(self):
    model = self._model()
    tx = monitored(self.inner, self.args.groups)
    return model, self.nnx.Optimizer(model, tx, wrt=model.trainable())

  def init_plain(self):
    model = self._model()
    return model, self.nnx.Optimizer(model, self.inner, wrt=model.trainable())

  def batches(self):
    epochs = 10 ** 6  # as many as --steps needs
    return self.ft.batches(self.ids, self.mask, self.labels, self.args.batch,
                           epochs, self.args.seed)

  def opt_state(self, carry):
    return carry[1].opt_state

  def evaluate(self, carry):
    predict = self.ft.make_predict(carry[0], self.args.eval_batch,
                                   self.args.max_len)
    texts, labels = self.test
    return (float(np.mean(predict(texts) == labels)),
            float(np.bincount(labels).max() / len(labels)))


# ------------------------------------------------------------------ logging


def python_row(step, loss, logs):
  """One JSON-lines record: the step's arrays as Python numbers (non-finite
  floats as None, so every line is strict JSON)."""
  row = {'step': step, 'loss': float(loss)}
  values = jax.device_get(logs)   # one transfer
  # jit returns dicts with sorted keys: back to metrics()' order.
  for key in [k for k in KEYS if k in values] + sorted(set(values) - set(KEYS)):
    value = values[key].item()
    if isinstance(value, float) and not math.isfinite(value):
      value = None
    row[key] = value
  if row['loss'] is not None and not math.isfinite(row['loss']):
    row['loss'] = None
  return row


def running_mean(values):
  return np.cumsum(values) / np.arange(1, len(values) + 1)


def plot(rows, path, title):
  """Loss, conflict rate so far and norm ratio over training, as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  steps = np.array([r['step'] for r in rows])
  nan = float('nan')

  def column(key):
    return np.array([nan if r[key] is None else float(r[key]) for r in rows])

  ratio = column('grain/norm_ratio')
  fig, axes = plt.subplots(3, 1, figsize=(7, 7.5), sharex=True)
  axes[0].plot(steps, column('loss'), lw=1)
  axes[0].set_ylabel('training loss\n(the mean applied)')
  axes[1].plot(steps, running_mean(column('grain/conflict')), lw=1.5,
               label='conflict rate so far')
  axes[1].plot(steps, column('grain/mean_min_cosine'), lw=0.6, alpha=0.6,
               label="the mean's worst group cosine")
  axes[1].axhline(0, color='k', lw=0.5)
  axes[1].set_ylim(-1.05, 1.05)
  axes[1].set_ylabel('conflict')
  axes[1].legend(loc='lower right', fontsize=8)
  axes[2].plot(steps, ratio, lw=0.6, alpha=0.6, label='each step')
  axes[2].plot(steps, [np.nanmedian(ratio[:i + 1]) if np.any(
      np.isfinite(ratio[:i + 1])) else nan for i in range(len(ratio))],
               lw=1.5, label='median so far')
  axes[2].axhline(1, color='k', lw=0.5)
  axes[2].set_ylim(0, 1.05)
  axes[2].set_ylabel("norm ratio\n||GRAIN|| / ||mean||")
  axes[2].set_xlabel('step')
  axes[2].legend(loc='lower left', fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ------------------------------------------------------------------ verdict


def summarize(rows, accuracy, majority, groups):
  """The run's figures: conflict rate, medians, whether the mean trained.

  The conflict rate and the medians are over the steps on which some group
  was finite (when none is, GRAIN's statistics read 0). The mean failed
  (collapsed), as in the study, if the loss went non-finite or the test
  accuracy is within 0.02 of the majority-class share.
  """
  valid = [r for r in rows if r['grain/num_nonfinite'] +
           r['grain/num_excluded'] < groups]

  def finite(key):
    return [r[key] for r in valid if r[key] is not None]

  losses = [r['loss'] for r in rows]
  n = max(1, len(rows) // 10)
  first, last = losses[:n], losses[-n:]
  nonfinite_loss = any(v is None for v in losses)
  trained = not nonfinite_loss and accuracy > majority + 0.02
  ratio = finite('grain/norm_ratio')
  groups = finite('grain/effective_groups')
  cos = finite('grain/mean_min_cosine')
  return {
      'steps': len(rows),
      'steps_with_a_finite_group': len(valid),
      'conflict_rate': (statistics.fmean(r['grain/conflict'] for r in valid)
                        if valid else 0.0),
      'median_norm_ratio': statistics.median(ratio) if ratio else None,
      'norm_ratio_range': (min(ratio), max(ratio)) if ratio else None,
      'median_effective_groups': statistics.median(groups) if groups else None,
      'median_mean_min_cosine': statistics.median(cos) if cos else None,
      'steps_with_nonfinite_groups': sum(
          1 for r in rows if r['grain/num_nonfinite']),
      'loss_first': statistics.fmean(first) if not nonfinite_loss else None,
      'loss_last': statistics.fmean(last) if not nonfinite_loss else None,
      'nonfinite_loss': nonfinite_loss,
      'test_accuracy': accuracy,
      'majority_share': majority,
      'mean_trained': trained,
  }


SRC = 'benchmarks/STABILITY.md'
SEC_MINILM_ADAMW = "'minilm suite (GPU results, stability_minilm_main_h200.jsonl)'"
SEC_MINILM_SGD = ("'minilm suite (GPU results, stability_minilm_sweep_bbc_h200"
                  ".jsonl)' and '... sweep_tweets_h200.jsonl)'")
SEC_SKLEARN = "'sklearn suite (CPU results, stability_sklearn_cpu.jsonl)'"
SEC_REGIMES_NOISE = "'Regimes study (issue 24): minilm suite (regimes_bbc_noise.jsonl)'"
SEC_REGIMES_RARE = ("'Regimes study (issue 24): minilm suite "
                    "(regimes_bbc_imbalance.jsonl)'")

FINDINGS = {
    'adamw': (
        'AdamW',
        [f'MiniLM-L6 few-shot fine-tuning (BBC 8/class, tweets 32/class, full '
         f'and LoRA, m = 4, 20 paired seeds, each method at its own tuned '
         f'learning rate): GRAIN was 0.01-0.02 below the mean in all four '
         f'cells (test accuracy BBC full 0.884 vs 0.892, BBC LoRA 0.876 vs '
         f'0.889, tweets full 0.585 vs 0.607, tweets LoRA 0.593 vs 0.604), '
         f'with an equal or larger seed-to-seed spread (std ratio 0.95-2.2). '
         f'The mean conflicted on 10-20 % of steps there, and GRAIN\'s update '
         f'was 0.18-0.72 of the mean\'s length, which AdamW\'s normalisation '
         f'partly undoes. [{SRC}, section {SEC_MINILM_ADAMW}]',
         f'Small MLPs trained from scratch (m = 4, 20 seeds, tuned learning '
         f'rates): GRAIN did not beat the mean anywhere (digits 0.842 vs '
         f'0.846, breast cancer 0.908 vs 0.918, diabetes R2 0.140 vs 0.161). '
         f'In the AdamW learning-rate sweep on digits (m = 16) no variant '
         f'beat the mean by more than 0.006 at any rate (lr 1e-2: mean 0.847, '
         f'mean_at_grain_length 0.843, grain_at_mean_length 0.826, grain '
         f'0.569). [{SRC}, section {SEC_SKLEARN}]'],
        "Nothing beat the mean with AdamW at a tuned learning rate: keep your "
        "optimizer as it is (drop "
        "grain(), or keep apply='mean' only to keep watching). If you try "
        "apply='grain' anyway, tune its learning rate separately (its step is "
        "shorter) and compare each method at its own tuned rate."),
    'sgd_trains': (
        'SGD + momentum 0.9, at learning rates where the mean trains',
        [f'MiniLM-L6, BBC 8/class, full fine-tuning, m = 16 groups of one '
         f'example, 10 seeds, at lr 1e-3 / 3e-3: mean 0.897 / 0.906, grain '
         f'0.567 / 0.594, mean_at_grain_length 0.870 / 0.860, '
         f'grain_at_mean_length 0.746 / 0.201 (9/10 seeds failed at '
         f'3e-3). Tweets 32/class: mean 0.601 / 0.597, grain 0.461 / 0.449, '
         f'mean_at_grain_length 0.570 / 0.582. [{SRC}, sections '
         f'{SEC_MINILM_SGD}]',
         f'Small MLPs (m = 16): at every rate where the mean trains, GRAIN is '
         f'far worse (digits 0.41-0.62 against 0.84-0.85). [{SRC}, section '
         f'{SEC_SKLEARN}, learning-rate sweep]'],
        "Keep the plain mean: every variant was below it wherever it trained, "
        "but for one cell within noise (digits with dropout at lr 0.3: "
        "mean_at_grain_length 0.775 vs 0.741, paired difference +0.033 "
        "[-0.004, +0.077])."),
    'sgd_collapses': (
        'SGD + momentum 0.9, at learning rates where the mean collapses',
        [f'MiniLM-L6, BBC 8/class, lr 1e-2 (m = 16, 10 seeds; test accuracy, '
         f'failed seeds): mean 0.204 (10/10 failed), grain 0.476 (1/10), '
         f'mean_at_grain_length 0.729 (1/10), grain_at_mean_length 0.188 '
         f'(10/10). Tweets 32/class, lr 1e-2: mean 0.299 (8/10), grain 0.393 '
         f'(6/10), mean_at_grain_length 0.476 (6/10), grain_at_mean_length '
         f'0.311 (10/10). From lr 3e-2 on, every arm failed on 9 or 10 of 10 '
         f'seeds. [{SRC}, sections {SEC_MINILM_SGD}]',
         f'Small MLPs (m = 16): digits at lr 1: mean 0.156 (6/10 failed), '
         f'grain 0.294 (1/10), mean_at_grain_length 0.559 (1/10), '
         f'grain_at_mean_length 0.104 (9/10). The exception, breast cancer at '
         f'lr 3: grain 0.856 (0/10) beat mean_at_grain_length 0.695 (4/10) '
         f'and the mean 0.532 (7/10). [{SRC}, section {SEC_SKLEARN}, '
         f'learning-rate sweep]',
         'The gain is GRAIN\'s shorter step, not its direction: "a smaller '
         'learning rate would have done the same" (the mean at lr 3e-3 '
         'reached 0.906 on BBC, above every arm at 1e-2).'],
        "First lower the learning rate. To keep the rate, try "
        "apply='mean_at_grain_length' (the best arm at those collapsing "
        "rates, breast cancer excepted), then apply='grain'; not apply='grain_at_mean_length' "
        "(it collapsed like the mean)."),
    'noisy_labels': (
        'noisy labels: a share of the training labels is wrong',
        [f'MiniLM-L6, BBC 8/class with 20 % or 40 % of the training labels '
         f'flipped to another class, 60 steps of batch 16, 20 paired seeds, '
         f'each arm at its own tuned learning rate (paired difference in '
         f'test accuracy against the mean, 95 % CI): with m = 4 groups of 4 '
         f'examples GRAIN beat the mean under AdamW at 20 % '
         f'(+0.024 [+0.010, +0.039]) and under SGD + momentum at 20 % and '
         f'40 % (+0.033 [+0.023, +0.044], +0.030 [+0.021, +0.039]); GRAIN\'s '
         f'direction at the mean\'s length did better still '
         f'(+0.041 [+0.025, +0.057], +0.065 [+0.046, +0.082], '
         f'+0.055 [+0.039, +0.073]), so the gain is the direction\'s. AdamW '
         f'at 40 %: -0.042 [-0.087, +0.000], no detectable difference. '
         f'[{SRC}, section {SEC_REGIMES_NOISE}]',
         f'With one example per group (m = 16) GRAIN lost to the mean at '
         f'every noise level (-0.119 to -0.295), and a rare class lost most: '
         f'worst-class accuracy 0.079 against the mean\'s 0.417 under AdamW. '
         f'[{SRC}, sections {SEC_REGIMES_NOISE} and {SEC_REGIMES_RARE}]'],
        "Use groups of several examples (the study's: 4 per group, "
        "m = batch / 4), not one per example, with apply='grain' (fine-tuning "
        "a transformer, also try apply='grain_at_mean_length', the best arm "
        "on MiniLM), each at its own tuned learning rate, against the mean on "
        "the same seeds. In a replication on two small MLP tasks (after the "
        "fact) m = 4 helped in 6 of 8 noisy-label cells and hurt in none; the "
        "tasks are small, so check yours the same way. Watch a rare class: "
        "per-example GRAIN all but ignored it."),
}


def regime(optimizer, summary, noisy_labels=False):
  if noisy_labels:
    return 'noisy_labels'
  if optimizer == 'adamw':
    return 'adamw'
  return 'sgd_trains' if summary['mean_trained'] else 'sgd_collapses'


def _fmt(x, spec='.3f'):
  return 'n/a (every step non-finite)' if x is None else format(x, spec)


def verdict(summary, optimizer, groups, noisy_labels=False):
  """The plain-text summary and what the study found for this regime."""
  s = summary
  wrap = textwrap.TextWrapper(width=79, initial_indent='  - ',
                              subsequent_indent='    ')
  lines = [f"Monitor mode, {s['steps']} steps (the update was the plain mean; "
           f"GRAIN computed alongside):"]
  lines.append(f"  conflict rate            {s['conflict_rate']:.3f}  (steps "
               f"where the mean conflicted with a group)")
  lines.append(f"  median norm ratio        {_fmt(s['median_norm_ratio'])}  "
               f"(||GRAIN|| / ||mean||; 1: the same length)")
  if s['norm_ratio_range']:
    lo, hi = s['norm_ratio_range']
    lines.append(f'                           range {lo:.3f}-{hi:.3f}')
  lines.append(f"  effective groups         "
               f"{_fmt(s['median_effective_groups'], '.2f')} of {groups} "
               f"(median; exp of the weights' entropy)")
  lines.append(f"  mean's worst cosine      {_fmt(s['median_mean_min_cosine'])}"
               f"  (median over steps; below 0: a conflict)")
  if s['steps_with_nonfinite_groups']:
    lines.extend(textwrap.wrap(
        f"  steps with a non-finite group: {s['steps_with_nonfinite_groups']}"
        f" (the figures above are over the {s['steps_with_a_finite_group']} "
        f"steps with at least one finite group)", width=79,
        subsequent_indent=' ' * 27))
  if s['nonfinite_loss']:
    lines.append('  training loss            non-finite')
  else:
    lines.append(f"  training loss            {s['loss_first']:.4f} -> "
                 f"{s['loss_last']:.4f} (mean of the first and last tenth)")
  lines.extend(textwrap.wrap(
      f"  test accuracy            {s['test_accuracy']:.4f} (majority class "
      f"{s['majority_share']:.4f}): "
      + ('the mean trained' if s['mean_trained'] else
         'the mean collapsed (non-finite loss, or within 0.02 of the majority '
         'share: failed, as the study counts it)'),
      width=79, subsequent_indent=' ' * 27))
  key = regime(optimizer, s, noisy_labels)
  title, found, advice = FINDINGS[key]
  lines.append('')
  lines.extend(textwrap.wrap(
      f"What the project's study found for the closest regime ({title}):",
      width=79))
  for item in found:
    lines.extend(wrap.wrap(item))
  lines.append('  Try:')
  lines.extend(textwrap.wrap(advice, width=79, initial_indent='    ',
                             subsequent_indent='    '))
  ratio = s['median_norm_ratio']
  if key == 'sgd_collapses' and ratio:
    lines.extend(textwrap.wrap(
        f"Your median norm ratio {ratio:.3f}: GRAIN's steps, and those of "
        f"'mean_at_grain_length', would have been about {1 / ratio:.1f}x "
        f"shorter than the mean's (the study did not run the mean at exactly "
        f"that smaller rate).", width=79, initial_indent='    ',
        subsequent_indent='    '))
  lines.append('')
  lines.extend(textwrap.wrap(
      'For scale: the mean conflicted on 10-20 % of steps in the MiniLM AdamW '
      'runs (m = 4) and on 96-98 % in the SGD sweeps (m = 16) where it '
      'trained, and the more groups, the more conflict (digits: 2 % of steps '
      'at m = 2, 98 % at m = 16, STABILITY.md \'Group size m\' table); a high '
      'conflict rate alone did not mean GRAIN would help. Details: '
      'docs/when_grain_helps.md and docs/guides/monitor.md.', width=79))
  return '\n'.join(lines)


# ------------------------------------------------------------------ main


def time_steps(step, carry, batches, n):
  """Seconds per step of ``step`` over ``n`` steps, after one compiling."""
  carry, loss, _ = step(carry, next(batches))
  jax.block_until_ready(loss)
  start = time.perf_counter()
  for _ in range(n):
    carry, loss, _ = step(carry, next(batches))
  jax.block_until_ready(loss)
  return (time.perf_counter() - start) / n


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--optimizer', choices=('adamw', 'sgd'), default='adamw',
                 help='AdamW, or SGD with momentum 0.9')
  p.add_argument('--lr', type=float, default=None,
                 help='learning rate (default: digits 3e-3 AdamW, 0.1 SGD; '
                 'MiniLM 1e-4 AdamW, 3e-3 SGD)')
  p.add_argument('--groups', '-m', type=int, default=4,
                 help='GRAIN groups per batch (must divide --batch)')
  p.add_argument('--steps', type=int, default=None,
                 help='training steps (default 300 digits, 40 MiniLM)')
  p.add_argument('--batch', type=int, default=None,
                 help='batch size (default 64 digits, 16 MiniLM)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--per-class', type=int, default=10,
                 help='digits: training images per class')
  p.add_argument('--minilm', action='store_true',
                 help='fine-tune all-MiniLM-L6-v2 (examples/finetune_text.py)')
  p.add_argument('--task', choices=('bbc', 'tweets'), default='bbc',
                 help='MiniLM: the text task')
  p.add_argument('--shots', type=int, default=8,
                 help='MiniLM: training examples per class')
  p.add_argument('--lora-rank', type=int, default=0,
                 help='MiniLM: 0 full fine-tuning, R > 0 rank-R LoRA')
  p.add_argument('--layers', type=int, default=None,
                 help='MiniLM: the first pretrained layers only')
  p.add_argument('--max-len', type=int, default=128)
  p.add_argument('--eval-size', type=int, default=425)
  p.add_argument('--eval-batch', type=int, default=128)
  p.add_argument('--out', default='grain_monitor',
                 help='output prefix: <out>.jsonl and <out>.png')
  p.add_argument('--noisy-labels', action='store_true',
                 help='your training labels may be partly wrong: the verdict '
                 'quotes the regimes study on noisy labels')
  p.add_argument('--cost', type=int, default=0, metavar='N',
                 help='also time N steps with and without grain() '
                 '(monitor mode) and print the ratio')
  p.add_argument('--tiny', action='store_true',
                 help='a few seconds on a CPU: 20 digits steps of batch 16 '
                 '(with --minilm: 4 steps, 1 layer, 32 tokens)')
  args = p.parse_args(argv)
  if args.tiny:
    if args.minilm:
      args.shots, args.max_len, args.layers = 2, 32, args.layers or 1
      args.steps, args.batch = args.steps or 4, args.batch or 4
      args.groups = min(args.groups, 2)
      args.eval_size, args.eval_batch = 8, 8
    else:
      args.steps, args.batch = args.steps or 20, args.batch or 16
      args.per_class = min(args.per_class, 5)
  if args.steps is None:
    args.steps = 40 if args.minilm else 300
  if args.batch is None:
    args.batch = 16 if args.minilm else 64
  if args.lr is None:
    args.lr = {(False, 'adamw'): 3e-3, (False, 'sgd'): 0.1,
               (True, 'adamw'): 1e-4, (True, 'sgd'): 3e-3}[
                   (args.minilm, args.optimizer)]
  if args.batch % args.groups:
    p.error(f'--groups {args.groups} must divide --batch {args.batch}')
  return args


def main(argv=None):
  args = parse_args(argv)
  run = MiniLM(args) if args.minilm else Digits(args)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  log_path, plot_path = out.with_suffix('.jsonl'), out.with_suffix('.png')

  carry = run.init()
  batches = run.batches()
  rows, conflicts = [], 0
  start = time.perf_counter()
  with open(log_path, 'w') as log, tqdm(range(args.steps), desc='monitor',
                                        unit='step') as bar:
    for i in bar:
      carry, loss, logs = run.step(carry, next(batches))
      row = python_row(i, loss, logs)  # arrays from jit -> Python numbers
      rows.append(row)
      log.write(json.dumps(row) + '\n')
      conflicts += row['grain/conflict']
      ratio = row['grain/norm_ratio']
      bar.set_postfix(loss=f"{row['loss']:.3f}" if row['loss'] is not None
                      else 'nan', conflict_rate=f'{conflicts / (i + 1):.2f}',
                      norm_ratio='nan' if ratio is None else f'{ratio:.2f}')
  seconds = time.perf_counter() - start

  # Outside jit, metrics() of the final state gives Python scalars directly:
  # the same values as the last step's row.
  final = grain_optax.metrics(run.opt_state(carry))
  assert isinstance(final['grain/conflict'], bool)
  assert final['grain/conflict'] == rows[-1]['grain/conflict']

  plot(rows, plot_path, f'monitor mode: {run.description}')
  summary = summarize(rows, *run.evaluate(carry), args.groups)
  print(f'\n{run.description}: {args.steps} steps in {seconds:.1f} s '
        f'(compilation included)')
  print(f'log: {log_path} (one JSON line per step); plot: {plot_path}\n')
  print(verdict(summary, args.optimizer, args.groups, args.noisy_labels))
  if args.cost:
    plain = time_steps(run.plain_step, run.init_plain(), run.batches(),
                       args.cost)
    monitor = time_steps(run.step, run.init(), run.batches(), args.cost)
    print(f'\nCost on this machine ({jax.devices()[0].platform}), '
          f'{args.cost} steps each: plain step {plain * 1e3:.2f} ms, monitor '
          f'mode {monitor * 1e3:.2f} ms (x{monitor / plain:.2f}).')
    summary['cost'] = {'plain_ms': plain * 1e3, 'monitor_ms': monitor * 1e3}
  summary.update(log=str(log_path), plot=str(plot_path),
                 final_metrics=final)
  return summary


if __name__ == '__main__':
  main()
