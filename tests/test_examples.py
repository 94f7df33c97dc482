"""The examples run, and GRAIN + AdamW trains a real model on real data."""

import json
import pathlib

import numpy as np

from _asserts import load_example

ROOT = pathlib.Path(__file__).resolve().parent.parent

def test_grain_adamw_trains_digits_to_95_percent():
  quickstart = load_example('quickstart')
  args = quickstart.argparse.Namespace(groups=4, lr=3e-3, steps=300, batch=64)
  data = quickstart.load_data(per_class=120, seed=0)
  accuracy = quickstart.train('grain', 0, data, args)
  assert accuracy >= 0.95, accuracy


def test_quickstart_prints_a_table(capsys):
  quickstart = load_example('quickstart')
  acc = quickstart.main(['--seeds', '2', '--steps', '30', '--json'])
  out = capsys.readouterr().out
  assert 'GRAIN (m=4) + AdamW' in out and 'mean + AdamW' in out
  assert len(acc['grain']) == 2 and all(0.0 <= a <= 1.0 for a in acc['grain'])
  # 30 steps already learn something: far above chance (0.1).
  assert np.mean(acc['grain']) > 0.3


def test_is_grain_worth_it_tiny(tmp_path, capsys):
  """Monitor mode: one JSON line per step with metrics()' stable keys, a
  plot, and a printed verdict with the conflict rate."""
  monitor = load_example('is_grain_worth_it')
  out = tmp_path / 'monitor'
  summary = monitor.main(['--tiny', '--out', str(out)])
  printed = capsys.readouterr().out
  lines = (tmp_path / 'monitor.jsonl').read_text().splitlines()
  assert len(lines) == 20                       # --tiny: 20 steps
  rows = [json.loads(line) for line in lines]
  assert [r['step'] for r in rows] == list(range(20))
  for row in rows:
    assert set(monitor.KEYS) <= set(row), sorted(row)
    assert isinstance(row['grain/conflict'], bool)
    assert 0.0 <= row['grain/norm_ratio'] <= 1.0 + 1e-6
    assert row['grain/num_nonfinite'] == 0 and row['grain/num_excluded'] == 0
  png = (tmp_path / 'monitor.png').read_bytes()
  assert png.startswith(b'\x89PNG')
  conflict_rate = np.mean([r['grain/conflict'] for r in rows])
  assert f'conflict rate            {conflict_rate:.3f}' in printed
  assert 'median norm ratio' in printed and 'effective groups' in printed
  assert 'benchmarks/STABILITY.md' in printed and 'Try:' in printed
  assert summary['conflict_rate'] == conflict_rate
  # The update was the plain mean: AdamW trained the MLP (far above chance).
  assert summary['mean_trained'] and summary['test_accuracy'] > 0.3
  # metrics() outside jit: Python scalars, the last step's values.
  assert summary['final_metrics']['grain/norm_ratio'] == rows[-1]['grain/norm_ratio']


def _table_rows(text):
  """Rows of the Markdown tables in ``text``, as tuples of stripped cells."""
  return [tuple(c.strip() for c in line.strip().strip('|').split('|'))
          for line in text.splitlines() if line.startswith('| ')]


def _stability_rows():
  """Cells of benchmarks/STABILITY.md's tables, as tuples of stripped text."""
  return set(_table_rows((ROOT / 'benchmarks' / 'STABILITY.md').read_text()))


# (task, optimizer, lr, arm, mean score, failed seeds) of the learning-rate
# sweeps, and (task, regime, method, mean score) at each method's own tuned
# rate, that is_grain_worth_it.py quotes.
_ARMS = {'mean': 'mean', 'grain': 'grain',
         'mean_at_grain_length': 'mean@grain-norm',
         'grain_at_mean_length': 'grain@mean-norm'}
