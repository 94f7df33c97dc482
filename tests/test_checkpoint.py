"""Checkpoints resume exactly, and training is deterministic (Flax NNX and Linen).

The training run (tests/_resumable_training.py): digits, GRAIN over 4 groups,
accumulate() over 3 micro-batches before each AdamW step, dropout. And every
optimizer state a user can build with GRAIN saves and restores with orbax.
"""

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import _resumable_training as rt
import grain_optax

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


def run_script(*args, devices=1):
  """Runs tests/_resumable_training.py on ``devices`` CPU devices; its arrays."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      f' --xla_force_host_platform_device_count={devices}')
  out = pathlib.Path(args[args.index('--out') + 1])
  proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out) as f:
    return {k: f[k] for k in f.files}


def section(arrays, prefix):
  return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


@pytest.mark.parametrize('api', rt.APIS)
def test_resume_mid_window_in_a_fresh_process_is_bitwise_identical(
    api, tmp_path):
  # Both runs in fresh CPU processes, whatever this one runs on: the first
  # on device 1 of 2, checkpointing mid-window; the second, with a single
  # device, restores it (the devices it was saved from do not exist there)
  # and continues. Bitwise equality needs both on the same platform.
  ckpt = str(tmp_path / 'ckpt')
  first = run_script('--api', api, '--steps', str(TOTAL), '--save-at',
                     str(SAVE_AT), '--save', ckpt, '--device', '1', '--out',
                     str(tmp_path / 'first.npz'), devices=2)
  assert 'CpuDevice(id=1)' in str(first['saved_on'])
  second = run_script('--api', api, '--restore', ckpt, '--steps', str(TOTAL),
                      '--control', '--out', str(tmp_path / 'second.npz'))
  saved, expected = section(first, 'saved:'), section(first, 'final:')
  # The whole state comes back: params, buffer, inner AdamW state, counters,
  # GRAIN statistics (and the NNX dropout RNG); and training continues as if
  # never interrupted.
  assert_bitwise_equal(section(second, 'restored:'), saved)
  assert any('buffer' in k for k in saved) and any('stats' in k for k in saved)
  assert_bitwise_equal(section(second, 'final:'), expected)

  # This process (any platform, any number of devices) restores it too.
  restored = rt.Run.restore(api, ckpt)
  assert_bitwise_equal(restored.arrays(), saved)
  acc = restored.opt_state[1]
  # Stopped in the middle of an accumulation window: one gradient stored.
  assert int(acc.mini_step) == SAVE_AT % rt.EVERY_K == 1
  assert int(acc.stats.count) == SAVE_AT // rt.EVERY_K
  assert all(np.any(np.asarray(b[0]) != 0)
             for b in jax.tree_util.tree_leaves(acc.buffer))

  # Control: continuing without the stored gradient (buffer emptied) does not
  # reproduce the uninterrupted run, so the buffer's content matters.
  control = params_only(section(second, 'control:'))
  assert control and any(control[k].tobytes() != expected[k].tobytes()
                         for k in control)


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


# --- Every state a user can build: save, restore into an abstract target, ---
# --- continue bitwise identically.                                         ---

M = 4  # groups
STEPS, STOP = 7, 4  # STOP is mid-window for every accumulate below


def _schedule(count):
  return 2 + count % 2  # windows of 2, 3, 2, ...: 2 gradients stored at STOP


def _adamw():
  return optax.adamw(1e-2)


# name: (transformation, whether update takes per-group [M, ...] updates).
# Between them, every kind of state: grain() with and without num_groups,
# accumulate with an int and with a schedule + max_every_k, both under
# optax.inject_hyperparams (a hyperparameter of each injected). Chained to
# share compilations: each GRAIN solver compiles for seconds on 2 cores.
TRANSFORMATIONS = {
    'grain': (lambda: optax.chain(grain_optax.grain(), _adamw()), True),
    'grain+accumulate(int)': (lambda: optax.chain(
        grain_optax.grain(),
        grain_optax.accumulate(_adamw(), every_k=3)), True),
    'grain(num_groups)+accumulate(schedule)': (lambda: optax.chain(
        grain_optax.grain(num_groups=M),
        grain_optax.accumulate(_adamw(), every_k=_schedule, max_every_k=3)),
                                               True),
    'inject(grain)+inject(accumulate)': (lambda: optax.chain(
        optax.inject_hyperparams(grain_optax.grain, static_args=(
            'num_groups',))(num_groups=M, regularization=1e-7),
        optax.inject_hyperparams(
            grain_optax.accumulate, static_args=('max_every_k',))(
                _adamw(), every_k=3, max_every_k=3)), True),
}


def _params():
  return {'w': jnp.zeros((3, 2), jnp.float32), 'b': jnp.zeros(2, jnp.float32)}


@functools.lru_cache(maxsize=None)
def _step_fn(name):
  """The jitted training step of TRANSFORMATIONS[name] (compiled once)."""
  make, grouped = TRANSFORMATIONS[name]
  tx = make()

  @jax.jit
  def step(params, state, i):
    key = jax.random.fold_in(jax.random.key(0), i)
    lead = (M,) if grouped else ()
    grads = {k: jax.random.normal(jax.random.fold_in(key, j), lead + p.shape)
             for j, (k, p) in enumerate(sorted(params.items()))}
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return tx, step


def _train(step, carry, start, stop):
  for i in range(start, stop):
    carry = step(*carry, i)
  return carry


def _save_and_restore(checkpointer, path, tree, abstract):
  if checkpointer == 'standard':
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, tree)
    ckptr.wait_until_finished()
    return ckptr.restore(path, abstract)
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(path, tree)
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(
      abstract,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))


def _leaves_bitwise_equal(a, b):
  a, b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(a) == len(b) and all(
      x.dtype == y.dtype and x.shape == y.shape and
      np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(a, b))


@pytest.mark.parametrize('name', list(TRANSFORMATIONS))
def test_every_state_saves_restores_and_continues_bitwise(name, tmp_path):
  # Both checkpointers in one test: the step compiles once per chain.
  for checkpointer in ('standard', 'pytree'):
    _check_save_restore_continue(name, checkpointer, tmp_path / checkpointer)


def _check_save_restore_continue(name, checkpointer, tmp_path):
  tx, step = _step_fn(name)
  params = _params()
  expected = _train(step, (params, tx.init(params)), 0, STEPS)
  stopped = _train(step, (params, tx.init(params)), 0, STOP)
  # An abstract target, as in a fresh process: shapes, dtypes and this
  # process's default device, nothing computed.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      jax.eval_shape(lambda p: (p, tx.init(p)), params))
  restored = _save_and_restore(checkpointer, tmp_path / 'ckpt', stopped,
                               abstract)
  # The same types (NamedTuples, empty fields) and the same bits...
  assert (jax.tree_util.tree_structure(restored)
          == jax.tree_util.tree_structure(stopped))
  assert _leaves_bitwise_equal(restored, stopped)
  # ... usable wherever the initial state is (jit, lax.cond, scan) ...
  jax.lax.cond(True, lambda: restored, lambda: (params, tx.init(params)))
  # ... and training goes on as if never interrupted.
  assert _leaves_bitwise_equal(_train(step, restored, STOP, STEPS), expected)
  # Not vacuous: the state moved, and stopped mid-window where it can.
  assert not _leaves_bitwise_equal(stopped, (params, tx.init(params)))
  mini_steps = [s.mini_step for s in jax.tree_util.tree_leaves(
      stopped, is_leaf=lambda x: isinstance(x, grain_optax.AccumulateState))
                if isinstance(s, grain_optax.AccumulateState)]
  assert all(int(s) > 0 for s in mini_steps)


def test_grain_state_weights_are_none_without_num_groups():
  # The group count is unknown to init, so no weights are recorded: None, not
  # a zero-size array (which orbax refuses to save).
  params = _params()
  tx, step = _step_fn('grain')
  assert tx.init(params)[0].weights is None
  _, state = step(params, tx.init(params), 0)
  assert state[0].weights is None and int(state[0].count) == 1
  # With num_groups, the weights of the last step.
  tx, step = _step_fn('grain(num_groups)+accumulate(schedule)')
  _, state = step(params, tx.init(params), 0)
  assert state[0].weights.shape == (M,) and state[0].weights.dtype == jnp.float32
  np.testing.assert_allclose(float(jnp.sum(state[0].weights)), 1.0, rtol=1e-6)
