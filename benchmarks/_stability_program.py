"""The compiled program of the stability study: the arms as one optax
transformation, the lane-vmapped training-and-evaluation program, the Runner
that compiles it once per (problem, config) and runs lanes in chunks, and the
per-run record."""

import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _stability_stats as stats  # pylint: disable=g-bad-import-order
from _stability_config import ARM_APPLY, ARM_CODE, ARMS, Config, Lane, lane_plan  # pylint: disable=g-bad-import-order,unused-import
from _stability_problems import Problem  # pylint: disable=g-bad-import-order

import grain_optax  # pylint: disable=g-import-not-at-top,wrong-import-position


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

  def one_lane(lane_params, lr, arm, k, comb, gmask, active, order, labels,
               flip, key, shared, frozen, rest, x_pool, eval_x):
    params = {'lane': lane_params, 'shared': shared}
    tx = _make_tx(problem, cfg, lr, arm, k)
    state = tx.init(params)

    def loss_fn(p, batch):
      return problem.loss(p, frozen, rest, batch, cfg.dropout)

    def step(carry, inp):
      params, state = carry
      idx, y, fl, skey = inp
      batch = {'x': tree_map(lambda a: a[idx], x_pool), 'y': y,
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
        if cfg.track_flips:
          # Weight attributed to each example: its cells' share of each
          # group's weight (a cell's weight in a group is 1/cells in it),
          # split evenly over the examples of the cell; then the mean
          # weight of the flipped and of the clean examples of this batch.
          per_cell = gs.weights @ c / (b // g)
          per_ex = jnp.repeat(per_cell, b // g)
          n_f, n_c = jnp.sum(fl), jnp.sum(1.0 - fl)
          out['w_flip'] = jnp.where(on & (n_f > 0), jnp.sum(per_ex * fl)
                                    / jnp.maximum(n_f, 1.0), jnp.nan)
          out['w_clean'] = jnp.where(on & (n_c > 0), jnp.sum(
              per_ex * (1.0 - fl)) / jnp.maximum(n_c, 1.0), jnp.nan)
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
    (params, _), trace = jax.lax.scan(step, (params, state),
                                      (order, labels, flip, keys))

    def evaluate(xc):
      out = jax.lax.map(
          lambda chunk: problem.predict(params, frozen, rest, chunk), xc)
      return out.reshape((-1,) + out.shape[2:])

    preds = {split: evaluate(xc) for split, xc in eval_x.items()}
    return preds, trace

  in_axes = (0,) * 11 + (None,) * 5
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

  @classmethod
  def lane_data(cls, problem, lane):
    """(order [steps, B] pool indices, labels [steps, B], flipped [steps, B]
    as 0/1 float) of a lane: the seed's batches with the pool's labels."""
    order = cls.order(problem, lane.seed)
    labels = np.asarray(problem.y_pool)[order]
    return order, labels, np.zeros(order.shape, np.float32)

  def run(self, problem: Problem, cfg: Config, lanes: List[Lane],
          data=None):
    """Trains every lane; returns per-lane dicts (preds per split, traces).

    ``data(problem, lane)`` gives a lane's batches, labels and flip marks
    (default :meth:`lane_data`; the regimes stage passes its own).
    """
    data = data or self.lane_data
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
      batches = [data(problem, l) for l in chunk]
      args = (lane_params,
              jnp.asarray([l.lr for l in chunk], jnp.float32),
              jnp.asarray([ARM_CODE[l.arm] for l in chunk], jnp.int32),
              jnp.asarray([l.k for l in chunk], jnp.int32),
              jnp.asarray(np.stack([p[0] for p in plans])),
              jnp.asarray(np.stack([p[1] for p in plans])),
              jnp.asarray(np.stack([p[2] for p in plans])),
              jnp.asarray(np.stack([d[0] for d in batches]), jnp.int32),
              jnp.asarray(np.stack([d[1] for d in batches])),
              jnp.asarray(np.stack([d[2] for d in batches]), jnp.float32),
              _lane_keys(np.asarray([l.seed for l in chunk], np.uint32)),
              shared, problem.frozen, problem.rest, problem.x_pool,
              {s: x for s, (x, _) in problem.evals.items()})
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


def run_record(problem, cfg, lane, res, split, **extra):
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