_SWEEP_CLAIMS = [
    ('bbc', 'sgdm', '1e-3', 'mean', '0.897', None),
    ('bbc', 'sgdm', '1e-3', 'grain', '0.567', None),
    ('bbc', 'sgdm', '1e-3', 'mean_at_grain_length', '0.870', None),
    ('bbc', 'sgdm', '1e-3', 'grain_at_mean_length', '0.746', None),
    ('bbc', 'sgdm', '3e-3', 'mean', '0.906', None),
    ('bbc', 'sgdm', '3e-3', 'grain', '0.594', None),
    ('bbc', 'sgdm', '3e-3', 'mean_at_grain_length', '0.860', None),
    ('bbc', 'sgdm', '3e-3', 'grain_at_mean_length', '0.201', '9'),
    ('tweets', 'sgdm', '1e-3', 'mean', '0.601', None),
    ('tweets', 'sgdm', '1e-3', 'grain', '0.461', None),
    ('tweets', 'sgdm', '1e-3', 'mean_at_grain_length', '0.570', None),
    ('tweets', 'sgdm', '3e-3', 'mean', '0.597', None),
    ('tweets', 'sgdm', '3e-3', 'grain', '0.449', None),
    ('tweets', 'sgdm', '3e-3', 'mean_at_grain_length', '0.582', None),
    ('bbc', 'sgdm', '1e-2', 'mean', '0.204', '10'),
    ('bbc', 'sgdm', '1e-2', 'grain', '0.476', '1'),
    ('bbc', 'sgdm', '1e-2', 'mean_at_grain_length', '0.729', '1'),
    ('bbc', 'sgdm', '1e-2', 'grain_at_mean_length', '0.188', '10'),
    ('tweets', 'sgdm', '1e-2', 'mean', '0.299', '8'),
    ('tweets', 'sgdm', '1e-2', 'grain', '0.393', '6'),
    ('tweets', 'sgdm', '1e-2', 'mean_at_grain_length', '0.476', '6'),
    ('tweets', 'sgdm', '1e-2', 'grain_at_mean_length', '0.311', '10'),
    ('digits', 'sgdm', '1e0', 'mean', '0.156', '6'),
    ('digits', 'sgdm', '1e0', 'grain', '0.294', '1'),
    ('digits', 'sgdm', '1e0', 'mean_at_grain_length', '0.559', '1'),
    ('digits', 'sgdm', '1e0', 'grain_at_mean_length', '0.104', '9'),
    ('breast_cancer', 'sgdm', '3e0', 'mean', '0.532', '7'),
    ('breast_cancer', 'sgdm', '3e0', 'grain', '0.856', '0'),
    ('breast_cancer', 'sgdm', '3e0', 'mean_at_grain_length', '0.695', '4'),
    ('digits', 'adamw', '1e-2', 'mean', '0.847', None),
    ('digits', 'adamw', '1e-2', 'mean_at_grain_length', '0.843', None),
    ('digits', 'adamw', '1e-2', 'grain_at_mean_length', '0.826', None),
    ('digits', 'adamw', '1e-2', 'grain', '0.569', None),
]
_TUNED_CLAIMS = [
    ('bbc', 'full', 'mean', '0.892'), ('bbc', 'full', 'grain', '0.884'),
    ('bbc', 'lora', 'mean', '0.889'), ('bbc', 'lora', 'grain', '0.876'),
    ('tweets', 'full', 'mean', '0.607'), ('tweets', 'full', 'grain', '0.585'),
    ('tweets', 'lora', 'mean', '0.604'), ('tweets', 'lora', 'grain', '0.593'),
    ('digits', 'full', 'mean', '0.846'), ('digits', 'full', 'grain', '0.842'),
    ('breast_cancer', 'full', 'mean', '0.918'),
    ('breast_cancer', 'full', 'grain', '0.908'),
    ('diabetes', 'full', 'mean', '0.161'), ('diabetes', 'full', 'grain', '0.140'),
]


