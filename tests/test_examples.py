"""The examples run, and GRAIN + AdamW trains a real model on real data."""

import numpy as np

from _asserts import load_example

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
