"""Checkpoints resume exactly, and training is deterministic (Flax NNX and Linen).

The training run (tests/_resumable_training.py): digits, GRAIN over 4 groups,
accumulate() over 3 micro-batches before each AdamW step, dropout.
"""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import _resumable_training as rt

SCRIPT = pathlib.Path(rt.__file__).resolve()
TOTAL, SAVE_AT = 8, 4  # 4 = one full window of 3 and one gradient stored


def assert_bitwise_equal(got, expected):
  assert sorted(got) == sorted(expected)
  for key, value in expected.items():
    assert got[key].dtype == value.dtype, key
    assert got[key].shape == value.shape, key
    assert got[key].tobytes() == value.tobytes(), (
        f'{key} differs: max |diff| = '
        f'{np.max(np.abs(got[key].astype(np.float64) - value)):.3g}')


def params_only(arrays):
  return {k: v for k, v in arrays.items()
          if ('opt_state' not in k and 'rngs' not in k and 'step' not in k)}


@pytest.mark.parametrize('api', rt.APIS)
def test_resume_mid_window_in_a_fresh_process_is_bitwise_identical(
    api, tmp_path):
  expected = rt.Run(api).train(TOTAL).arrays()

  part = rt.Run(api).train(SAVE_AT)
  acc = part.opt_state[1]
  # Stopped in the middle of an accumulation window: one gradient stored.
  assert int(acc.mini_step) == SAVE_AT % rt.EVERY_K == 1
  assert int(acc.stats.count) == SAVE_AT // rt.EVERY_K
  assert all(np.any(np.asarray(b[0]) != 0)
             for b in jax.tree_util.tree_leaves(acc.buffer))
  saved = part.arrays()
  part.save(tmp_path / 'ckpt')

  out = tmp_path / 'resumed.npz'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), '--api', api, '--restore',
       str(tmp_path / 'ckpt'), '--steps', str(TOTAL), '--out', str(out)],
      env=env, capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out) as f:
    restored = {k[len('restored:'):]: f[k] for k in f.files
                if k.startswith('restored:')}
    resumed = {k[len('final:'):]: f[k] for k in f.files
               if k.startswith('final:')}
  # The whole state comes back: params, buffer, inner AdamW state, counters,
  # GRAIN statistics (and the NNX dropout RNG).
  assert_bitwise_equal(restored, saved)
  assert any('buffer' in k for k in saved) and any('stats' in k for k in saved)
  assert_bitwise_equal(resumed, expected)

  # Control: continuing without the stored gradient (buffer emptied) does not
  # reproduce the uninterrupted run, so the buffer's content matters.
  if api == 'nnx':
    acc = part.optimizer.opt_state[1]
    for var in jax.tree_util.tree_leaves(
        acc.buffer, is_leaf=lambda x: hasattr(x, 'get_value')):
      var.set_value(var.get_value() * 0)
  else:
    empty = jax.tree_util.tree_map(lambda b: b * 0, acc.buffer)
    part.state = part.state.replace(opt_state=(
        part.state.opt_state[0], acc._replace(buffer=empty)))
  got = params_only(part.train(TOTAL).arrays())
  assert any(got[k].tobytes() != v.tobytes()
             for k, v in params_only(expected).items())


@pytest.mark.parametrize('api', rt.APIS)
def test_same_seed_same_data_gives_bitwise_identical_parameters(api):
  first = rt.Run(api, seed=0).train(TOTAL).arrays()
  jax.clear_caches()  # the second run compiles afresh
  second = rt.Run(api, seed=0).train(TOTAL).arrays()
  assert_bitwise_equal(second, first)
  # Not vacuous: another seed gives other parameters.
  other = params_only(rt.Run(api, seed=1).train(TOTAL).arrays())
  assert all(other[k].tobytes() != v.tobytes()
             for k, v in params_only(first).items())