def test_is_grain_worth_it_quotes_stability_md():
  """Every study number the verdict quotes is a cell of STABILITY.md."""
  monitor = load_example('is_grain_worth_it')
  text = ' '.join(' '.join(found) + ' ' + advice
                  for _, found, advice in monitor.FINDINGS.values())
  rows = _stability_rows()
  for task, opt, lr, arm, score, failed in _SWEEP_CLAIMS:
    match = [r for r in rows if len(r) == 12 and r[0] == task and r[1] == opt
             and r[3] == lr and r[4] == _ARMS[arm] and r[2] in ('', 'adamw')]
    assert len(match) == 1, (task, opt, lr, arm, match)
    row = match[0]
    assert row[6] == score, (task, opt, lr, arm, row)
    assert score in text, score
    if failed is not None:
      assert row[9] == failed, (task, opt, lr, arm, row)
      assert f'{score} ({failed}/10' in text, (score, failed)
  for task, regime, method, score in _TUNED_CLAIMS:
    match = [r for r in rows if len(r) == 15 and r[:3] == (task, regime, method)
             and r[3].endswith('(own)')]
    assert len(match) == 1 and match[0][5] == score, (task, regime, method, match)
    assert score in text, score
  # The one cell where a variant beat the mean that trained (within noise).
  assert ('digits', 'sgdm', 'dropout', '3e-1', 'mean', '10', '0.741') in {
      r[:7] for r in rows}
  assert ('digits', 'sgdm', 'dropout', '3e-1', 'mean@grain-norm', '10',
          '0.775') in {r[:7] for r in rows}
  assert ('digits', 'full', 'sgdm/dropout', '3e-1', 'mean@grain-norm', '10',
          '1.59 [1.07, 2.59]', '0.111', '+0.0333 [-0.0043, +0.0767]') in rows
  assert '0.775 vs 0.741' in text and '+0.033 [-0.004, +0.077]' in text
  # The regimes study's paired differences (optimizer, setting, contrast
  # column: 2 grain - mean, 3 grain@mean-norm - mean) and cells of its tables
  # (optimizer, setting, arm, mean score).
  noise = _section_rows('Regimes study (issue 24): minilm suite '
                        '(regimes_bbc_noise.jsonl)')
  for opt, setting, col, cell in _REGIME_DIFF_CLAIMS:
    match = [r for r in noise if len(r) == 6 and r[:2] == (opt, setting)]
    assert len(match) == 1 and match[0][col] == cell, (opt, setting, col, match)
    assert cell in text, cell
  rare = _section_rows('Regimes study (issue 24): minilm suite '
                       '(regimes_bbc_imbalance.jsonl)')
  for opt, setting, arm, score in _REGIME_SCORE_CLAIMS:
    match = [r for r in rare if len(r) == 14 and r[:3] == (opt, setting, arm)]
    assert len(match) == 1 and match[0][5] == score, (opt, setting, arm, match)
    assert score in text, score


def _section_rows(heading):
  """Table rows of one '## heading' section of benchmarks/STABILITY.md."""
  text = (ROOT / 'benchmarks' / 'STABILITY.md').read_text()
  start = text.index(f'## {heading}\n')
  end = text.find('\n## ', start + 1)
  return _table_rows(text[start:end if end > 0 else None])


_REGIME_DIFF_CLAIMS = [
    ('adamw', 'noise 0.2, m=4', 2, '+0.024 [+0.010, +0.039]'),
    ('sgdm', 'noise 0.2, m=4', 2, '+0.033 [+0.023, +0.044]'),
    ('sgdm', 'noise 0.4, m=4', 2, '+0.030 [+0.021, +0.039]'),
    ('adamw', 'noise 0.2, m=4', 3, '+0.041 [+0.025, +0.057]'),
    ('sgdm', 'noise 0.2, m=4', 3, '+0.065 [+0.046, +0.082]'),
    ('sgdm', 'noise 0.4, m=4', 3, '+0.055 [+0.039, +0.073]'),
    ('adamw', 'noise 0.4, m=4', 2, '-0.042 [-0.087, +0.000]'),
]
_REGIME_SCORE_CLAIMS = [
    ('adamw', 'rare 2, m=16', 'grain', '0.079'),
    ('adamw', 'rare 2, m=16', 'mean', '0.417'),
]


def test_is_grain_worth_it_verdict_for_noisy_labels():
  monitor = load_example('is_grain_worth_it')
  summary = {'steps': 10, 'steps_with_a_finite_group': 10,
             'conflict_rate': 0.5, 'median_norm_ratio': 0.6,
             'norm_ratio_range': (0.4, 0.9), 'median_effective_groups': 2.5,
             'median_mean_min_cosine': -0.1, 'steps_with_nonfinite_groups': 0,
             'loss_first': 1.0, 'loss_last': 0.5, 'nonfinite_loss': False,
             'test_accuracy': 0.8, 'majority_share': 0.2, 'mean_trained': True}
  for optimizer in ('adamw', 'sgd'):
    text = monitor.verdict(summary, optimizer, 4, noisy_labels=True)
    assert 'noisy labels' in text and "apply='grain_at_mean_length'" in text
    assert 'noisy labels' not in monitor.verdict(summary, optimizer, 4)
