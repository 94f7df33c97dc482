"""The stability study's vocabulary: arms, the static Config of a compiled
program, the per-lane Lane, how a lane's cells become groups, and the CLI."""

import argparse
import dataclasses
import os
import pathlib
import platform

import jax
import numpy as np


DESCRIPTION = 'Does GRAIN make fine-tuning stable? The study of issue 11.'
ARMS = ('mean', 'grain', 'mean@grain-norm', 'grain@mean-norm')
ARM_CODE = {name: i for i, name in enumerate(ARMS)}
RESULTS = pathlib.Path(__file__).resolve().parent / 'results'

# The benchmark's arm names and the library's ``apply`` values they run.
ARM_APPLY = {'mean': 'mean', 'grain': 'grain',
             'mean@grain-norm': 'mean_at_grain_length',
             'grain@mean-norm': 'grain_at_mean_length'}


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
  # Trace the weight GRAIN attributes to flipped and to clean examples (the
  # regimes stage); left out of repr so older programs keep their names.
  track_flips: bool = dataclasses.field(default=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Lane:
  arm: str
  lr: float
  seed: int
  m: int = 4                   # groups per micro-batch
  k: int = 1                   # micro-batches per optimizer step
  # The regimes stage (issue 24): which condition and setting a lane runs.
  condition: str = ''          # '' | 'noise' | 'sources' | 'imbalance'
  noise: float = 0.0           # share of training labels flipped


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



def parse_args(argv=None):
  p = argparse.ArgumentParser(description=DESCRIPTION)
  p.add_argument('--suite', choices=('sklearn', 'minilm'), default='sklearn')
  p.add_argument('--tiny', action='store_true',
                 help='a few steps, 2 seeds, 2 learning rates (CI smoke test)')
  p.add_argument('--stages', nargs='+',
                 default=['main', 'sweep', 'groups', 'variants', 'timing'],
                 choices=['main', 'sweep', 'groups', 'variants', 'timing',
                          'regimes'],
                 help='regimes (issue 24) is not in the default: ask for it')
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
  g = p.add_argument_group(
      'regimes stage (issue 24; see _stability_regimes.py)')
  g.add_argument('--conditions', nargs='+', default=['noise', 'sources',
                                                     'imbalance'],
                 choices=['noise', 'sources', 'imbalance'])
  g.add_argument('--noise', type=float, nargs='+', default=[0.0, 0.2, 0.4],
                 help='fractions of training labels flipped (noise)')
  g.add_argument('--regime-groups', type=int, nargs='+', default=[16, 4],
                 help='m of the noise condition (16 = one example per group)')
  g.add_argument('--imbalance-groups', type=int, nargs='+', default=[16],
                 help='m of the imbalance condition')
  g.add_argument('--source-groups', type=int, nargs='+', default=[1, 2],
                 help='groups per source (m = sources x this)')
  g.add_argument('--rare-shots', type=int, default=2,
                 help='training examples of the rare (last) class')
  g.add_argument('--source-shots', type=int, default=None,
                 help='shots per class from each source (default: half the '
                 'task\'s shots, rounded up)')
  g.add_argument('--regime-optimizers', nargs='+', default=['adamw', 'sgdm'],
                 choices=['adamw', 'sgdm'])
  g.add_argument('--adamw-lrs', type=float, nargs='+', default=None,
                 help='AdamW learning rates of the regimes (default: the '
                 'problem\'s, around the earlier tuned ones)')
  g.add_argument('--sgdm-lrs', type=float, nargs='+', default=None)
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
