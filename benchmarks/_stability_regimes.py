"""The regimes stage of the stability study (issue 24): where does GRAIN's
*direction* help, when the groups of a batch genuinely disagree?

Three conditions, each a property of a lane's training data only (the model,
the program and the test labels are unchanged):

* ``noise``: a fraction ``lane.noise`` of the seed's few-shot training labels
  flipped to a uniformly drawn *other* class. Which examples flip and their
  new classes depend on the seed alone (``rng([seed, 7])``: a random
  priority order, the first ``round(noise * n)`` flip; the new class is
  ``(y + u) mod C`` with ``u`` uniform in 1..C-1), so every arm and learning
  rate of a seed sees the same flips, and the flips of 0.2 are a subset of
  those of 0.4. Metric: accuracy on the clean test labels. The program also
  traces the weight GRAIN attributes to flipped and to clean examples
  (group weight / group size, per step), reported as a ratio.
* ``sources``: training examples drawn from two sources (``Problem.
  source_sample``), each batch stratified: its first half from source 0,
  the second from source 1; the groups are consecutive, so with m = 2 each
  group is one source, with m = 4 two groups per source. Metric: the worst
  source's test accuracy (also each source's).
* ``imbalance``: the last class (``num_classes - 1``; BBC: ``tech``, digits:
  9, breast cancer: benign) keeps only ``--rare-shots`` of its few-shot
  examples (the first in the seed's sample order); the other classes keep
  theirs. Metric: the worst class's test accuracy (also macro accuracy).

Each (task, condition, optimizer) is one job of one compiled program: every
arm, learning rate, seed and setting (noise fraction, m) is a lane. Each arm
takes its own learning rate, the one with the best mean validation value of
the condition's metric over the validation seeds; the test seeds then run
every arm at its own rate. A run failed when its test accuracy is at most
chance + 0.05 or its training loss is not finite.
"""

import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent
                       / 'examples'))
import text_data  # pylint: disable=g-import-not-at-top,wrong-import-position

from _stability_config import ARMS, Config, Lane  # pylint: disable=g-bad-import-order
from _stability_program import run_record  # pylint: disable=g-bad-import-order

CONDITIONS = ('noise', 'sources', 'imbalance')
PRIMARY = {'noise': 'accuracy', 'sources': 'worst_source',
           'imbalance': 'worst_class'}
VAL_SEED0 = 1000     # validation seeds 1000.., test seeds 0.. (disjoint)


# ----------------------------------------------------------------------------
# A lane's data.


