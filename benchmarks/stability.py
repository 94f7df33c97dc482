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
* ``regimes`` (issue 24; not in the default list, ask for it): where the
  groups genuinely disagree: ``--conditions noise`` (``--noise`` fractions
  of the training labels flipped, m in ``--regime-groups``), ``sources``
  (batches stratified by source, ``--source-groups`` groups per source) and
  ``imbalance`` (the last class keeps ``--rare-shots`` examples); the four
  arms, AdamW and SGD + momentum (``--regime-optimizers``), each arm at its
  own learning rate chosen on the validation seeds; the pre-registered
  protocol is in benchmarks/STABILITY.md, the details in
  ``_stability_regimes.py``.

Suites: ``sklearn`` (CPU, a few minutes: digits, breast cancer and diabetes
regression, small MLPs trained from scratch on a few examples: the same code
path as the GPU study, exercised by tests/test_stability.py in ``--tiny``
mode) and ``minilm`` (all-MiniLM-L6-v2 fine-tuned on BBC 8/class and tweets
32/class, full and LoRA; ``examples/minilm.py``, ``examples/text_data.py``).

    python benchmarks/stability.py --suite sklearn                    # CPU, ~5 min
    python benchmarks/stability.py --suite minilm --budget-seconds 840  # GPU
    python benchmarks/stability.py --report benchmarks/STABILITY.md \\
        benchmarks/results/stability_sklearn_cpu.jsonl ...

The code, in the order a run flows through it (this file is only the entry
point, ``main``, and re-exports the names tests and notes use):

* ``_stability_config.py``: the vocabulary: ``ARMS`` and the library's
  ``apply`` value of each, ``Config`` (what one compiled program is
  specialised to), ``Lane`` (one run: arm, learning rate, seed, m, k),
  ``lane_plan`` (how a lane's cells become its groups), the CLI
  (``parse_args``) and the version record.
* ``_stability_problems.py``: the tasks as pure functions (``Problem``): the
  sklearn MLPs and the MiniLM adapter; ``build_problems`` from the CLI.
* ``_stability_program.py``: the arms as one optax transformation
  (``arm_transform``), the jitted lane-vmapped train-and-evaluate program
  (``_program``), the ``Runner`` (one compile per (problem, config), lanes
  in fixed-size chunks) and the per-run JSON record (``run_record``).
* ``_stability_stages.py``: ``Study``: the stages above, their plan and the
  ``--budget-seconds`` guard.
* ``_stability_regimes.py``: the regimes stage (a mixin of ``Study``): each
  lane's data (flipped labels, sources, the rare class), its record, and
  resuming a file's finished jobs.
* ``_stability_report.py``: ``--report``: the markdown and figure from the
  JSON lines alone; ``_stability_regimes_report.py``: the regimes sections,
  verdicts and ``REGIMES.png`` (the protocol section is kept).
* ``_stability_stats.py``: statistics (bootstrap CIs, Brown-Forsythe, churn)
  and the markdown tables.
"""

import datetime
import pathlib
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
import _stability_stats as stats
from _stability_config import (ARM_APPLY, ARM_CODE, ARMS, RESULTS, Config,
                               Lane, _versions, lane_plan, parse_args)
from _stability_problems import (MINILM_TASKS, SKLEARN_TASKS, Problem,
                                 build_problems, minilm_problem,
                                 sklearn_problem)
from _stability_program import Runner, arm_transform
from _stability_report import report
from _stability_stages import Budget, Study
# pylint: enable=g-import-not-at-top,wrong-import-position,unused-import

__all__ = ['ARM_APPLY', 'ARM_CODE', 'ARMS', 'Budget', 'Config', 'Lane',
           'MINILM_TASKS', 'Problem', 'Runner', 'SKLEARN_TASKS', 'Study',
           'arm_transform', 'build_problems', 'lane_plan', 'main',
           'minilm_problem', 'parse_args', 'report', 'sklearn_problem']


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
