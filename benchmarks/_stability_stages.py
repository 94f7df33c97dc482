"""The stages of the stability study (main, sweep, groups, variants, timing)
as methods of ``Study``: it plans the jobs, runs them under the
``--budget-seconds`` limit and writes one JSON line per run."""

import dataclasses
import functools
import json
import pathlib
import time

import numpy as np

from _stability_config import ARMS, Config, Lane  # pylint: disable=g-bad-import-order
from _stability_program import Runner, run_record  # pylint: disable=g-bad-import-order
from _stability_regimes import RegimesStage  # pylint: disable=g-bad-import-order


class Budget(Exception):
  pass


class Study(RegimesStage):

  def __init__(self, args, problems, out_path):
    self.args = args
    self.problems = problems          # (task, regime) -> Problem
    self.load_done_jobs(pathlib.Path(out_path))
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

  def execute(self, problem, cfg, lanes, split, stage, data=None,
              record=run_record, **extra):
    runner = self.runners.get(stage, self.runner)
    n_chunks = -(-len(lanes) // runner.lanes)
    key = (problem.key(), cfg)
    fresh = key not in runner.compiled
    self.check_budget(n_chunks, fresh)
    t0 = time.perf_counter()
    res = runner.run(problem, cfg, lanes, data)
    dt = time.perf_counter() - t0 - (runner.compile_s[key] if fresh else 0)
    self.chunk_s.append(dt / n_chunks)
    if fresh:
      self.compile_times.append(runner.compile_s[key])
    recs = []
    for lane, r in zip(lanes, res):
      rec = record(problem, cfg, lane, r, split, suite=self.args.suite,
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
    if 'regimes' in a.stages:
      for p in probs:
        for kw, cfg in self.regime_jobs(p):
          plan.append(('regimes', p, part(self.regime_stage, p, **kw), [cfg]))
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
    for stage, p, thunk, cfgs in plan[done:]:
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
      elif stage == 'regimes':
        n_chunks += sum(ch(self.regime_lanes(p, split=s, **thunk.keywords))
                        for s in ('val', 'test'))
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