def epoch_order(sample, seed, steps, batch):
  """[steps, B]: the sample reshuffled every epoch (as Runner.order)."""
  rng = np.random.default_rng([seed, 3])
  need = steps * batch
  perms = [rng.permutation(sample) for _ in range(-(-need // len(sample)))]
  return np.concatenate(perms)[:need].reshape(steps, batch)


def source_order(parts, seed, steps, batch):
  """[steps, B]: each batch is B/S examples of each of the S sources, in
  source order (each source reshuffled every epoch on its own)."""
  per = batch // len(parts)
  if per * len(parts) != batch:
    raise ValueError(f'batch {batch} does not split into {len(parts)} sources')
  cols = []
  for s, part in enumerate(parts):
    rng = np.random.default_rng([seed, 3, s])
    need = steps * per
    perms = [rng.permutation(part) for _ in range(-(-need // len(part)))]
    cols.append(np.concatenate(perms)[:need].reshape(steps, per))
  return np.concatenate(cols, axis=1)


def flips(problem, seed, noise):
  """(sample, noisy labels of the sample, flipped mask): seeded by the seed
  (``examples/text_data.flip_labels``, the rule the example uses too)."""
  sample = np.asarray(problem.sample(seed))
  y = np.asarray(problem.y_pool)[sample].astype(np.int64)
  noisy, flipped = text_data.flip_labels(y, problem.num_classes, noise, seed)
  return sample, noisy, flipped


def rare_class(problem):
  return problem.num_classes - 1


def imbalanced_sample(problem, seed, rare_shots):
  """The seed's sample with the rare class cut to its first rare_shots."""
  sample = np.asarray(problem.sample(seed))
  y = np.asarray(problem.y_pool)[sample].astype(np.int64)
  rare = np.flatnonzero(y == rare_class(problem))
  return np.delete(sample, rare[rare_shots:])


def lane_data(problem, lane, rare_shots):
  """(order, labels, flipped) of a regimes lane (see Runner.lane_data)."""
  y_pool = np.asarray(problem.y_pool)
  steps, b = problem.steps, problem.batch
  flip_pool = np.zeros(len(y_pool), np.float32)
  if lane.condition == 'sources':
    order = source_order(problem.source_sample(lane.seed), lane.seed, steps, b)
  elif lane.condition == 'imbalance':
    order = epoch_order(imbalanced_sample(problem, lane.seed, rare_shots),
                        lane.seed, steps, b)
  elif lane.condition == 'noise':
    sample, noisy, flipped = flips(problem, lane.seed, lane.noise)
    y_pool = y_pool.copy()
    y_pool[sample] = noisy
    flip_pool[sample[flipped]] = 1.0
    order = epoch_order(sample, lane.seed, steps, b)
  else:
    raise ValueError(lane.condition)
  return order, y_pool[order], flip_pool[order]


def setting_name(condition, lane, rare_shots):
  if condition == 'noise':
    return f'noise {lane.noise:g}, m={lane.m}'
  if condition == 'imbalance':
    return f'rare {rare_shots}, m={lane.m}'
  return f'm={lane.m}'


# ----------------------------------------------------------------------------
# A run's record.


def regime_record(problem, cfg, lane, res, split, *, rare_shots, **extra):
  """run_record plus the regimes metrics; 'metric' is the condition's own."""
  rec = run_record(problem, cfg, lane, res, split, **extra)
  labels = problem.evals[split][1]
  preds = res['preds'][split][:len(labels)].astype(np.int64)
  hit = preds == labels
  per_class = [float(np.mean(hit[labels == c])) if np.any(labels == c)
               else float('nan') for c in range(problem.num_classes)]
  acc = float(np.mean(hit))
  rec.update(
      condition=lane.condition, noise=lane.noise,
      setting=setting_name(lane.condition, lane, rare_shots),
      accuracy=acc, class_accuracy=per_class,
      macro_accuracy=float(np.nanmean(per_class)),
      worst_class=float(np.nanmin(per_class)),
      chance=1.0 / problem.num_classes,
      failed=bool(not np.isfinite(rec['final_loss'])
                  or acc <= 1.0 / problem.num_classes + 0.05))
  if lane.condition == 'imbalance':
    rec['rare_class'] = problem.class_names[rare_class(problem)]
    rec['rare_shots'] = rare_shots
  src = problem.eval_sources.get(split)
  if lane.condition == 'sources' and src is not None:
    per_src = [float(np.mean(hit[src[:len(hit)] == s]))
               for s in range(len(problem.source_names))]
    rec['source_accuracy'] = dict(zip(problem.source_names, per_src))
    rec['worst_source'] = float(min(per_src))
  if lane.condition == 'noise':
    sample, _, flipped = flips(problem, lane.seed, lane.noise)
    rec['n_train'] = int(len(sample))
    rec['flipped'] = sorted(int(i) for i in sample[flipped])
    wf, wc = res['trace']['w_flip'], res['trace']['w_clean']
    if np.any(np.isfinite(wf)) and np.any(np.isfinite(wc)):
      rec['flip_weight_ratio'] = float(np.nanmean(wf) / np.nanmean(wc))
  rec['metric'] = rec[PRIMARY[lane.condition]]
  rec['metric_name'] = PRIMARY[lane.condition]
  return rec


# ----------------------------------------------------------------------------
# The stage (a mixin of Study).


class RegimesStage:
  """Study's regimes stage: plan, learning-rate selection, test runs."""

  def regime_settings(self, problem, condition):
    """[(noise, m)] of a condition on a problem (a job's settings)."""
    a = self.args
    b = problem.batch
    if condition == 'noise':
      return [(nz, m) for m in a.regime_groups for nz in a.noise]
    if condition == 'imbalance':
      return [(0.0, m) for m in a.imbalance_groups]
    s = len(problem.source_names)
    return [(0.0, s * k) for k in a.source_groups if b % (s * k) == 0]

  def regime_conditions(self, problem):
    out = []
    for c in self.args.conditions:
      if problem.kind != 'classification':
        continue
      if c == 'sources' and problem.source_sample is None:
        continue
      out.append(c)
    return out

  def regime_cfg(self, problem, optimizer):
    slots = max(m for c in self.regime_conditions(problem)
                for _, m in self.regime_settings(problem, c))
    return Config(optimizer=optimizer, cells=problem.batch, slots=slots,
                  window=1, variant='regimes', track_flips=True)

  def regime_job_id(self, problem, condition, optimizer):
    return f'{problem.name}/{problem.regime}/{condition}/{optimizer}'

  def regime_lanes(self, problem, condition, optimizer, split):
    """Lane count of a job's split (for the plan's estimate)."""
    n = len(self.regime_settings(problem, condition)) * len(ARMS)
    if split == 'val':
      return n * len(self.regime_grid(problem, optimizer)) * self.args.val_seeds
    return n * self.args.seeds

  def regime_grid(self, problem, optimizer):
    a = self.args
    grid = a.adamw_lrs if optimizer == 'adamw' else a.sgdm_lrs
    return tuple(grid or problem.regime_grids[optimizer])

  def regime_stage(self, problem, *, condition, optimizer):
    a = self.args
    job = self.regime_job_id(problem, condition, optimizer)
    if job in self.done_jobs:
      self.log(f'  {job}: done in an earlier attempt, skipped')
      return
    cfg = self.regime_cfg(problem, optimizer)
    grid = self.regime_grid(problem, optimizer)
    settings = self.regime_settings(problem, condition)
    data = lambda p, lane: lane_data(p, lane, a.rare_shots)

    def record(*args, **kw):
      return regime_record(*args, rare_shots=a.rare_shots, job=job,
                           attempt=self.attempt, **kw)

    val_seeds = list(range(VAL_SEED0, VAL_SEED0 + a.val_seeds))
    lanes = [Lane(arm, lr, s, m, 1, condition=condition, noise=nz)
             for (nz, m) in settings for arm in ARMS for lr in grid
             for s in val_seeds]
    scores = {}
    for rec in self.execute(problem, cfg, lanes, 'val', 'regimes', data=data,
                            record=record):
      scores.setdefault((rec['noise'], rec['m'], rec['method'], rec['lr']),
                        []).append(rec['metric'])
    chosen = {}
    for (nz, m) in settings:
      for arm in ARMS:
        val = {lr: float(np.nanmean(scores[(nz, m, arm, lr)])) for lr in grid}
        best = max(grid, key=lambda lr, v=val: np.nan_to_num(v[lr],
                                                             nan=-np.inf))
        chosen[(nz, m, arm)] = best
        self.write({'type': 'meta', 'stage': 'regimes', 'job': job,
                    'attempt': self.attempt, 'task': problem.name,
                    'regime': problem.regime, 'condition': condition,
                    'optimizer': optimizer, 'noise': nz, 'm': m,
                    'method': arm, 'chosen_lr': best,
                    'val_scores': {f'{lr:g}': v for lr, v in val.items()}})
    lanes = [Lane(arm, chosen[(nz, m, arm)], s, m, 1, condition=condition,
                  noise=nz)
             for (nz, m) in settings for arm in ARMS
             for s in range(a.seeds)]
    self.execute(problem, cfg, lanes, 'test', 'regimes', data=data,
                 record=record)
    info = {'source_rule': problem.source_rule,
            'source_names': list(problem.source_names)} if (
                condition == 'sources') else {}
    if condition == 'imbalance':
      info = {'rare_class': problem.class_names[rare_class(problem)]}
    self.write({'type': 'meta', 'stage': 'regimes', 'job': job,
                'attempt': self.attempt, 'regimes_done': True,
                'grid': list(grid), 'val_seeds': val_seeds,
                'test_seeds': list(range(a.seeds)), **info})
    self.done_jobs.add(job)

  def load_done_jobs(self, path):
    """Jobs finished by an earlier attempt writing the same file (resume)."""
    self.attempt = time.strftime('%Y%m%dT%H%M%S')
    self.done_jobs = set()
    if path.exists():
      for line in path.read_text().splitlines():
        if '"regimes_done"' in line:
          self.done_jobs.add(json.loads(line)['job'])

  def regime_jobs(self, problem):
    """[(thunk keywords, config)] of a problem, by priority."""
    return [(dict(condition=c, optimizer=o), self.regime_cfg(problem, o))
            for c in self.regime_conditions(problem)
            for o in self.args.regime_optimizers]


__all__ = ['CONDITIONS', 'PRIMARY', 'RegimesStage', 'epoch_order',
           'flips', 'imbalanced_sample', 'lane_data', 'regime_record',
           'source_order']
